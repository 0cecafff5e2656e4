"""Pseudo-MOS (p-MOS) scorers: 16 kHz mono waveforms in, one score in [1, 5] per clip out.

- `Wav2Vec2PMOS`: a transformers `Wav2Vec2Model` backbone and a linear head over the time-mean
  of the last hidden state, clamped to [1, 5]: the architecture of QAMA (Ragano et al., ICASSP
  2023), the p-MOS model QA-MDT used. Loads a local folder (`backbone/` HF folder + `head.safetensors`);
  `convert_qama` turns QAMA's fairseq checkpoints into that folder.
- `DistillMOSScorer`: the `distillmos` package's 4M-parameter model, weights inside the wheel:
  the offline default.

    mosaiq convert-qama --qama qama_full.pt [--pretrain checkpoint_best.pt] --out models/qama
"""

from __future__ import annotations

import argparse
import json
import logging
import re
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


# --- QAMA fairseq checkpoints -> local folder ---------------------------------------------

# fairseq wav2vec2 key (regex) -> transformers Wav2Vec2Model key (format string)
_FAIRSEQ_TO_HF = [
    (r"^post_extract_proj\.(weight|bias)$", "feature_projection.projection.{0}"),
    (r"^layer_norm\.(weight|bias)$", "feature_projection.layer_norm.{0}"),
    (r"^mask_emb$", "masked_spec_embed"),
    (r"^encoder\.pos_conv\.0\.bias$", "encoder.pos_conv_embed.conv.bias"),
    (r"^encoder\.pos_conv\.0\.weight_g$", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv\.0\.weight_v$", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.layer_norm\.(weight|bias)$", "encoder.layer_norm.{0}"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|q_proj|out_proj)\.(weight|bias)$", "encoder.layers.{0}.attention.{1}.{2}"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", "encoder.layers.{0}.layer_norm.{1}"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", "encoder.layers.{0}.feed_forward.intermediate_dense.{1}"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", "encoder.layers.{0}.feed_forward.output_dense.{1}"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", "encoder.layers.{0}.final_layer_norm.{1}"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", "feature_extractor.conv_layers.{0}.conv.{1}"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)$", "feature_extractor.conv_layers.{0}.layer_norm.{1}"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", "feature_extractor.conv_layers.{0}.layer_norm.{1}"),
]
_QAMA_SSL_PREFIX = "ssl_model."
_QAMA_HEAD = "output_layer_arch1."
# parts of a QAMA checkpoint that the arch1 predictor does not use, and pretraining-only parts
_IGNORED = re.compile(r"^(fc1|fc2|output_layer_arch2|output_layer_class|dropout)\.|^(quantizer|project_q|final_proj|target_glu)\.")


def fairseq_to_hf_key(key: str) -> str | None:
    for pattern, target in _FAIRSEQ_TO_HF:
        m = re.match(pattern, key)
        if m:
            return target.format(*m.groups())
    return None


