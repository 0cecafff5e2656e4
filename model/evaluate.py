"""Evaluate a QA-MDT checkpoint: `mosaiq evaluate --checkpoint CKPT --prompts-file P.txt
--reference DIR --clap-path CLAP`.

Generates audio for every prompt (model.generate), then reports
- CLAP score: the mean cosine similarity of each generation with its own prompt;
- FAD: the Frechet distance between Gaussians fitted to embeddings of the generations and of
  the reference audio. The embedding is pluggable: CLAP audio embeddings by default, or any
  local model given as `package.module:factory` (factory() returns a callable
  `(waves: list of mono float arrays, sample_rate) -> (N, D) array`).
Also the helpers the trainer uses for validation loss and sample audio during training.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio

from jobs.config import from_dict
from model.generate import GenerateConfig, main as generate, read_prompts, to_clap_rate
from pipeline import fs

log = logging.getLogger(__name__)

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")
REPORT = "evaluation.json"

# an audio embedding: (mono waves, their sample rate) -> (N, D)
Embedding = Callable[[Sequence[np.ndarray], int], np.ndarray]


@dataclass(frozen=True)
class EvaluateConfig:
    """What to generate, what to compare it with, and which models score it."""

    checkpoint: str = ""
    prompts_file: str = ""  # one prompt a line
    reference: str = ""  # a folder of reference audio (searched recursively)
    out_dir: str = "out/evaluate"  # generations and evaluation.json
    clap_backend: Literal["laion", "hf"] = "hf"
    clap_path: str = ""  # laion .pt or transformers CLAP folder, local
    clap_text_folder: str | None = None
    embedding: str = "clap"  # "clap", or "package.module:factory" for FAD
    quality: int = 5
    num_per_prompt: int = 1
    candidates: int = 1
    batch_size: int = 4
    seed: int = 0
    seconds: float | None = None
    ddim_steps: int | None = None
    guidance_scale: float | None = None
    ddim_eta: float | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2) of two embedding sets (N, D), (M, D)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FAD needs at least 2 embeddings on each side, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((Ca Cb)^1/2) = sum of sqrt(eigenvalues of Ca^1/2 Cb Ca^1/2), a symmetric PSD matrix
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cb @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)


class ClapEmbedding:
    """CLAP audio embeddings (model.clap) as an `Embedding`."""

    def __init__(self, clap):
        self.clap = clap

    def __call__(self, waves: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
        at48 = [to_clap_rate(np.asarray(w, dtype=np.float32)[None], sample_rate)[0] for w in waves]
        return self.clap.embed_audio(at48, [str(i) for i in range(len(at48))])  # (N, D)


def load_embedding(spec: str, clap) -> Embedding:
    """"clap" -> the CLAP's audio tower; "package.module:factory" -> factory()."""
    if spec == "clap":
        return ClapEmbedding(clap)
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"embedding {spec!r}: expected 'clap' or 'package.module:factory'")
    return getattr(importlib.import_module(module), name)()


