"""Train QA-MDT on mosaiq shards: `mosaiq train --config jobs/train.yaml`.

`main(cfg)` trains in this process (`ray_workers: 0`) or through Ray Train's `TorchTrainer`
(DDP; NCCL on GPUs, gloo on CPUs) with `ray_workers` workers. Every random draw of a step is
seeded from (seed, step, rank) and the shard stream can start at any batch, so a run resumed
from a checkpoint continues exactly as an uninterrupted one would.

Shards from `mosaiq encode` (model/preencoded.py) carry each sample's latent and text states;
the trainer then reads those and runs neither the autoencoder nor the text encoder per step,
after checking that they were made with this config's representation and text encoder.

The shards (`data.shards`, `val_shards`) and `output_dir` may be local or in object storage
(`s3://bucket/run`, `gs://...`): everything there goes through `pipeline.fs`. Checkpoints are
uploaded once complete, and a resume reads the newest one from the bucket.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
import random
import time
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from jobs.config import from_dict, load, save_resolved, to_dict
import numpy as np
import torch.nn.functional as F

from model import checkpoint as ckpt
from model import preencoded as P
from model.data import (
    AUDIO, LATENT, PROMPTS, QUALITY, TEXT, TEXT_MASK, DataConfig, ShardStream, pre_encoded_info, shards_folder,
    webdataset_url,
)
from model.diffusion import QUALITY_HIGH, DiffusionConfig, GaussianDiffusion, drop_mask
from model.evaluate import validation_loss, write_samples
from model.qamdt import PRESETS, QAMDTConfig, build_model, preset_table
from model.representation import Representation, RepresentationConfig, seconds_to_samples
from model.text import FrozenTextEncoder, TextEncoderConfig
from pipeline import fs

log = logging.getLogger(__name__)

STATS_GLOB = "*stats*.json"  # the quality-stats JSON that the export stage puts beside the shards
CHECKPOINT_DIR = "checkpoints"
RESOLVED_CONFIG = "train_config.json"
SAMPLES_DIR = "samples"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to a constant rate, gradient clipping and EMA."""

    lr: float = 8e-5  # the official QA-MDT base learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 2000
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    ema_decay: float = 0.9999


@dataclass(frozen=True)
class TrainConfig:
    """A training job. `model` overrides fields of the preset's `QAMDTConfig`."""

    output_dir: str = "out/train"
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    max_steps: int = 100_000
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # rank 0, with the EMA weights: validation loss over val_batches batches of val_shards
    # (fixed timesteps and noise) every val_every steps, and samples for sample_prompts (DDIM,
    # sample_steps) into output_dir/samples every sample_every steps; 0 turns either off
    val_shards: str = ""
    val_every: int = 0
    val_batches: int = 2
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ("high quality, a calm piano melody",)
    sample_steps: int = 25
    resume: bool = True  # continue from the newest checkpoint in output_dir if there is one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True  # bf16 autocast (model, text encoder, autoencoder), on CUDA only
    tf32: bool = True  # TF32 matmuls and convolutions for what runs in fp32, on CUDA only
    compile: bool = False  # torch.compile the model (the mask ratio is then bucketed, see below)
    compile_backend: str = "inductor"  # torch.compile backend ("eager" traces only: CPU tests)
    mask_ratio_buckets: int = 8  # with compile: visible-token counts snapped to this many values
    ray_workers: int = 0  # 0: train in this process; n: Ray Train TorchTrainer with n workers
    ray_use_gpu: bool = False  # one GPU per Ray worker, NCCL (the CLI's --gpu)
    ray_address: str | None = None  # None: the running cluster or a new local one

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets are {sorted(PRESETS)}")
        if self.max_steps < 1 or self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("max_steps, log_every, checkpoint_every and keep_checkpoints must be >= 1")
        if self.ray_workers < 0:
            raise ValueError(f"ray_workers must be >= 0, got {self.ray_workers}")
        if self.val_every and not self.val_shards:
            raise ValueError(f"val_every {self.val_every} needs val_shards (a folder of shards held out from training)")
        if self.mask_ratio_buckets < 1:
            raise ValueError(f"mask_ratio_buckets must be >= 1, got {self.mask_ratio_buckets}")