def _load_tensors(path: str | Path) -> dict:
    """A checkpoint's tensors, loaded with weights_only=True (never unpickling code)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{str(path)!r} cannot be loaded safely with torch.load(weights_only=True): {e}. "
            "mosaiq does not unpickle checkpoints; re-save its state_dict with plain tensors."
        ) from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj  # a fairseq checkpoint: {"model": state_dict, "cfg": ...}
    return {"model": obj}


def _config_from_state(sd: dict, layer_norm_first: bool):
    """A Wav2Vec2Config whose shapes match a fairseq wav2vec2 state dict."""
    from transformers import Wav2Vec2Config

    conv_idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"feature_extractor\.conv_layers\.(\d+)\.0\.weight$", k))})
    if not conv_idx:
        raise ValueError("checkpoint has no feature_extractor.conv_layers: is it a wav2vec2 checkpoint?")
    convs = [sd[f"feature_extractor.conv_layers.{i}.0.weight"] for i in conv_idx]
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    hidden = sd["post_extract_proj.weight"].shape[0]
    pos = sd["encoder.pos_conv.0.weight_v"]
    layer_norm_mode = any(k.endswith(".2.1.weight") for k in sd if k.startswith("feature_extractor"))
    # fairseq's standard conv strides: first layer 5, then 2 (base and large alike)
    strides = [5] + [2] * (len(convs) - 1)
    return Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=sd["encoder.layers.0.fc1.weight"].shape[0],
        conv_dim=tuple(int(c.shape[0]) for c in convs),
        conv_kernel=tuple(int(c.shape[2]) for c in convs),
        conv_stride=tuple(strides),
        conv_bias="feature_extractor.conv_layers.0.0.bias" in sd,
        feat_extract_norm="layer" if layer_norm_mode else "group",
        num_conv_pos_embeddings=int(pos.shape[2]),
        num_conv_pos_embedding_groups=int(hidden // pos.shape[1]),
        do_stable_layer_norm=layer_norm_first,
    )


def convert_qama(qama: str | Path, out: str | Path, pretrain: str | Path | None = None,
                 num_heads: int | None = None, conv_stride: tuple[int, ...] | None = None,
                 layer_norm_first: bool = False) -> Path:
    """QAMA `qama_full.pt` (+ optional fairseq `checkpoint_best.pt`) -> a Wav2Vec2PMOS folder."""
    from transformers import Wav2Vec2Model

    full = _load_tensors(qama)["model"]
    ssl = {k[len(_QAMA_SSL_PREFIX):]: v for k, v in full.items() if k.startswith(_QAMA_SSL_PREFIX)}
    if not ssl and pretrain is not None:
        ssl = _load_tensors(pretrain)["model"]
    if not ssl:
        raise ValueError(f"{str(qama)!r} has no {_QAMA_SSL_PREFIX}* weights and no --pretrain checkpoint was given")
    if pretrain is not None:  # fill anything the fine-tuned model lacks from the pretrained one
        for k, v in _load_tensors(pretrain)["model"].items():
            ssl.setdefault(k, v)
    head = {k[len(_QAMA_HEAD):]: v for k, v in full.items() if k.startswith(_QAMA_HEAD)}
    if set(head) != {"weight", "bias"}:
        raise ValueError(f"{str(qama)!r} has no {_QAMA_HEAD}weight/bias: is it a QAMA checkpoint?")
    cfg = _config_from_state(ssl, layer_norm_first)
    if num_heads is not None:
        cfg.num_attention_heads = num_heads
    if conv_stride is not None:
        cfg.conv_stride = tuple(conv_stride)
    hf_sd, unused = {}, []
    for k, v in ssl.items():
        target = fairseq_to_hf_key(k)
        if target is None:
            if not _IGNORED.match(k):
                unused.append(k)
            continue
        hf_sd[target] = v
    if unused:
        raise ValueError(f"unrecognised fairseq key(s) {unused[:8]}: refusing a partial conversion")
    backbone = Wav2Vec2Model(cfg)
    missing, unexpected = backbone.load_state_dict(hf_sd, strict=False)
    missing = [m for m in missing if m != "masked_spec_embed"]
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model = Wav2Vec2PMOS(backbone)
    model.head.load_state_dict(head)
    out = Path(out)
    model.save_pretrained(out)
    (out / "mosaiq_pmos.json").write_text(json.dumps({"source": str(qama), "architecture": "wav2vec2+mean+linear"}, indent=2) + "\n")
    log.info("wrote %s (%d backbone tensors)", out, len(hf_sd))
    return out


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mosaiq convert-qama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qama", required=True, help="QAMA predictor state dict (qama_full.pt)")
    p.add_argument("--pretrain", default=None, help="fairseq wav2vec2 checkpoint (checkpoint_best.pt), if qama has no ssl_model.* keys")
    p.add_argument("--out", required=True, help="output folder (loads with --scorer wav2vec2 --model OUT)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default hidden/64, as wav2vec2 base/large)")
    p.add_argument("--layer-norm-first", action="store_true", help="the checkpoint is a pre-LN (large/XLS-R style) model")
    a = p.parse_args(argv)
    print(convert_qama(a.qama, a.out, a.pretrain, num_heads=a.num_heads, layer_norm_first=a.layer_norm_first))
    return 0
