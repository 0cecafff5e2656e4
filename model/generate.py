"""Generate audio from a QA-MDT checkpoint:
`mosaiq generate --checkpoint CKPT --prompt "..." --quality 5 --out x.wav`.

The checkpoint carries the model config, the representation and the train config (which
names the text encoder folder); any of the sampler settings can be overridden. Prompts come
from --prompt or a file (one a line); with --candidates N each output is the best of N
generations by a given CLAP's text-audio similarity (the official code: 3 candidates).
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
import torchaudio

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
    prompts_file: str | None = None  # one prompt a line (blank lines skipped), after `prompts`
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
    bf16: bool = False  # bf16 autocast for the denoiser
    candidates: int = 1  # generations per output; > 1 keeps the one the CLAP scores best
    clap_backend: Literal["laion", "hf"] = "hf"  # model.clap backends, local files only
    clap_path: str | None = None
    clap_text_folder: str | None = None  # laion: the roberta-style text folder

    def __post_init__(self):
        if not self.prompts and not self.prompts_file:
            raise ValueError("give at least one prompt (prompts or prompts_file)")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if not 1 <= self.quality <= NUM_QUALITY_LEVELS:
            raise ValueError(f"quality must be 1..{NUM_QUALITY_LEVELS}, got {self.quality}")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if self.num_per_prompt < 1 or self.batch_size < 1:
            raise ValueError(f"num_per_prompt {self.num_per_prompt} and batch_size {self.batch_size} must be >= 1")


def output_paths(out: str, n: int) -> list[Path]:
    p = Path(out)
    return [p] if n == 1 else [p.with_name(f"{p.stem}_{i:03d}{p.suffix or '.wav'}") for i in range(n)]


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {cfg.prompts_file!r} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {cfg.prompts_file!r} has no prompts")
    return prompts


def to_clap_rate(waves: np.ndarray, sample_rate: int) -> list[np.ndarray]:
    """(N, S) at `sample_rate` -> mono waves at CLAP's 48 kHz."""
    from model.clap import SAMPLE_RATE as CLAP_RATE

    x = torchaudio.functional.resample(torch.from_numpy(np.asarray(waves, dtype=np.float32)), sample_rate, CLAP_RATE)
    return list(x.numpy())


def rerank(waves: np.ndarray, prompts: list[str], candidates: int, sample_rate: int, clap) -> tuple[np.ndarray, np.ndarray]:
    """Keep, for each prompt, the best of its `candidates` consecutive waves by CLAP similarity.
    waves (P * candidates, S) -> (P, S), and the kept scores (P,)."""
    from model.clap import similarity

    audio = clap.embed_audio(to_clap_rate(waves, sample_rate), [str(i) for i in range(len(waves))])  # (P*K, D)
    text = clap.embed_text(prompts)  # (P, D)
    scores = similarity(audio, text)  # (P*K, P)
    own = scores[np.arange(len(waves)), np.repeat(np.arange(len(prompts)), candidates)].reshape(len(prompts), candidates)
    best = own.argmax(1)  # (P,)
    return waves.reshape(len(prompts), candidates, -1)[np.arange(len(prompts)), best], own.max(1)


def main(cfg: GenerateConfig, clap=None) -> list[Path]:
    """Generate every (prompt, repeat) in batches, best of `candidates` by `clap` (or the
    configured CLAP); returns the WAV paths written."""
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
    jobs = [p for p in read_prompts(cfg) for _ in range(cfg.num_per_prompt)]
    items = [p for p in jobs for _ in range(cfg.candidates)]  # each job's candidates side by side
    paths = output_paths(cfg.out, len(jobs))
    if cfg.candidates > 1 and clap is None:
        if not cfg.clap_path:
            raise ValueError(f"candidates {cfg.candidates} needs a CLAP to rerank them: set clap_path")
        from model.clap import load_clap

        clap = load_clap(cfg.clap_backend, cfg.clap_path, cfg.clap_text_folder, seed=cfg.seed, device=str(device))
    generator = torch.Generator().manual_seed(cfg.seed)  # the diffusion noise
    torch.manual_seed(cfg.seed)  # everything else random (Griffin-Lim's initial phase)

    # 3. batched DDIM with quality-aware guidance, then decode, rerank and write
    waves = []
    for start in range(0, len(items), cfg.batch_size):
        prompts = items[start : start + cfg.batch_size]
        y, y_mask = text(prompts)  # (B, S, E), (B, S)
        q = torch.full((len(prompts),), cfg.quality, device=device, dtype=torch.long)  # (B,)
        shape = (len(prompts), rep.latent_channels, latent_t, latent_f)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            z = diffusion.ddim_sample(model, shape, q, y, y_mask, null_y, null_m, generator=generator)  # (B, C, T', F')
        waves.append(rep.decode(z.float(), num_samples).cpu().numpy())  # (B, S)
    wave = np.concatenate(waves)  # (P * K, S)
    if not np.isfinite(wave).all():
        raise FloatingPointError(f"generated audio is not finite (prompts {sorted(set(items))[:3]})")
    if cfg.candidates > 1:
        wave, scores = rerank(wave, jobs, cfg.candidates, rep_cfg.mel.sample_rate, clap)  # (P, S), (P,)
        log.info("kept the best of %d candidates by CLAP: scores %s", cfg.candidates, np.round(scores, 3).tolist())
    for path, w, prompt in zip(paths, wave, jobs):
        path.parent.mkdir(parents=True, exist_ok=True)
        peak = float(np.abs(w).max())
        sf.write(str(path), (w / peak * 0.95 if peak > 1.0 else w).astype(np.float32), rep_cfg.mel.sample_rate, subtype="PCM_16")
        log.info("wrote %s (%.2f s) for %r at quality %d", path, len(w) / rep_cfg.mel.sample_rate, prompt, cfg.quality)
    return paths


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mosaiq generate", description="generate audio with a QA-MDT checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", action="append", help="repeat for several prompts")
    p.add_argument("--prompts-file", help="a text file, one prompt a line")
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
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast for the denoiser")
    p.add_argument("--candidates", type=int, help="generate N per output and keep the CLAP's best (needs --clap-path)")
    p.add_argument("--clap-backend", choices=["laion", "hf"])
    p.add_argument("--clap-path", help="laion .pt checkpoint or transformers CLAP folder, local")
    p.add_argument("--clap-text-folder", help="laion: the roberta-style text folder")
    a = vars(p.parse_args(argv))
    a["prompts"] = tuple(a.pop("prompt") or ())
    cfg = from_dict(GenerateConfig, {k: v for k, v in a.items() if v is not None}, where="generate")
    paths = main(cfg)
    print(json.dumps([str(x) for x in paths]))
    return 0
