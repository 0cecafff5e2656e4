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
  checkpoint is read with `model.checkpoint.safe_torch_load` (weights_only=True plus an allowlist
  of numpy scalars, which LAION's optimizer state holds) and given to `load_state_dict`.

LAION checkpoints are `{"epoch", "name", "state_dict" (DDP `module.` keys), "optimizer", ...}`
(laion_clap/training/main.py). The audio model is read from the tensors: HTSAT-tiny and
HTSAT-base differ in their patch-embedding width (96 vs 128) and depth, and fused checkpoints
carry `fusion_model` / `mel_conv2d` weights. Both backends cut text at 77 tokens, as LAION's
tokenizer does, so one caption scores the same on either.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from pipeline.fs import derive_seed
from schemas.tables import CLAP_SAMPLE_RATE as SAMPLE_RATE  # Hz, what every CLAP here expects

log = logging.getLogger(__name__)

WINDOW_S = 10.0  # seconds of audio one embedding sees
WINDOW_SAMPLES = int(SAMPLE_RATE * WINDOW_S)
TEXT_MAX_TOKENS = 77  # LAION's tokenizer (laion_clap/hook.py) cuts every text here; so does HFClap
LAION_AUDIO_MODELS = ("HTSAT-base", "HTSAT-tiny")
AUDIO_MODEL_AUTO = "auto"  # read the audio model from the checkpoint's tensors
DEFAULT_AUDIO_MODEL = AUDIO_MODEL_AUTO
AUDIO_MODEL_CHOICES = (AUDIO_MODEL_AUTO, *LAION_AUDIO_MODELS)
# HTSAT preset -> (patch-embedding width, blocks in its third stage), laion_clap/clap_module/htsat.py
_HTSAT_SHAPES = {"HTSAT-tiny": (96, 6), "HTSAT-base": (128, 12)}


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
    start = derive_seed(f"{seed}:{key}") % (len(wave) - n + 1)
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


def build_laion_module(text_folder: str | Path, amodel: str, enable_fusion: bool = False):
    """An untrained `laion_clap.CLAP_Module`, built offline (see the module docstring)."""
    if amodel not in LAION_AUDIO_MODELS:
        raise ClapModelError(f"laion CLAP audio model {amodel!r} is not one of {LAION_AUDIO_MODELS}")
    folder = _check_text_folder(text_folder)
    with _hub_redirect(folder):  # laion-clap loads tokenizers when imported, too
        with _stubbed_imports():
            import laion_clap
        return laion_clap.CLAP_Module(enable_fusion=enable_fusion, amodel=amodel, tmodel="roberta", device="cpu")


def read_laion_state_dict(path: str | Path) -> dict:
    """Tensors of a LAION `.pt` checkpoint as LAION's training saves it, read with
    `safe_torch_load` (no unpickling of arbitrary objects); DDP's `module.` prefix is stripped."""
    from model.checkpoint import safe_torch_load

    try:
        ckpt = safe_torch_load(path, what="CLAP checkpoint")
    except (FileNotFoundError, ValueError) as e:
        raise ClapModelError(str(e)) from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ClapModelError(f"CLAP checkpoint {str(path)!r} holds no state_dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def laion_architecture(state: dict, source: str = "checkpoint") -> tuple[str, bool]:
    """(audio model, fusion) of a LAION CLAP state dict, read from its tensors."""
    patch = state.get("audio_branch.patch_embed.proj.weight")
    if patch is None:
        raise ClapModelError(
            f"CLAP {source} has no audio_branch.patch_embed.proj.weight: not a LAION HTSAT CLAP "
            f"(mosaiq supports {LAION_AUDIO_MODELS})"
        )
    width = int(patch.shape[0])
    blocks = len({k.split(".")[4] for k in state if k.startswith("audio_branch.layers.2.blocks.")})
    found = [name for name, shape in _HTSAT_SHAPES.items() if shape == (width, blocks)]
    if not found:
        known = ", ".join(f"{n}: width {w}, {b} blocks" for n, (w, b) in _HTSAT_SHAPES.items())
        raise ClapModelError(
            f"CLAP {source}: audio patch embedding width {width} with {blocks} blocks in stage 3 matches "
            f"no supported HTSAT ({known})"
        )
    fused = {part: any(f"patch_embed.{part}." in k for k in state) for part in ("fusion_model", "mel_conv2d")}
    if len(set(fused.values())) > 1:
        raise ClapModelError(f"CLAP {source} is partly fused ({fused}): cannot tell how to build it")
    return found[0], fused["fusion_model"]


def resolve_audio_model(requested: str | None, inferred: str, source: str = "checkpoint") -> str:
    """`inferred` when the user asked for `auto` (or nothing) or for the same model; refuse a contradiction."""
    if requested in (None, "", AUDIO_MODEL_AUTO):
        return inferred
    if requested not in LAION_AUDIO_MODELS:
        raise ClapModelError(f"CLAP audio model {requested!r} is not one of {AUDIO_MODEL_CHOICES}")
    if requested != inferred:
        raise ClapModelError(
            f"CLAP audio model {requested!r} was asked for, but the {source}'s tensors are {inferred}: "
            f"pass {inferred!r} or {AUDIO_MODEL_AUTO!r}"
        )
    return requested


def save_laion_checkpoint(module, path: str | Path, epoch: int = 1, name: str = "mosaiq-random", lr: float = 1e-4) -> None:
    """Save a `CLAP_Module` the way LAION's training/main.py does: `{"epoch", "name",
    "state_dict" (DDP `module.` keys), "optimizer"}`, where the cosine schedule has left each
    param group's `lr` a numpy.float64 (for random-weight test and benchmark models)."""
    import torch

    model = module.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # LAION's two groups: gains, biases and logit scales without weight decay, the rest with
    no_decay = [p for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    rest = [p for n, p in named if not any(p is q for q in no_decay)]
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}], lr=lr)
    first = no_decay[0]
    optimizer.state[first] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(first), "exp_avg_sq": torch.zeros_like(first)}
    for group in optimizer.param_groups:
        group["lr"] = np.float64(lr)  # what laion_clap/training/scheduler.py assigns
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": epoch, "name": name, "state_dict": state, "optimizer": optimizer.state_dict()}, path)


