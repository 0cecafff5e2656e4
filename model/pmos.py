"""Pseudo-MOS (p-MOS) scorers: 16 kHz mono waveforms in, one score in [1, 5] per clip out.

- `Wav2Vec2PMOS`: a transformers `Wav2Vec2Model` backbone and a linear head over the time-mean
  of the last hidden state, clamped to [1, 5]: the architecture of QAMA (Ragano et al., ICASSP
  2023), the p-MOS model QA-MDT used. Loads a local folder (`backbone/` HF folder + `head.safetensors`);
  `model/qama.py` (`mosaiq convert-qama`) turns QAMA's fairseq checkpoints into that folder.
- `DistillMOSScorer`: the `distillmos` package's 4M-parameter model, weights inside the wheel:
  the offline default.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from schemas.tables import PMOS_SAMPLE_RATE

log = logging.getLogger(__name__)

PMOS_MIN, PMOS_MAX = 1.0, 5.0
HEAD_FILE = "head.safetensors"
BACKBONE_DIR = "backbone"
SCORERS = ("distillmos", "wav2vec2")


class Wav2Vec2PMOS(nn.Module):
    """wav2vec2 backbone + linear head over the time-mean of the last hidden state."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, T) at 16 kHz, unpadded (scorers batch equal lengths) -> p-MOS (B,) in [1, 5]."""
        h = self.backbone(wav).last_hidden_state  # (B, F, D)
        pooled = h.mean(dim=1)  # (B, D)
        return self.head(pooled).squeeze(-1).clamp(PMOS_MIN, PMOS_MAX)  # (B,)

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        self.backbone.save_pretrained(folder / BACKBONE_DIR)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(folder / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Wav2Vec2PMOS":
        from safetensors.torch import load_file
        from transformers import Wav2Vec2Model

        folder = Path(folder)
        if not (folder / BACKBONE_DIR / "config.json").is_file() or not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a wav2vec2 p-MOS folder: expected {BACKBONE_DIR}/config.json and {HEAD_FILE} "
                "(make one with `mosaiq convert-qama`)"
            )
        backbone = Wav2Vec2Model.from_pretrained(str(folder / BACKBONE_DIR), local_files_only=True)
        model = cls(backbone)
        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return model.eval()


# --- scorers: list of 1-D float32 arrays -> np.ndarray (B,) -------------------------------


def _length_groups(wavs: list[np.ndarray]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(wavs):
        groups.setdefault(len(w), []).append(i)
    return groups


class Wav2Vec2Scorer:
    name = "wav2vec2"
    sample_rate = PMOS_SAMPLE_RATE

    def __init__(self, model_path: str | Path, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = Wav2Vec2PMOS.from_pretrained(model_path).to(self.device)

    @torch.no_grad()
    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        return _score_by_length(wavs, lambda x: self.model(x.to(self.device)))


def _score_by_length(wavs: list[np.ndarray], fn) -> np.ndarray:
    """Run `fn` on batches of equal-length clips: zero-padding would change a clip's score
    (attention and normalisation see the padding), and clips are nearly always one length."""
    out = np.empty(len(wavs), np.float64)
    for _, idx in sorted(_length_groups(wavs).items()):
        x = torch.from_numpy(np.stack([wavs[i] for i in idx]))  # (b, T)
        out[idx] = fn(x).reshape(-1).float().cpu().numpy()
    return np.clip(out, PMOS_MIN, PMOS_MAX)


class DistillMOSScorer:
    """DistillMOS (distilled from a wav2vec2 XLS-R MOS model); weights ship in the wheel."""

    name = "distillmos"
    sample_rate = PMOS_SAMPLE_RATE

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu"):
        import distillmos

        if model_path is not None:
            raise ValueError(f"the distillmos scorer uses the weights inside its package; got model path {model_path!r}")
        self.device = torch.device(device)
        self.model = distillmos.ConvTransformerSQAModel().to(self.device).eval()

    @torch.no_grad()
    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        # DistillMOS crops long inputs into windows itself
        return _score_by_length(wavs, lambda x: self.model(x.to(self.device)))


def build_scorer(name: str, model_path: str | Path | None = None, device: str = "cpu"):
    """The scorer called `name` (one of SCORERS)."""
    if name == "distillmos":
        return DistillMOSScorer(model_path, device)
    if name == "wav2vec2":
        if model_path is None:
            raise ValueError("the wav2vec2 scorer needs --model PATH (a folder made by `mosaiq convert-qama`)")
        return Wav2Vec2Scorer(model_path, device)
    raise ValueError(f"unknown scorer {name!r}; expected one of {list(SCORERS)}")
