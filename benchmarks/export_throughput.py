"""Export throughput: shard writing through the Ray path vs FLAC encoding in one plain loop.

    python benchmarks/export_throughput.py [--clips 1000] [--seconds 10.24] [--num-cpus N]

Makes seeded synthetic source audio (stereo 44.1 kHz WAV, 16 clips per file) and a caption
table pointing at it, then, from one run:
1. the export's shard plan and one Ray task per shard on a running local Ray (Ray start-up is
   not timed, worker start-up is): MB of shards written per second;
2. the same clips decoded and encoded to FLAC one after another in a plain loop, with the
   same functions: MB of FLAC per second;
and the ratio. Both figures count the bytes written (tar bytes vs FLAC bytes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import export as E  # noqa: E402
from pipeline import fs  # noqa: E402
from pipeline import shards as W  # noqa: E402
from schemas import shard as S  # noqa: E402
from schemas import stats as Q  # noqa: E402
from schemas import tables as T  # noqa: E402

RATE = 44100
CHANNELS = 2
CLIPS_PER_FILE = 16


def make_input(root: Path, clips: int, seconds: float, seed: int) -> Path:
    """Source WAVs and a caption table of `clips` ok rows."""
    rng = np.random.default_rng(seed)
    stats = Q.make(count=clips, fit=None, mu=3.8, sigma=0.2, fixed=True, band_multipliers=(-2, -1, 1, 2),
                   prefix_low_below=-2, prefix_medium_within=1, prefix_high_above=2)
    rows, n_files = [], -(-clips // CLIPS_PER_FILE)
    frames = round(seconds * RATE) * CLIPS_PER_FILE
    t = np.arange(frames) / RATE
    for f in range(n_files):
        # a chord plus a little noise: compresses like music, not like silence or white noise
        freqs = 110 * 2 ** (rng.integers(0, 24, size=3) / 12)
        sig = sum(np.sin(2 * np.pi * fr * t + rng.random() * 6) for fr in freqs) / 4
        audio = np.stack([sig, np.roll(sig, 37)], axis=1) + 0.01 * rng.standard_normal((frames, CHANNELS))
        path = root / "audio" / f"src{f:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, audio.astype(np.float32), RATE, subtype="PCM_16")
        for c in range(min(CLIPS_PER_FILE, clips - f * CLIPS_PER_FILE)):
            level = int(rng.integers(1, 6))
            caption = f"a chord in {freqs[0]:.0f} Hz, clip {c}"
            rows.append({**T.blank_row(T.CAPTIONS_SCHEMA),
                T.CLIP_ID: f"bench{f:04d}{c:02d}", T.AUDIO_PATH: str(path), T.SOURCE_DIGEST: fs.file_digest(path),
                T.START_S: c * seconds, T.DURATION_S: seconds, T.SOURCE_DURATION_S: frames / RATE,
                T.SOURCE_SIZE_BYTES: None, T.SOURCE_MTIME_NS: None,
                T.SOURCE_SAMPLE_RATE: RATE, T.SOURCE_CHANNELS: CHANNELS, T.SOURCE_FORMAT: "WAV",
                T.CAPTION_ORIGINAL: caption, T.TAGS: [], T.METADATA_JSON: "{}", T.STATUS: T.OK, T.REASON: "",
                T.PMOS: float(3 + rng.random() * 1.5), T.SCORER: "bench", T.QUALITY_LEVEL: level,
                T.QUALITY_PREFIX: "", T.STATS_ID: stats.id, T.CANDIDATES: [], T.CANDIDATE_REJECTS: [],
                T.CLAP_ORIGINAL: 0.3, T.CLAP_CANDIDATES: [], T.CLAP_SCORE: 0.3, T.CAPTION: caption,
                T.CAPTION_SOURCE: "original", T.CAPTION_NOTE: "", T.PROMPT: caption,
            })
    captions = root / "captions"
    fs.write_parts(T.conform(pa.Table.from_pylist(rows), T.CAPTIONS_SCHEMA), captions, rows_per_part=250)
    Q.dump(stats, captions / Q.STATS_FILE)
    return captions


def plain_loop(plan: list[W.ShardSpec]) -> tuple[int, float]:
    """Decode and FLAC-encode every planned clip, one after another: (bytes, seconds)."""
    t0, total = time.perf_counter(), 0
    for spec in plan:
        for s in spec.samples:
            total += len(W.encode_flac(W.load_clip(s, spec.sample_rate, spec.mono), s.source_rate, spec.flac_subtype))
    return total, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.24)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--shard-max-count", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    with tempfile.TemporaryDirectory(prefix="mosaiq-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        captions = make_input(root, args.clips, args.seconds, args.seed)
        print(f"input: {args.clips} clips of {args.seconds} s, {CHANNELS} ch, {RATE} Hz "
              f"(made in {time.perf_counter() - t0:.1f}s)")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        out = root / "shards"
        out.mkdir()
        cfg = E.ExportConfig(shard_max_count=args.shard_max_count)
        t0 = time.perf_counter()
        plan = E.plan_shards(E.split_rows(E.read_captions(captions))[0], cfg)
        results = E.write_shards(plan, out, cfg.resources)
        ray_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stage = E.main(cfg, captions, out)  # every shard is there: checks them, writes index, report and card
        rest_s = time.perf_counter() - t0
        assert stage.parts_skipped == len(plan), stage
        ray.shutdown()
        shard_bytes = sum(r.bytes for r in results)
        n_shards = len(json.loads((out / S.SIZES_FILE).read_text()))
        flac_bytes, loop_s = plain_loop(plan)
    ray_mbs, loop_mbs = shard_bytes / 1e6 / ray_s, flac_bytes / 1e6 / loop_s
    print(f"ray shards : {shard_bytes / 1e6:8.1f} MB in {n_shards} shard(s) in {ray_s:6.2f}s = {ray_mbs:7.1f} MB/s  ({cpus} CPU(s): plan + one task per shard)")
    print(f"plain loop : {flac_bytes / 1e6:8.1f} MB of FLAC          in {loop_s:6.2f}s = {loop_mbs:7.1f} MB/s  (1 process, decode + encode only)")
    print(f"ratio ray/loop: {ray_mbs / loop_mbs:.2f}x")
    print(f"(the rest of a re-run export with every shard in place: sha256 check, index, report, card: {rest_s:.2f}s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    sys.exit(main())
