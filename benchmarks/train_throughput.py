"""Training samples/s of a QA-MDT preset vs samples/s the shard loader delivers, in one run.

    .venv/bin/python benchmarks/train_throughput.py                    # small preset, CPU
    .venv/bin/python benchmarks/train_throughput.py --preset base --device cuda   # + bf16 MFU
    .venv/bin/python benchmarks/train_throughput.py --per-clip         # loader cost per clip only

Without --shards it writes synthetic 10.24 s shards (mosaiq layout) into a temporary folder.
The trainer is timed on real steps (mel front end, masked forward, backward, AdamW) with text
states of a fixed length in place of a text encoder; the loader is timed decoding FLAC and
cropping, with its worker processes. Target: loader / trainer >= 3.

`--per-clip` times the loader in this process (no workers) per clip for three kinds of shard:
44.1 kHz stereo FLAC (export at the source rate: decoded, mixed down and resampled per clip),
16 kHz mono FLAC (`export.sample_rate: 16000`, `export.mono: true`: decoded only) and
`mosaiq encode` output (8 x 256 x 16 latent and 32 x 1024 text states: nothing decoded).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import preencoded as P  # noqa: E402
from model.data import AUDIO, PROMPTS, DataConfig, ShardStream, make_loader  # noqa: E402
from model.diffusion import DiffusionConfig, GaussianDiffusion  # noqa: E402
from model.qamdt import build_model, model_config  # noqa: E402
from model.representation import CLIP_SECONDS, SAMPLE_RATE, Representation, RepresentationConfig  # noqa: E402
from schemas import shard as S  # noqa: E402

# dense (not sparse) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, matched in this
# order against torch.cuda.get_device_name (most specific first; "H100 80GB HBM3" is the SXM card)
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5
    ("H200 NVL", 835.0),
    ("H200", 989.4),  # SXM, and GH200
    ("A100", 312.0),  # SXM4 and PCIe
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name, None when it is not in the table."""
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


def write_shards(folder: Path, n: int, seconds: float, seed: int = 0, rate: int = SAMPLE_RATE, channels: int = 1,
                 encoded: tuple[tuple[int, ...], int] | None = None) -> None:
    """`n` tone clips as mosaiq shards; `encoded` = (latent shape, text length) adds random
    pre-encoded members of those shapes (1024-d text) and an encode_info.json."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=16, verbose=0) as sink:
        for i in range(n):
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.standard_normal(len(t))
            buf = io.BytesIO()
            sf.write(buf, np.repeat(wave[:, None], channels, axis=1).astype(np.float32), rate, format="FLAC")
            meta = {S.PROMPT: f"a tone number {i}", S.QUALITY_LEVEL: int(i % 5) + 1}
            sample = {"__key__": f"c{i:06d}", S.AUDIO_EXT: buf.getvalue(), S.JSON_EXT: json.dumps(meta).encode()}
            if encoded is not None:
                for ext, shape in ((P.LATENT_EXT, encoded[0]), (P.TEXT_EXT, (encoded[1], 1024))):
                    arr = io.BytesIO()
                    np.save(arr, rng.standard_normal(shape).astype(np.float32), allow_pickle=False)
                    sample[ext] = arr.getvalue()
            sink.write(sample)
    if encoded is not None:  # what the loader reads of it: the shapes
        info = {"format_version": P.FORMAT_VERSION, "complete": True, "latent_shape": list(encoded[0]), "text_dim": 1024}
        (folder / P.INFO_FILE).write_text(json.dumps(info))


def time_per_clip(n: int = 32, repeats: int = 3) -> dict[str, float]:
    """Median over `repeats` of the milliseconds per clip the loader spends in this process, by
    kind of shard (see the docstring); the first batch of each pass (opening, warm-up) is not timed."""
    kinds = {
        "44.1 kHz stereo FLAC (resampled)": dict(rate=44_100, channels=2),
        "16 kHz mono FLAC (no resampling)": dict(rate=SAMPLE_RATE, channels=1),
        "pre-encoded (nothing decoded)": dict(encoded=((8, 256, 16), 32)),
    }
    out = {}
    for name, kw in kinds.items():
        with tempfile.TemporaryDirectory() as tmp:
            write_shards(Path(tmp), n=n, seconds=CLIP_SECONDS, **kw)
            cfg = DataConfig(shards=tmp, batch_size=4, num_workers=0, shuffle_buffer=8)
            times = []
            for _ in range(repeats):
                it = iter(ShardStream(cfg, seed=0))
                next(it)  # the shard opened, the first batch made
                t0 = time.perf_counter()
                clips = sum(len(next(it)[PROMPTS]) for _ in range(n // 4 - 2))
                times.append(1000 * (time.perf_counter() - t0) / clips)
            out[name] = sorted(times)[len(times) // 2]
    return out


def forward_flops(cfg, tokens: int, visible: int | None, text_len: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one sample's forward pass: `tokens` patches, of which
    `visible` reach the encoder (None: unmasked), `text_len` text states. Counts every linear
    layer (embedders, adaLN, attention, the long-skip linears, MLP, output) and the attention
    products; norms, activations and RoPE are left out."""
    d, hid, s_ = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio), text_len
    patch = cfg.in_channels * cfg.patch_size[0] * cfg.patch_size[1]
    half = (cfg.depth - cfg.decode_layers) // 2
    zero = cfg.adaln == "zero"

    def block(n: int, skip: bool) -> float:
        f = 2 * n * (3 * d * d + d * d) + 4 * n * n * d  # self-attention: qkv, proj; QK^T and AV
        f += 2 * n * 2 * d * d + 2 * s_ * 2 * d * d + 4 * n * s_ * d  # cross: q, proj; kv of the text; products
        f += 2 * n * 2 * d * hid  # MLP
        f += 2 * n * 2 * d * d if skip else 0  # long-skip linear over [x, skip]
        f += 2 * d * 6 * d if zero else 0  # per-block adaLN-Zero modulation (once per sample)
        return f

    n_enc = 1 + (tokens if visible is None else visible)  # quality prefix + visible tokens
    f = 2 * tokens * patch * d + 2 * (256 * d + d * d) + 2 * s_ * cfg.cond_dim * d  # x, t and y embedders
    f += 0 if zero else 2 * d * 6 * d  # the shared adaLN-single MLP
    f += half * block(n_enc, False) + half * block(n_enc, True)  # encoder in / out blocks
    f += block(1 + tokens, False) if visible is not None else 0  # side interpolator (masked path only)
    f += cfg.decode_layers * block(1 + tokens, True)  # decoder blocks
    f += (2 * d * 2 * d if zero else 0) + 2 * tokens * d * patch  # final layer
    return float(f)