def read_audio_folder(folder: str | Path) -> tuple[list[np.ndarray], list[int]]:
    """Every audio file under `folder`, sorted, as mono float32 waves and their rates."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in AUDIO_EXTS)
    if not paths:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTS)}) under {str(folder)!r}")
    waves, rates = [], []
    for p in paths:
        w, sr = sf.read(str(p), dtype="float32", always_2d=True)
        waves.append(w.mean(axis=1))
        rates.append(sr)
    return waves, rates


def embed_at(embed: Embedding, waves: list[np.ndarray], rates: list[int], rate: int) -> np.ndarray:
    """Embed waves after resampling each to `rate`."""
    same = [w if sr == rate else torchaudio.functional.resample(torch.from_numpy(w), sr, rate).numpy() for w, sr in zip(waves, rates)]
    return np.asarray(embed(same, rate))


def main(cfg: EvaluateConfig, clap=None, embed: Embedding | None = None) -> dict:
    """Generate, score and write `out_dir/evaluation.json`; returns the report."""
    from model.clap import load_clap, similarity

    # 1. the scorers, from local files (or given)
    if clap is None:
        if not cfg.clap_path:
            raise ValueError("evaluate needs a CLAP for the CLAP score: set clap_path")
        clap = load_clap(cfg.clap_backend, cfg.clap_path, cfg.clap_text_folder, seed=cfg.seed)
    embed = embed or load_embedding(cfg.embedding, clap)
    prompts = read_prompts(GenerateConfig(prompts_file=cfg.prompts_file))

    # 2. generate
    out = Path(cfg.out_dir)
    gen = GenerateConfig(
        checkpoint=cfg.checkpoint, prompts=tuple(prompts), quality=cfg.quality, out=str(out / "gen.wav"),
        num_per_prompt=cfg.num_per_prompt, batch_size=cfg.batch_size, seed=cfg.seed, seconds=cfg.seconds,
        ddim_steps=cfg.ddim_steps, guidance_scale=cfg.guidance_scale, ddim_eta=cfg.ddim_eta, device=cfg.device,
        candidates=cfg.candidates,
    )
    paths = generate(gen, clap=clap)
    jobs = [p for p in prompts for _ in range(cfg.num_per_prompt)]
    waves, rates = zip(*[(w.mean(axis=1), sr) for w, sr in (sf.read(str(p), dtype="float32", always_2d=True) for p in paths)])

    # 3. CLAP score of each generation against its prompt; FAD against the reference
    audio = clap.embed_audio([to_clap_rate(w[None], sr)[0] for w, sr in zip(waves, rates)], [str(i) for i in range(len(waves))])
    per_clip = similarity(audio, clap.embed_text(jobs))[np.arange(len(jobs)), np.arange(len(jobs))]
    ref_waves, ref_rates = read_audio_folder(cfg.reference)
    rate = rates[0]
    fad = frechet_distance(embed_at(embed, list(waves), list(rates), rate), embed_at(embed, ref_waves, ref_rates, rate))
    report = {
        "checkpoint": cfg.checkpoint, "prompts": len(prompts), "generated": len(paths), "reference": len(ref_waves),
        "clap_score": float(per_clip.mean()), "clap_scores": [float(x) for x in per_clip],
        "fad": fad, "embedding": cfg.embedding, "config": dataclasses.asdict(cfg),
        "files": [str(p) for p in paths],
    }
    from pipeline.fs import atomic_write_text

    atomic_write_text(out / REPORT, json.dumps(report, indent=2, sort_keys=True))
    log.info("CLAP score %.4f, FAD %.4f over %d generations, %d references", report["clap_score"], fad, len(paths), len(ref_waves))
    return report


# --- during training ------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, inputs, diffusion, batches, seed: int, autocast: bool = False) -> float:
    """Eps-MSE (with the run's loss weighting) over `batches`, at timesteps and noise from
    `seed` and without masking: the same number at every evaluation of the same weights.
    `inputs(batch)` gives a batch's latents, text states and mask (model.train.ModelInputs)."""
    from model.data import QUALITY

    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for batch in batches:
        device = next(model.parameters()).device
        x0, y, m = inputs(batch)  # (B, C, T, F), (B, S, E), (B, S)
        t = torch.randint(0, diffusion.cfg.num_steps, (x0.shape[0],), generator=g).to(device)  # (B,)
        noise = torch.randn(x0.shape, generator=g).to(device)  # (B, C, T, F)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            eps = model(diffusion.q_sample(x0, t, noise), t, batch[QUALITY].to(device), y.float(), m)  # (B, C, T, F)
        per = ((eps.float() - noise) ** 2).flatten(1).mean(1)  # (B,)
        total += (diffusion.loss_weights(t) * per).sum().item()
        n += len(per)
    model.train(was_training)
    return total / max(n, 1)


@torch.no_grad()
def write_samples(model, rep, text, diffusion, prompts: Sequence[str], quality: int, latent_shape, num_samples: int,
                  folder: Path, step: int, seed: int, ddim_steps: int) -> list[Path]:
    """A few generations with `model` (the EMA weights) written as step-NNNNNNNNN_i.wav."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    y, m = text(list(prompts))  # (P, S, E), (P, S)
    null_y, null_m = text([""])  # (1, S0, E), (1, S0)
    q = torch.full((len(prompts),), quality, device=device, dtype=torch.long)  # (P,)
    z = diffusion.ddim_sample(model, (len(prompts), *latent_shape), q, y.float(), m, null_y.float(), null_m,
                              generator=torch.Generator().manual_seed(seed), steps=ddim_steps)  # (P, C, T', F')
    waves = rep.decode(z, num_samples).cpu().numpy()  # (P, S)
    paths = []
    for i, w in enumerate(waves):
        path = folder / f"step-{step:09d}_{i}.wav"  # local or in object storage
        peak = float(np.abs(w).max()) if np.isfinite(w).all() else 0.0
        with fs.atomic_target(path) as tmp:
            sf.write(str(tmp), (w / peak * 0.95 if peak > 1.0 else np.nan_to_num(w)).astype(np.float32),
                     rep.cfg.mel.sample_rate, subtype="PCM_16", format="WAV")
        paths.append(path)
    model.train(was_training)
    return paths


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mosaiq evaluate", description="CLAP score and FAD of a QA-MDT checkpoint's generations")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompts-file", required=True, help="one prompt a line")
    p.add_argument("--reference", required=True, help="folder of reference audio for FAD")
    p.add_argument("--out-dir")
    p.add_argument("--clap-backend", choices=["laion", "hf"])
    p.add_argument("--clap-path", required=True, help="laion .pt checkpoint or transformers CLAP folder, local")
    p.add_argument("--clap-text-folder", help="laion: the roberta-style text folder")
    p.add_argument("--embedding", help="FAD embedding: 'clap' (default) or 'package.module:factory'")
    p.add_argument("--quality", type=int)
    p.add_argument("--num-per-prompt", type=int)
    p.add_argument("--candidates", type=int, help="best of N by the CLAP (the official code: 3)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--steps", type=int, dest="ddim_steps")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--eta", type=float, dest="ddim_eta")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    a = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    report = main(from_dict(EvaluateConfig, a, where="evaluate"))
    print(json.dumps({k: report[k] for k in ("clap_score", "fad", "generated", "reference")}))
    return 0