def resolve_model_config(cfg: TrainConfig, rep: Representation, text_dim: int) -> QAMDTConfig:
    """The preset, the job's overrides, and the shapes fixed by the representation and text encoder."""
    _, freq = rep.latent_size(cfg.data.clip_seconds)
    derived = {"in_channels": rep.latent_channels, "freq_size": freq, "cond_dim": text_dim}
    for k, v in derived.items():
        if k in cfg.model and cfg.model[k] != v:
            raise ValueError(f"model.{k} is {cfg.model[k]!r} but the representation/text encoder fix it at {v!r}")
    return from_dict(QAMDTConfig, {**PRESETS[cfg.preset], **cfg.model, **derived}, where="model")


def quality_stats(shards: str) -> dict[str, Any]:
    """Every stats JSON beside the shards, by file name ({} when there is none)."""
    folder = shards_folder(shards)
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob(STATS_GLOB))}


def step_seed(*parts) -> int:
    from pipeline.fs import derive_seed

    return derive_seed(repr(parts)) % 2**63


def lr_at(step: int, o: OptimConfig) -> float:
    return o.lr * min(1.0, (step + 1) / max(1, o.warmup_steps))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """ema += (1 - d) (model - ema) over every parameter in one foreach kernel."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)


def make_train_loader(cfg: TrainConfig, rank: int, world_size: int, start_batch: int, device: torch.device):
    """`model.data.make_loader`'s stream, with pinned host memory when the model runs on CUDA."""
    stream = ShardStream(cfg.data, cfg.seed, rank, world_size, start_batch)
    n = cfg.data.num_workers
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=n, prefetch_factor=4 if n else None,
                                       pin_memory=device.type == "cuda")


class ModelInputs:
    """A batch -> the model's inputs: latents (B, C, T', F') times the latent scale, text states
    (B, S, E) and mask (B, S), with the prompts `dropped` replaced by the empty one. Audio
    batches go through the autoencoder and the text encoder; pre-encoded batches are used as
    they are (`empty`: the empty prompt's states (S0, E) beside the shards)."""

    def __init__(self, rep: Representation, text: FrozenTextEncoder | None, empty: torch.Tensor | None,
                 device: torch.device, autocast: bool):
        self.rep, self.text, self.empty, self.device, self.autocast = rep, text, empty, device, autocast

    def latents(self, batch: dict) -> torch.Tensor:
        if LATENT in batch:
            return batch[LATENT].to(self.device, non_blocking=True) * self.rep.latent_scale  # (B, C, T', F')
        return self.rep.encode(batch[AUDIO].to(self.device, non_blocking=True), autocast=self.autocast)  # (B, C, T', F')

    def __call__(self, batch: dict, dropped: list[bool] | None = None):
        dropped = dropped or [False] * len(batch[PROMPTS])
        x0 = self.latents(batch)  # (B, C, T', F')
        if LATENT in batch:
            y = batch[TEXT].to(self.device, non_blocking=True)  # (B, S, E)
            m = batch[TEXT_MASK].to(self.device, non_blocking=True)  # (B, S)
            return (x0, *with_empty_prompts(y, m, self.empty.to(self.device), dropped))
        if self.text is None:
            raise ValueError("these shards hold audio, not pre-encoded text states: set text.path (a text encoder folder)")
        prompts = ["" if d else p for d, p in zip(dropped, batch[PROMPTS])]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            y, m = self.text(prompts)  # (B, S, E), (B, S)
        return x0, y, m


def with_empty_prompts(y: torch.Tensor, m: torch.Tensor, empty: torch.Tensor, dropped: list[bool]):
    """Text states (B, S, E) and mask (B, S) with the `dropped` rows replaced by `empty` (S0, E)."""
    if not any(dropped):
        return y, m
    s = max(y.shape[1], len(empty))
    y = F.pad(y, (0, 0, 0, s - y.shape[1]))  # (B, S, E)
    m = F.pad(m, (0, s - m.shape[1]))  # (B, S)
    rows = torch.tensor(dropped, device=y.device)  # (B,)
    y[rows] = 0.0
    y[rows, : len(empty)] = empty.to(y.dtype)
    m[rows] = False
    m[rows, : len(empty)] = True
    return y, m


def load_pre_encoded(cfg: TrainConfig, data: DataConfig) -> dict | None:
    """The `encode_info.json` of `data`'s shards when they are read pre-encoded, checked against
    the training config (ValueError naming each difference); None for audio shards."""
    info = pre_encoded_info(data)
    if info is not None:
        P.check_matches(info, str(shards_folder(data.shards)), cfg.representation, cfg.text, data.clip_seconds)
    return info


