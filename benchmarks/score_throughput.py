"""Throughput of the p-MOS score job vs bare batched inference of the same scorer.

Prints, from one run on N generated 10.24 s clips:
  - clips/s of the Ray job (pipeline.score.main: read, decode and resample in CPU tasks
    (ScoreStage.prepare), score on the actor, write),
  - clips/s of bare batched inference on audio already decoded in memory, with the same scorer,
    batch size and torch threads as one actor,
  - their ratio (the pipeline's overhead; target >= 0.8 at N=500).
Ray start-up is not counted (it is paid once per cluster); actor start and model load are.
On a 2-CPU machine the actor holds one CPU and the decode tasks share the other.

    .venv/bin/python benchmarks/score_throughput.py --n 500
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import soundfile as sf
import torch

from pipeline import audio, ingest, score
from pipeline.backend import read_folder
from pipeline.raycluster import init_ray
from pipeline.stage import Resources
from pipeline.synth import synth_track
from schemas import tables as T


def make_clips(folder: Path, n: int, sr: int = 22050, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    bases = [synth_track(rng, T.CLIP_SECONDS, sr)[0] for _ in range(8)]
    for i in range(n):
        x = bases[i % len(bases)] * rng.uniform(0.3, 1.0)
        x = x + rng.uniform(0, 0.05) * rng.standard_normal(len(x)).astype(np.float32)
        sf.write(folder / f"clip{i:05d}.flac", np.clip(x, -1, 1), sr, subtype="PCM_16")


def bare(clips: Path, cfg: score.ScoreConfig) -> tuple[float, int]:
    rows = [r for r in read_folder(clips).to_pylist() if r[T.STATUS] == T.OK]
    wavs = [audio.load_clip(r[T.AUDIO_PATH], r[T.START_S], r[T.DURATION_S], T.PMOS_SAMPLE_RATE) for r in rows]
    stage = score.ScoreStage(cfg)  # same scorer, same thread count as one actor
    stage.scorer(wavs[: cfg.resources.batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(wavs), cfg.resources.batch_size):
        stage.scorer(wavs[i: i + cfg.resources.batch_size])
    return len(wavs) / (time.perf_counter() - t0), len(wavs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--num-cpus-per-actor", type=float, default=float(max(1, (os.cpu_count() or 2) - 1)),
                   help="CPUs (= torch threads) of the one actor and of the bare loop; leave one for reading and writing parts")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode task (Resources.prepare_num_cpus)")
    p.add_argument("--rows-per-part", type=int, default=100)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = score.ScoreConfig(resources=Resources(batch_size=a.batch_size, concurrency=a.concurrency, num_cpus=a.num_cpus_per_actor,
                                                prepare_num_cpus=a.decode_cpus))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "audio").mkdir()
        make_clips(tmp / "audio", a.n)
        ingest.main(ingest.IngestConfig(rows_per_part=a.rows_per_part), tmp / "audio", tmp / "clips", progress=False)
        bare_rate, n = bare(tmp / "clips", cfg)
        init_ray(num_cpus=os.cpu_count())
        t0 = time.perf_counter()
        score.main(cfg, tmp / "clips", tmp / "scores")
        job_rate = n / (time.perf_counter() - t0)
    print(f"clips: {n}  scorer: {cfg.scorer}  batch_size: {a.batch_size}  actors: {a.concurrency} x {a.num_cpus_per_actor:g} CPU  "
          f"decode tasks: {a.decode_cpus:g} CPU each  torch threads (bare): {torch.get_num_threads()}  machine CPUs: {os.cpu_count()}")
    print(f"ray job:        {job_rate:8.2f} clips/s")
    print(f"bare inference: {bare_rate:8.2f} clips/s")
    print(f"ratio job/bare: {job_rate / bare_rate:8.3f}  (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
