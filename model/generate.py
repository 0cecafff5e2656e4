"""Generate audio from a QA-MDT checkpoint:
`mosaiq generate --checkpoint CKPT --prompt "..." --quality 5 --out x.wav`.

The checkpoint carries the model config, the representation and the train config (which
names the text encoder folder); any of the sampler settings can be overridden.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch

from jobs.config import from_dict
from model import checkpoint as ckpt
from model.diffusion import UNCOND_QUALITY, DiffusionConfig, GaussianDiffusion
from model.qamdt import QAMDTConfig, build_model
from model.representation import Representation, RepresentationConfig, seconds_to_samples
from model.text import FrozenTextEncoder, TextEncoderConfig
from schemas.tables import NUM_QUALITY_LEVELS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate and how; None means "as recorded in the checkpoint"."""

    checkpoint: str = ""
    prompts: tuple[str, ...] = ()
    quality: int = NUM_QUALITY_LEVELS
    out: str = "out.wav"  # with several outputs: out_000.wav, out_001.wav, ...
    num_per_prompt: int = 1
    batch_size: int = 4
    seed: int = 0
    seconds: float | None = None  # None: the training clip length
    ddim_steps: int | None = None
    guidance_scale: float | None = None
    ddim_eta: float | None = None  # 0: deterministic DDIM; 1: the official code's stochastic sampler
    uncond_quality: Literal["low", "medium"] | None = None
    weights: Literal["ema", "model"] = "ema"
    text_encoder: str | None = None  # overrides the folder recorded at training time
    vocoder: Literal["griffinlim", "hifigan"] | None = None
    vocoder_path: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("give at least one prompt")
        if not 1 <= self.quality <= NUM_QUALITY_LEVELS:
            raise ValueError(f"quality must be 1..{NUM_QUALITY_LEVELS}, got {self.quality}")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if self.num_per_prompt < 1 or self.batch_size < 1:
            raise ValueError(f"num_per_prompt {self.num_per_prompt} and batch_size {self.batch_size} must be >= 1")


def output_paths(out: str, n: int) -> list[Path]:
    p = Path(out)
    return [p] if n == 1 else [p.with_name(f"{p.stem}_{i:03d}{p.suffix or '.wav'}") for i in range(n)]


def main(cfg: GenerateConfig) -> list[Path]:
    """Generate every (prompt, repeat) in batches; returns the WAV paths written."""
    # 1. rebuild what the checkpoint was trained with
    meta = ckpt.read_metadata(cfg.checkpoint)
    train_cfg = meta[ckpt.TRAIN_CONFIG]
    rep_raw = dict(meta[ckpt.REPRESENTATION])
    if cfg.vocoder is not None:
        rep_raw.update(vocoder=cfg.vocoder, vocoder_path=cfg.vocoder_path)
    rep_cfg = from_dict(RepresentationConfig, rep_raw, where="representation")
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if want_cuda else "cpu")
    rep = Representation(rep_cfg).to(device)
    text_cfg = from_dict(TextEncoderConfig, train_cfg["text"], where="text")
    if cfg.text_encoder:
        text_cfg = dataclasses.replace(text_cfg, path=cfg.text_encoder)
    text = FrozenTextEncoder(text_cfg).to(device)
    model = build_model(from_dict(QAMDTConfig, meta[ckpt.MODEL_CONFIG], where="model_config"))
    model.load_state_dict(ckpt.read_group(cfg.checkpoint, cfg.weights))
    model.to(device).eval()
    dcfg = from_dict(DiffusionConfig, train_cfg["diffusion"], where="diffusion")
    overrides = {"ddim_steps": cfg.ddim_steps, "guidance_scale": cfg.guidance_scale, "uncond_quality": cfg.uncond_quality,
                 "ddim_eta": cfg.ddim_eta}
    dcfg = dataclasses.replace(dcfg, **{k: v for k, v in overrides.items() if v is not None})
    diffusion = GaussianDiffusion(dcfg)

    # 2. shapes: the latent covers the requested length, the wave is cut to it exactly
    seconds = cfg.seconds or train_cfg["data"]["clip_seconds"]
    frames = int(np.ceil(seconds * rep_cfg.mel.sample_rate / rep_cfg.mel.hop_length))
    dt, _ = rep.autoencoder.downsample
    latent_t = int(np.ceil(frames / dt))
    latent_f = meta[ckpt.MODEL_CONFIG]["freq_size"]
    num_samples = seconds_to_samples(seconds, rep_cfg.mel.sample_rate)
    null_y, null_m = text([""])  # (1, S0, E), (1, S0)
    jobs = [p for p in cfg.prompts for _ in range(cfg.num_per_prompt)]
    paths = output_paths(cfg.out, len(jobs))
    generator = torch.Generator().manual_seed(cfg.seed)  # the diffusion noise
    torch.manual_seed(cfg.seed)  # everything else random (Griffin-Lim's initial phase)

    # 3. batched DDIM with quality-aware guidance, then decode and write
    for start in range(0, len(jobs), cfg.batch_size):
        prompts = jobs[start : start + cfg.batch_size]
        y, y_mask = text(prompts)  # (B, S, E), (B, S)
        q = torch.full((len(prompts),), cfg.quality, device=device, dtype=torch.long)  # (B,)
        shape = (len(prompts), rep.latent_channels, latent_t, latent_f)
        z = diffusion.ddim_sample(model, shape, q, y, y_mask, null_y, null_m, generator=generator)  # (B, C, T', F')
        wave = rep.decode(z, num_samples).cpu().numpy()  # (B, S)
        for i, w in enumerate(wave):
            path = paths[start + i]
            path.parent.mkdir(parents=True, exist_ok=True)
            peak = float(np.abs(w).max())
            if not np.isfinite(w).all():
                raise FloatingPointError(f"generated audio for {prompts[i]!r} is not finite")
            sf.write(str(path), (w / peak * 0.95 if peak > 1.0 else w).astype(np.float32), rep_cfg.mel.sample_rate, subtype="PCM_16")
            log.info("wrote %s (%.2f s) for %r at quality %d", path, len(w) / rep_cfg.mel.sample_rate, prompts[i], cfg.quality)
    return paths


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mosaiq generate", description="generate audio with a QA-MDT checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--quality", type=int, help=f"quality level 1..{NUM_QUALITY_LEVELS} (default {NUM_QUALITY_LEVELS})")
    p.add_argument("--out", help="output WAV (several outputs get _000, _001, ...)")
    p.add_argument("--num-per-prompt", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--seconds", type=float, help="length of the audio (default: the training clip length)")
    p.add_argument("--steps", type=int, dest="ddim_steps", help="DDIM steps")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--eta", type=float, dest="ddim_eta", help="DDIM eta (0 deterministic, 1 as the official code)")
    p.add_argument("--uncond-quality", choices=sorted(UNCOND_QUALITY))
    p.add_argument("--weights", choices=["ema", "model"])
    p.add_argument("--text-encoder", help="local text encoder folder, if not where training found it")
    p.add_argument("--vocoder", choices=["griffinlim", "hifigan"])
    p.add_argument("--vocoder-path", help="SpeechT5HifiGan folder for --vocoder hifigan")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    a = vars(p.parse_args(argv))
    a["prompts"] = tuple(a.pop("prompt"))
    cfg = from_dict(GenerateConfig, {k: v for k, v in a.items() if v is not None}, where="generate")
    paths = main(cfg)
    print(json.dumps([str(x) for x in paths]))
    return 0