def empty_prompt_states(data: DataConfig) -> torch.Tensor:
    """The empty prompt's text states (S0, E) that `mosaiq encode` wrote beside the shards."""
    path = shards_folder(data.shards) / P.EMPTY_TEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"pre-encoded shards lack {str(path)!r} (the empty prompt's text states); run `mosaiq encode` again")
    return torch.from_numpy(np.load(io.BytesIO(path.read_bytes()), allow_pickle=False).astype(np.float32))  # (S0, E)


def measured_latent_scale(z: torch.Tensor, world_size: int) -> float:
    """1 / std of the unscaled latents `z`, the variance averaged over every rank's batch."""
    z = z.double()  # (B, C, T', F')
    moments = torch.stack([z.mean(), (z * z).mean()])  # (2,): E[z], E[z^2]
    if world_size > 1:
        torch.distributed.all_reduce(moments)
        moments = moments / world_size
    return float(1.0 / (moments[1] - moments[0] ** 2).clamp(min=1e-12).sqrt())


def mask_ratio_for_step(model, cfg: TrainConfig, step: int) -> float | None:
    """The step's mask ratio, drawn from (seed, step) only: every DDP rank masks as many
    tokens, so no rank waits for a slower one; bucketed when the model is compiled."""
    if not cfg.diffusion.masked_training:
        return None
    u = random.Random(step_seed(cfg.seed, "mask", step)).random()
    return model.mask_ratio_at(u, cfg.mask_ratio_buckets if cfg.compile else 0)


