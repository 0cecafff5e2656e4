"""CLAP text-audio similarity behind one interface: laion-clap checkpoints and transformers folders.

Both backends take mono 48 kHz waveforms, cut a deterministic 10 s window (seeded per clip)
so neither library crops at random, and return L2-normalised embeddings; the score of a text
against a clip is their dot product (cosine similarity, in [-1, 1]).

laion-clap is built fully offline here, and every workaround it needs lives in this file:
- it calls `from_pretrained("roberta-base")` (and bert/bart tokenizers at import time): these
  are redirected to a local roberta-style folder (config + tokenizer; hidden size 768);
- it imports `torchvision` and `wget`, which mosaiq does not install: stub modules stand in
  while it is imported, and are gone afterwards;
- `CLAP_Module.load_ckpt` unpickles with `weights_only=False` and may download: instead the
  checkpoint is read with `torch.load(weights_only=True)` and given to `load_state_dict`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 48_000  # Hz, what every CLAP here expects
WINDOW_S = 10.0  # seconds of audio one embedding sees
WINDOW_SAMPLES = int(SAMPLE_RATE * WINDOW_S)
LAION_AUDIO_MODELS = ("HTSAT-base", "HTSAT-tiny")


class ClapModelError(ValueError):
    """A CLAP checkpoint or folder that cannot be loaded."""


class Clap(Protocol):
    def embed_audio(self, waves: Sequence[np.ndarray], keys: Sequence[str]) -> np.ndarray: ...
    def embed_text(self, texts: Sequence[str]) -> np.ndarray: ...


def crop_window(wave: np.ndarray, key: str, seed: int, n: int = WINDOW_SAMPLES) -> np.ndarray:
    """A deterministic `n`-sample window of `wave` (offset from `key` and `seed`); shorter
    waves are returned whole (the backends repeat-pad them)."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono (T,) waveform, got shape {wave.shape}")
    if len(wave) <= n:
        return wave
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    start = int.from_bytes(digest, "little") % (len(wave) - n + 1)
    return wave[start : start + n]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def similarity(audio_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of every clip with every text: (N, D) x (M, D) -> (N, M)."""
    return _normalise(audio_emb) @ _normalise(text_emb).T


# --- laion-clap ---------------------------------------------------------------------------


def _stub_module(name: str) -> types.ModuleType:
    """A module whose every attribute is an inert placeholder class."""
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so submodules can be stubbed too
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)  # find_spec must not raise

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {"__init__": lambda self, *a, **k: None})

    mod.__getattr__ = __getattr__
    return mod


@contextlib.contextmanager
def _stubbed_imports():
    """While active, stand-ins for modules laion-clap imports but never uses on the inference
    path (torchvision, wget). They leave `sys.modules` afterwards: a stub without a real
    `__spec__` would break `importlib.util.find_spec`, which transformers calls to probe for
    torchvision (ValueError: torchvision.__spec__ is None)."""
    from transformers.utils import is_torchvision_available

    is_torchvision_available()  # probed (and cached) before any stub exists

    added = []
    names = {"torchvision": ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.ops", "torchvision.ops.misc"), "wget": ("wget",)}
    for package, modules in names.items():
        if package not in sys.modules and importlib.util.find_spec(package) is None:
            for name in modules:
                sys.modules[name] = _stub_module(name)
                added.append(name)
            log.debug("laion-clap: %s is not installed; using a stub module while importing it", package)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def _hub_redirect(text_folder: Path):
    """While active, laion-clap's hub lookups load from `text_folder` instead."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    def tokenizer(cls, *args, **kwargs):
        return AutoTokenizer.from_pretrained(str(text_folder), local_files_only=True)

    def text_model(cls, *args, **kwargs):
        # weights come from the CLAP checkpoint: build from the config only
        return transformers.RobertaModel(AutoConfig.from_pretrained(str(text_folder), local_files_only=True))

    patched = {
        transformers.RobertaTokenizer: tokenizer,
        transformers.BertTokenizer: tokenizer,
        transformers.BartTokenizer: tokenizer,
        transformers.RobertaModel: text_model,
    }
    saved = {cls: cls.__dict__.get("from_pretrained") for cls in patched}
    try:
        for cls, fn in patched.items():
            cls.from_pretrained = classmethod(fn)
        yield
    finally:
        for cls, original in saved.items():
            if original is None:
                del cls.from_pretrained
            else:
                cls.from_pretrained = original


def _check_text_folder(text_folder: str | Path | None) -> Path:
    if not text_folder:
        raise ClapModelError("laion CLAP needs a local roberta-style folder (config.json + tokenizer): set clap.text_model")
    folder = Path(text_folder)
    if not (folder / "config.json").is_file():
        raise ClapModelError(f"laion CLAP text folder {str(folder)!r} has no config.json")
    return folder


def build_laion_module(text_folder: str | Path, amodel: str = "HTSAT-base", enable_fusion: bool = False):
    """An untrained `laion_clap.CLAP_Module`, built offline (see the module docstring)."""
    if amodel not in LAION_AUDIO_MODELS:
        raise ClapModelError(f"laion CLAP audio model {amodel!r} is not one of {LAION_AUDIO_MODELS}")
    folder = _check_text_folder(text_folder)
    with _hub_redirect(folder):  # laion-clap loads tokenizers when imported, too
        with _stubbed_imports():
            import laion_clap
        return laion_clap.CLAP_Module(enable_fusion=enable_fusion, amodel=amodel, tmodel="roberta", device="cpu")


def read_laion_state_dict(path: str | Path) -> dict:
    """Tensors of a LAION `.pt` checkpoint, read with `weights_only=True` (no unpickling of
    arbitrary objects); DDP's `module.` prefix is stripped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ClapModelError(f"CLAP checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here; the message says which
        raise ClapModelError(f"CLAP checkpoint {str(path)!r} cannot be read safely (weights_only=True): {e}") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ClapModelError(f"CLAP checkpoint {str(path)!r} holds no state_dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def save_laion_checkpoint(module, path: str | Path, epoch: int = 0) -> None:
    """Save a `CLAP_Module` the way LAION's training does (`{"epoch", "state_dict"}`, DDP prefix)."""
    import torch

    state = {f"module.{k}": v for k, v in module.model.state_dict().items()}
    torch.save({"epoch": epoch, "state_dict": state}, path)


class LaionClap:
    """laion-clap `CLAP_Module` with weights from a local LAION `.pt` checkpoint."""

    def __init__(self, checkpoint: str | Path, text_folder: str | Path, amodel: str = "HTSAT-base", seed: int = 0, device: str = "cpu"):
        import torch

        state = read_laion_state_dict(checkpoint)
        self.module = build_laion_module(text_folder, amodel=amodel)
        model = self.module.model
        # position_ids is a buffer in some transformers versions and not in others
        own = model.state_dict()
        state = {k: v for k, v in state.items() if not (k.endswith("embeddings.position_ids") and k not in own)}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ClapModelError(f"CLAP checkpoint {str(checkpoint)!r} does not fit laion {amodel}: {e}") from e
        self.device = torch.device(device)
        model.to(self.device).eval()
        self.seed = seed

    def embed_audio(self, waves: Sequence[np.ndarray], keys: Sequence[str]) -> np.ndarray:
        import torch

        crops = [crop_window(w, k, self.seed) for w, k in zip(waves, keys)]
        with torch.no_grad():
            emb = self.module.get_audio_embedding_from_data(crops, use_tensor=False)  # (N, D)
        return _normalise(emb)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            emb = self.module.get_text_embedding(list(texts), use_tensor=False)  # (M, D)
        return _normalise(emb)


# --- transformers ClapModel -----------------------------------------------------------------


class HFClap:
    """transformers `ClapModel` (unfused) from a local folder with its processor files."""

    def __init__(self, folder: str | Path, seed: int = 0, device: str = "cpu"):
        import torch
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ClapModelError(f"transformers CLAP folder {str(folder)!r} has no config.json")
        self.model = ClapModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.features = ClapFeatureExtractor.from_pretrained(folder, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.features.sampling_rate != SAMPLE_RATE:
            raise ClapModelError(f"CLAP folder {str(folder)!r} expects {self.features.sampling_rate} Hz, not {SAMPLE_RATE}")
        self.window = int(self.features.nb_max_samples)
        # RoBERTa-style position ids start after the padding index: 2 fewer usable positions
        positions = self.model.config.text_config.max_position_embeddings - 2
        self.max_text_tokens = min(int(self.tokenizer.model_max_length), positions)
        self.device = torch.device(device)
        self.seed = seed

    @staticmethod
    def _tensor(out):
        # transformers 5 returns a model output from get_*_features; 4.x a tensor
        return out if hasattr(out, "detach") else out.pooler_output

    def embed_audio(self, waves: Sequence[np.ndarray], keys: Sequence[str]) -> np.ndarray:
        import torch

        crops = [crop_window(w, k, self.seed, self.window) for w, k in zip(waves, keys)]
        inputs = self.features(
            crops, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation="rand_trunc", padding="repeatpad"
        )
        with torch.no_grad():
            emb = self._tensor(self.model.get_audio_features(input_features=inputs["input_features"].to(self.device)))
        return _normalise(emb.cpu().numpy())  # (N, D)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        inputs = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            emb = self._tensor(self.model.get_text_features(**inputs))
        return _normalise(emb.cpu().numpy())  # (M, D)


def load_clap(backend: str, path: str | Path, text_folder: str | Path | None = None, amodel: str = "HTSAT-base", seed: int = 0, device: str = "cpu") -> Clap:
    """The CLAP of `backend` ("laion" or "hf") from local files only."""
    if backend == "laion":
        return LaionClap(path, text_folder, amodel=amodel, seed=seed, device=device)
    if backend == "hf":
        return HFClap(path, seed=seed, device=device)
    raise ClapModelError(f"unknown CLAP backend {backend!r}; expected 'laion' or 'hf'")
