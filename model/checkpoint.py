"""Checkpoints: mosaiq's own training checkpoints, and a safe reader for other people's `.pt` files.

Training checkpoints are one safetensors file: tensors plus JSON metadata. They may lie on disk
or in object storage (`s3://`, `gs://`): written through `pipeline.fs` (one upload of a complete
file) and read from a local copy (`fs.local_file`: safetensors reads by file name).

Tensor names are prefixed by group: `model.*` (raw weights), `ema.*` (EMA weights) and
`optim.<param index>.<state name>` (AdamW moments and step counts, so resume is exact).
Metadata holds JSON strings: the resolved train config, the model config, the representation
config, the quality stats found beside the shards, the optimizer's param groups, the train
state (step) and, for a run on pre-encoded shards, what encoded them. Nothing is pickled; loading never runs code from the file.

`safe_torch_load` reads upstream `.pt` files (LAION CLAP, fairseq wav2vec2, QAMA) with
`torch.load(weights_only=True)` plus an explicit allowlist of the harmless types those files
hold beside their tensors: numpy scalars and dtypes (LAION's cosine schedule stores each
param group's `lr` as a numpy.float64; fairseq's meters keep numpy floats) and
`argparse.Namespace` (pre-Hydra fairseq `args`). Anything else is refused, naming the type.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import numpy as np

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import fs

TRAIN_CONFIG = "mosaiq.train_config"
MODEL_CONFIG = "mosaiq.model_config"
REPRESENTATION = "mosaiq.representation"
QUALITY_STATS = "mosaiq.quality_stats"
OPTIM_GROUPS = "mosaiq.optim_param_groups"
TRAIN_STATE = "mosaiq.train_state"
PRE_ENCODED = "mosaiq.pre_encoded"  # the training shards' encode_info.json (null: trained from audio)
METADATA_KEYS = (TRAIN_CONFIG, MODEL_CONFIG, REPRESENTATION, QUALITY_STATS, OPTIM_GROUPS, TRAIN_STATE, PRE_ENCODED)

CHECKPOINT_RE = re.compile(r"^step-(\d{9})\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints in `folder` (local or in object storage), oldest first."""
    folder = fs.location(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name)), key=lambda p: p.name)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def save_checkpoint(path: str | Path, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, metadata: dict[str, object]) -> Path:
    """Write atomically (temporary name, then a rename or one upload); metadata values are
    JSON-encoded."""
    path = fs.location(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    optim, groups = optimizer_tensors(optimizer)
    tensors.update(optim)
    meta = {k: json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    meta[OPTIM_GROUPS] = json.dumps(groups, sort_keys=True)
    with fs.atomic_target(path) as tmp:  # streamed to disk: a large model is not held twice in memory
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, object]:
    path = fs.location(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    with fs.local_file(path) as local, safe_open(local, framework="pt") as f:
        meta = f.metadata() or {}
    missing = [k for k in (MODEL_CONFIG, REPRESENTATION, TRAIN_CONFIG) if k not in meta]
    if missing:
        raise ValueError(f"{path} is not a mosaiq QA-MDT checkpoint: metadata lacks {missing}")
    return {k: json.loads(v) for k, v in meta.items()}


def read_group(path: str | Path, group: str) -> dict[str, torch.Tensor]:
    """The tensors of one group (`model`, `ema` or `optim`), prefix removed."""
    prefix = group + "."
    with fs.local_file(path) as local, safe_open(local, framework="pt") as f:
        out = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"checkpoint {path} has no tensors in group {group!r}")
    return out


def load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    groups = read_metadata(path)[OPTIM_GROUPS]
    state: dict[int, dict[str, torch.Tensor]] = {}
    with fs.local_file(path) as local, safe_open(local, framework="pt") as f:
        for k in f.keys():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = f.get_tensor(k)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- other people's .pt files ------------------------------------------------------------


class UnsafeCheckpointError(ValueError):
    """A `.pt` file that holds pickled objects outside the allowlist."""


def _allowed_globals() -> list:
    """numpy scalars (under numpy 1's and numpy 2's module name), numpy dtypes and their
    classes, and argparse.Namespace: data only, no code runs when they are rebuilt."""
    import numpy.dtypes

    scalar = np._core.multiarray.scalar  # numpy 2 name; files written by numpy 1 name numpy.core
    dtype_classes = [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtype_classes, argparse.Namespace]


def _global_name(g) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


SAFE_GLOBALS = _allowed_globals()
_SAFE_NAMES = {_global_name(g) for g in SAFE_GLOBALS}
_REFUSED_GLOBAL = re.compile(r"(?:GLOBAL|reduce for|Unsupported class)\s+([\w.]+)")


def _refused_types(path: Path, error: Exception) -> list[str]:
    """The pickled globals in `path` that the allowlist does not cover (best effort)."""
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - _SAFE_NAMES
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: fall back to torch's message
        names = set()
    return sorted(names or set(_REFUSED_GLOBAL.findall(str(error))))


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> object:
    """`torch.load(path, weights_only=True)` with `SAFE_GLOBALS` allowed, on the CPU.

    Raises FileNotFoundError for a missing file, UnsafeCheckpointError (naming the types) for
    a file that needs any other pickled object, ValueError for one torch cannot read at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        types = _refused_types(path, e)
        if not types:  # not a torch file, or damaged
            raise ValueError(f"{what} {str(path)!r} cannot be read by torch.load(weights_only=True): {e}") from e
        raise UnsafeCheckpointError(
            f"{what} {str(path)!r} holds pickled object(s) of type {', '.join(types)}, which "
            "torch.load(weights_only=True) refuses: mosaiq allows only tensors, plain Python values, numpy "
            "scalars/dtypes and argparse.Namespace, and never unpickles anything else. Re-save the file's "
            "state_dict with plain types if you trust it."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{what} {str(path)!r} cannot be read by torch.load: {e}") from e
