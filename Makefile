# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then run the main job on the bundled sample (offline models)
#   make test   install into .venv, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
OUT ?= out/demo

.PHONY: demo test install clean bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, so nothing later pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(BIN)/mosaiq-fixup
	$(BIN)/python -c "import torchaudio, transformers, ray, webdataset, distillmos; print('mosaiq install ok')"
	touch $@

demo: install
	$(BIN)/mosaiq curate --config jobs/demo.yaml --output $(OUT)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