class LaionClap:
    """laion-clap `CLAP_Module` with weights from a local LAION `.pt` checkpoint."""

    def __init__(self, checkpoint: str | Path, text_folder: str | Path, amodel: str = DEFAULT_AUDIO_MODEL, seed: int = 0, device: str = "cpu"):
        import torch

        state = read_laion_state_dict(checkpoint)
        source = f"checkpoint {str(checkpoint)!r}"
        inferred, self.fusion = laion_architecture(state, source)
        self.amodel = amodel = resolve_audio_model(amodel, inferred, source)
        self.module = build_laion_module(text_folder, amodel, enable_fusion=self.fusion)
        model = self.module.model
        # position_ids is a buffer in some transformers versions and not in others
        own = model.state_dict()
        state = {k: v for k, v in state.items() if not (k.endswith("embeddings.position_ids") and k not in own)}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ClapModelError(f"CLAP {source} does not fit laion {amodel} (fusion {self.fusion}): {e}") from e
        self.device = torch.device(device)
        model.to(self.device).eval()
        self.seed = seed

    def embed_audio(self, waves: Sequence[np.ndarray], keys: Sequence[str]) -> np.ndarray:
        import torch

        crops = [crop_window(w, k, self.seed) for w, k in zip(waves, keys)]
        with torch.no_grad():
            emb = self.module.get_audio_embedding_from_data(crops, use_tensor=False)  # (N, D)
        return _normalise(emb)

    def tokenize(self, texts: Sequence[str]) -> dict:
        """laion-clap's own tokenizer call: padded to and cut at TEXT_MAX_TOKENS (77)."""
        return self.module.tokenizer(list(texts))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            emb = self.module.get_text_embedding(list(texts), use_tensor=False)  # (M, D), tokenised by laion at 77
        return _normalise(emb)


# --- transformers ClapModel -----------------------------------------------------------------


class HFClap:
    """transformers `ClapModel` (unfused) from a local folder with its processor files."""

    def __init__(self, folder: str | Path, amodel: str = DEFAULT_AUDIO_MODEL, seed: int = 0, device: str = "cpu"):
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
        audio = self.model.config.audio_config
        source = f"transformers CLAP folder {str(folder)!r}"
        if audio.enable_fusion:
            raise ClapModelError(f"{source} is a fused model; mosaiq's transformers backend runs unfused CLAPs only")
        # the same test as laion_architecture: HTSAT-tiny's patch embedding is 96 wide, base's 128
        by_width = {width: name for name, (width, _) in _HTSAT_SHAPES.items()}
        if amodel not in (None, "", AUDIO_MODEL_AUTO):
            width = int(audio.patch_embeds_hidden_size)
            if width not in by_width:
                raise ClapModelError(f"{source}: audio width {width} matches no supported HTSAT; cannot check {amodel!r}")
            resolve_audio_model(amodel, by_width[width], source)
        self.window = int(self.features.nb_max_samples)
        # RoBERTa-style position ids start after the padding index: 2 fewer usable positions
        positions = self.model.config.text_config.max_position_embeddings - 2
        self.max_text_tokens = min(TEXT_MAX_TOKENS, int(self.tokenizer.model_max_length), positions)
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

    def tokenize(self, texts: Sequence[str]) -> dict:
        """Cut at TEXT_MAX_TOKENS as LAION does (padded to the longest text: the mask hides pads)."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt")

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        inputs = self.tokenize(texts).to(self.device)
        with torch.no_grad():
            emb = self._tensor(self.model.get_text_features(**inputs))
        return _normalise(emb.cpu().numpy())  # (M, D)


def load_clap(backend: str, path: str | Path, text_folder: str | Path | None = None, amodel: str = DEFAULT_AUDIO_MODEL,
              seed: int = 0, device: str = "cpu") -> Clap:
    """The CLAP of `backend` ("laion" or "hf") from local files only; `amodel` is `auto` (read
    from the weights) or a LAION audio model name that must agree with them."""
    if backend == "laion":
        return LaionClap(path, text_folder, amodel=amodel, seed=seed, device=device)
    if backend == "hf":
        return HFClap(path, amodel=amodel, seed=seed, device=device)
    raise ClapModelError(f"unknown CLAP backend {backend!r}; expected 'laion' or 'hf'")