def train_loop(cfg: TrainConfig, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
               report=None) -> dict[str, Any]:
    """Train on one rank (DDP when world_size > 1); returns {step, losses, checkpoint}."""
    # 1. device and the frozen parts
    if device is None:
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if want_cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    out = fs.location(cfg.output_dir)
    rep = Representation(cfg.representation).to(device)
    val_data = dataclasses.replace(cfg.data, shards=cfg.val_shards, random_crop=False) if cfg.val_every else None
    info = load_pre_encoded(cfg, cfg.data)  # None: the shards' audio is encoded every step
    val_info = load_pre_encoded(cfg, val_data) if val_data is not None else None
    # the text encoder is loaded only where something still needs it: audio shards, samples
    need_text = info is None or cfg.sample_every > 0 or (val_data is not None and val_info is None)
    text = FrozenTextEncoder(cfg.text).to(device) if need_text else None
    model_cfg = resolve_model_config(cfg, rep, text.dim if text is not None else int(info["text_dim"]))
    stats = quality_stats(cfg.data.shards)
    if info is not None:
        log.info("pre-encoded shards: %s latents and text states of %s (the autoencoder and text encoder do not run per step)",
                 info["latent_shape"], info["text"]["folder"])

    # 2. model, EMA, optimizer (same init on every rank)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                            fused=device.type == "cuda")
    log.info("QA-MDT %s: %.2fM parameters, %s", cfg.preset, sum(p.numel() for p in model.parameters()) / 1e6, model_cfg)

    # 3. resume
    step = 0
    found = ckpt.list_checkpoints(out / CHECKPOINT_DIR) if cfg.resume else []
    if found:
        with fs.local_file(found[-1]) as path:  # from object storage: downloaded once
            model.load_state_dict(ckpt.read_group(path, "model"))
            ema.load_state_dict(ckpt.read_group(path, "ema"))
            ckpt.load_optimizer(path, opt)
            meta = ckpt.read_metadata(path)
        step = int(meta[ckpt.TRAIN_STATE]["step"])
        rep.latent_scale = float(meta[ckpt.REPRESENTATION].get("latent_scale", rep.latent_scale))
        log.info("resumed from %s at step %d", found[-1], step)

    # 4. DDP and the data stream, started where the last run stopped
    if cfg.compile:
        model.compile_blocks(backend=cfg.compile_backend)
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not cfg.diffusion.masked_training,
        )
    diffusion = GaussianDiffusion(cfg.diffusion)
    batches = iter(make_train_loader(cfg, rank, world_size, step, device))
    autocast = device.type == "cuda" and cfg.bf16
    empty = empty_prompt_states(cfg.data) if info is not None else None
    inputs = ModelInputs(rep, text, empty, device, autocast)
    val_inputs = ModelInputs(rep, text, empty_prompt_states(val_data), device, autocast) if val_info is not None else inputs
    metadata = {
        ckpt.TRAIN_CONFIG: to_dict(cfg), ckpt.MODEL_CONFIG: dataclasses.asdict(model_cfg),
        ckpt.REPRESENTATION: to_dict(dataclasses.replace(cfg.representation, latent_scale=rep.latent_scale)),
        ckpt.QUALITY_STATS: stats, ckpt.PRE_ENCODED: info,
    }
    measure_scale = cfg.representation.scale_by_std and not found

    def val_batches():  # the same held-out batches at every evaluation
        return iter(make_train_loader(dataclasses.replace(cfg, data=val_data), 0, 1, 0, device))

    # 5. the loop; losses stay on the device until a log step (no host sync per step)
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    last_path = None
    t0, n0 = time.perf_counter(), step
    model.train()
    while step < cfg.max_steps:
        batch = next(batches)
        if measure_scale:  # AudioLDM's scale_by_std: 1 / std of the first batch's latents, over all ranks
            rep.latent_scale = 1.0
            rep.latent_scale = measured_latent_scale(inputs.latents(batch), world_size)
            metadata[ckpt.REPRESENTATION] = to_dict(dataclasses.replace(cfg.representation, latent_scale=rep.latent_scale))
            measure_scale = False
            log.info("latent scale %.6f (1 / std of the first batch's latents)", rep.latent_scale)
        torch.manual_seed(step_seed(cfg.seed, "step", step, rank))
        dropped = drop_mask(len(batch[PROMPTS]), cfg.diffusion.uncond_prob, random.Random(step_seed(cfg.seed, "drop", step, rank)))
        x0, y, y_mask = inputs(batch, dropped)  # (B, C, T, F), (B, S, E), (B, S)
        quality = batch[QUALITY].to(device, non_blocking=True)  # (B,)
        ratio = mask_ratio_for_step(model, cfg, step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = diffusion.training_loss(net, x0, quality, y.float(), y_mask, mask_ratio=ratio)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, o)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        update_ema(ema, model, step, o.ema_decay)
        step += 1
        pending.append(loss.detach())

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            window = torch.stack(pending).tolist()  # the one host sync of the window
            losses.extend(window)
            pending = []
            dt = time.perf_counter() - t0
            sps = (step - n0) * cfg.data.batch_size * world_size / max(dt, 1e-9)
            metrics = {"step": step, "loss": sum(window) / len(window), "samples_per_s": sps, "lr": lr_at(step - 1, o)}
            if rank == 0 and cfg.val_every and step % cfg.val_every == 0:
                metrics["val_loss"] = validation_loss(ema, val_inputs, diffusion, islice(val_batches(), cfg.val_batches),
                                                      step_seed(cfg.seed, "val"), autocast)
            if rank == 0:
                log.info("step %d loss %.4f  %.1f samples/s  lr %.2e%s", step, metrics["loss"], sps, metrics["lr"],
                         f"  val {metrics['val_loss']:.4f}" if "val_loss" in metrics else "")
            if report is not None:
                report(metrics)
            t0, n0 = time.perf_counter(), step
        if rank == 0 and cfg.sample_every and step % cfg.sample_every == 0:
            write_samples(ema, rep, text, diffusion, cfg.sample_prompts, QUALITY_HIGH, x0.shape[1:],
                          seconds_to_samples(cfg.data.clip_seconds), out / SAMPLES_DIR, step, cfg.seed, cfg.sample_steps)
        if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            metadata[ckpt.TRAIN_STATE] = {"step": step, "world_size": world_size, "samples_seen": step * cfg.data.batch_size * world_size}
            last_path = ckpt.save_checkpoint(out / CHECKPOINT_DIR / ckpt.checkpoint_name(step), model, ema, opt, metadata)
            for old in ckpt.list_checkpoints(out / CHECKPOINT_DIR)[: -cfg.keep_checkpoints]:
                old.unlink()
            log.info("saved %s", last_path)
    return {"step": step, "losses": losses, "checkpoint": str(last_path) if last_path else None}


def _ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config)
    ctx = ray.train.get_context()
    train_loop(cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), report=ray.train.report)