def flops_per_sample(cfg, tokens: int, text_len: int) -> float:
    """Training FLOPs of one sample (forward + backward = 3 x forward) at the mean mask ratio."""
    visible = int(tokens * (1 - cfg.mask_ratio - cfg.mask_ratio_jitter / 2))
    return 3.0 * forward_flops(cfg, tokens, visible, text_len)


def time_trainer(args, device) -> tuple[float, float]:
    rep = Representation(RepresentationConfig()).to(device)
    T, F = rep.latent_size(CLIP_SECONDS)
    cfg = model_config(args.preset, in_channels=1, freq_size=F, cond_dim=args.text_dim, patch_size=(16, 4), adaln=args.adaln)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    if device.type == "cuda":  # as the trainer: TF32 for what stays fp32, fused AdamW
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.compile:
        model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    diff = GaussianDiffusion(DiffusionConfig())
    wave = torch.randn(args.batch_size, int(CLIP_SECONDS * SAMPLE_RATE), device=device) * 0.1
    y = torch.randn(args.batch_size, args.text_len, args.text_dim, device=device)
    m = torch.ones(args.batch_size, args.text_len, dtype=torch.bool, device=device)
    q = torch.randint(1, 6, (args.batch_size,), device=device)
    amp = device.type == "cuda"

    def step():
        x0 = rep.encode(wave, autocast=amp)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = diff.training_loss(model, x0, q, y, m, mask_ratio=model.mask_ratio_at(0.5))  # the mean ratio
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    if amp:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if amp:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    if args.profile:
        print_profile(step, device, rows=args.profile)
    tokens = model.patchifier.patchify(torch.zeros(1, 1, T, F)).shape[1]
    return args.batch_size / dt, dt, flops_per_sample(cfg, tokens, args.text_len) * args.batch_size / dt


def print_profile(step, device, rows: int, steps: int = 2) -> None:
    """The `rows` operators that take the most device time (CPU time on a CPU) over `steps`
    more steps, from torch.profiler: where a step's time goes, for the next optimisation."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def time_loader(args, shards: str) -> float:
    cfg = DataConfig(shards=shards, batch_size=args.batch_size, num_workers=args.num_workers, shuffle_buffer=64)
    it = iter(make_loader(cfg, seed=0))
    next(it)  # workers started, first batch decoded
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.loader_batches):
        n += next(it)[AUDIO].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--shards", help="folder of shards (default: synthetic ones in a temporary folder)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loader-batches", type=int, default=24, help="batches the loader is timed on (0: trainer only)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--adaln", choices=["zero", "single"], default="zero")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, print the ROWS operators taking the most device time over two more steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--per-clip", action="store_true", help="only time the loader per clip by kind of shard")
    args = p.parse_args()
    if args.per_clip:
        for name, ms in time_per_clip().items():
            print(f"loader, one process: {ms:7.2f} ms/clip  {name}")
        return
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            write_shards(Path(tmp), n=64, seconds=CLIP_SECONDS)
            shards = tmp
        loader_sps = time_loader(args, shards) if args.loader_batches else None
        train_sps, step_s, flops_s = time_trainer(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}")
    how = f"adaLN-{args.adaln}{', compiled' if args.compile else ''}"
    print(f"trainer  {args.preset} ({how}): {train_sps:8.2f} samples/s  ({step_s * 1000:.0f} ms/step, batch {args.batch_size}, 10.24 s clips)")
    if loader_sps is not None:
        print(f"loader ({args.num_workers} workers): {loader_sps:8.2f} samples/s")
        print(f"ratio loader/trainer: {loader_sps / train_sps:.1f}  (target >= 3)")
    if device.type == "cuda":
        peak = peak_tflops(name)
        mfu = f"{100 * flops_s / (peak * 1e12):.1f}%" if peak else "unknown peak"
        gib = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"model FLOP/s (bf16): {flops_s / 1e12:.1f} TFLOP/s, MFU {mfu}, peak memory {gib:.1f} GiB")


if __name__ == "__main__":
    main()