def run_ray(cfg: TrainConfig) -> dict[str, Any]:
    """Run `train_loop` on `cfg.ray_workers` Ray Train workers (DDP)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address)
    storage, storage_path = fs.arrow_filesystem(fs.join(cfg.output_dir, "ray"))  # Ray Train's own run state
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.ray_workers, use_gpu=cfg.ray_use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.ray_use_gpu else "gloo"),
        run_config=RunConfig(name="qamdt", storage_path=storage_path, storage_filesystem=storage,
                             worker_runtime_env={"env_vars": fs.storage_env()}),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    # Ray Train keeps only metrics reported with a Ray checkpoint; ours are written by rank 0
    found = ckpt.list_checkpoints(fs.join(cfg.output_dir, CHECKPOINT_DIR))
    if not found:
        raise RuntimeError(f"Ray Train run finished but wrote no checkpoint in {cfg.output_dir}/{CHECKPOINT_DIR}")
    step = int(ckpt.read_metadata(found[-1])[ckpt.TRAIN_STATE]["step"])
    return {"step": step, "checkpoint": str(found[-1])}


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute, so Ray workers (other working directories) find them; URLs
    (object storage, `pipe:`, http) stay as they are."""
    def ab(p):
        return str(Path(p).absolute()) if p else p

    def ab_url(p):
        return fs.absolute(p) if p and not webdataset_url(p) else p

    rep = cfg.representation
    return dataclasses.replace(
        cfg, output_dir=ab_url(cfg.output_dir),
        data=dataclasses.replace(cfg.data, shards=ab_url(cfg.data.shards)), val_shards=ab_url(cfg.val_shards),
        text=dataclasses.replace(cfg.text, path=ab(cfg.text.path)),
        representation=dataclasses.replace(rep, autoencoder_checkpoint=ab(rep.autoencoder_checkpoint), vocoder_path=ab(rep.vocoder_path)),
    )


def main(cfg: TrainConfig) -> dict[str, Any]:
    """Train; the resolved config is saved in output_dir and inside every checkpoint."""
    cfg = _absolute(cfg)
    fs.check_reachable(cfg.output_dir, "train output_dir")  # a missing bucket is named before any work
    save_resolved(cfg, fs.join(cfg.output_dir, RESOLVED_CONFIG))
    if cfg.ray_workers > 0:
        return run_ray(cfg)
    return train_loop(cfg)


def format_presets() -> str:
    """The preset table with parameter counts, as `mosaiq train --list-presets` prints it."""
    lines = [f"{'preset':<7} {'hidden':>6} {'depth':>5} {'heads':>5} {'decoder':>7} {'adaLN-Zero':>11} {'adaLN-single':>12}"]
    for r in preset_table():
        lines.append(f"{r['preset']:<7} {r['hidden_size']:>6} {r['depth']:>5} {r['num_heads']:>5} {r['decode_layers']:>7} "
                     f"{r['params_adaln_zero'] / 1e6:>10.1f}M {r['params_adaln_single'] / 1e6:>11.1f}M")
    lines.append("parameters at the paper's shapes: 8 x 256 x 16 KL latent, patch 4 x 1, 1024-d text states")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    if "--list-presets" in argv:
        print(format_presets())
        return 0
    p = argparse.ArgumentParser(prog="mosaiq train", description="train QA-MDT on mosaiq shards")
    p.add_argument("--list-presets", action="store_true", help="print the model presets with their parameter counts and exit")
    p.add_argument("--config", help="job YAML (jobs/train.yaml, jobs/train-qamdt-official.yaml); its keys are TrainConfig's fields")
    p.add_argument("--shards", help="folder of .tar shards or a brace pattern (data.shards), local or s3:// / gs://")
    p.add_argument("--output-dir", help="where checkpoints and the resolved config go, local or s3:// / gs://")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size (--list-presets prints their parameter counts)")
    p.add_argument("--text-encoder", help="local transformers folder of the frozen text encoder (text.path)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--ray-workers", type=int, help="0: this process; n: Ray Train with n workers")
    p.add_argument("--gpu", action="store_true", default=None,
                   help="train on CUDA: one GPU per Ray worker (NCCL) with --ray-workers, else this process's GPU")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--seed", type=int)
    a = p.parse_args(argv)
    base = load(TrainConfig, a.config, preset=a.preset, output_dir=a.output_dir, max_steps=a.max_steps,
                ray_workers=a.ray_workers, seed=a.seed, compile=a.compile,
                ray_use_gpu=a.gpu, device="cuda" if a.gpu else None)
    cfg = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, shards=a.shards or base.data.shards),
        text=dataclasses.replace(base.text, path=a.text_encoder or base.text.path),
    )
    result = main(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, default=str))
    return 0
