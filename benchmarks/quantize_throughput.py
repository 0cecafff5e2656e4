"""Rows/s of the quantize stage through Ray (aggregate + level assignment) and through plain numpy.

    .venv/bin/python benchmarks/quantize_throughput.py [--rows 10000000] [--parts 20] [--num-cpus 2]

Synthetic scores (full SCORES_SCHEMA rows, 2 % rejected, 1 % error) are written as Parquet parts
first and not timed. Both paths then do the same work from the same files on the same machine:
read the status/pmos columns and fit the statistics (pass 1), then read every part, assign
levels and prefixes with the same pure function and write the output parts (pass 2). The numpy
path runs it all in this process, part by part; the Ray path is `fit_moments` + `run_stage`.
A third figure times numpy on in-memory arrays only (no I/O), for scale.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline import quantize as Q  # noqa: E402
from pipeline import backend, fs  # noqa: E402
from pipeline.stage import Resources  # noqa: E402
from schemas import tables as T  # noqa: E402


def synthetic_part(start: int, n: int, rng: np.random.Generator) -> pa.Table:
    pmos = np.clip(rng.normal(3.8, 0.3, n) - rng.exponential(0.1, n), 1.0, 5.0)
    u = rng.random(n)
    status = np.where(u < 0.02, T.REJECTED, np.where(u < 0.03, T.ERROR, T.OK)).astype(object)
    const = lambda v, t=pa.string(): pa.repeat(pa.scalar(v, t), n)  # noqa: E731
    cols = {
        T.CLIP_ID: pa.array([f"{i:032x}" for i in range(start, start + n)]),
        T.AUDIO_PATH: const("/data/track.flac"), T.SOURCE_DIGEST: const("0" * 32),
        T.START_S: pa.array(np.arange(n) * 10.24), T.DURATION_S: const(10.24, pa.float64()),
        T.SOURCE_DURATION_S: const(300.0, pa.float64()), T.SOURCE_SAMPLE_RATE: const(44100, pa.int32()),
        T.SOURCE_CHANNELS: const(2, pa.int32()), T.SOURCE_FORMAT: const("FLAC"),
        T.SOURCE_SIZE_BYTES: const(10_000_000, pa.int64()), T.SOURCE_MTIME_NS: const(0, pa.int64()),
        T.CAPTION_ORIGINAL: const("an upbeat pop song"), T.TAGS: const([], pa.list_(pa.string())),
        T.METADATA_JSON: const("{}"), T.STATUS: pa.array(status, pa.string()),
        T.REASON: pa.array(np.where(status == T.OK, "", "synthetic").astype(object), pa.string()),
        T.PMOS: pa.array(pmos, mask=status == T.ERROR), T.SCORER: const("synthetic"),
    }
    blank = T.blank_row(T.SCORES_SCHEMA)  # no measured facts
    cols = {f.name: cols.get(f.name, pa.array([blank[f.name]] * n, f.type)) for f in T.SCORES_SCHEMA}
    return pa.table(cols, schema=T.SCORES_SCHEMA)


def write_input(folder: Path, rows: int, parts: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    per = -(-rows // parts)
    paths = []
    for i in range(parts):
        n = min(per, rows - i * per)
        path = folder / fs.part_name(i)
        fs.atomic_write_table(synthetic_part(i * per, n, rng), path)
        paths.append(path)
    return paths


def numpy_path(parts: list[Path], out: Path, cfg: Q.QuantizeConfig):
    scores = []
    for p in parts:  # pass 1: only the two columns, as the Ray path reads them
        s, bad = Q.ok_scores(pq.read_table(p, columns=[T.STATUS, T.PMOS]))
        scores.append(s)
    x = np.concatenate(scores)
    m = Q.Moments(x.size, float(np.mean(x)), float(np.sum((x - x.mean()) ** 2)),
                  float(np.sum((x - x.mean()) ** 3)), float(x.min()), float(x.max()))
    stats = Q.make_stats(m, cfg)
    for p in parts:  # pass 2
        fs.atomic_write_table(Q.quantize_table(pq.read_table(p), stats), out / p.name)
    return stats


def numpy_in_memory(x: np.ndarray, cfg: Q.QuantizeConfig) -> None:
    mean = x.mean()
    d = x - mean
    m = Q.Moments(x.size, float(mean), float((d * d).sum()), float((d * d * d).sum()), float(x.min()), float(x.max()))
    stats = Q.make_stats(m, cfg)
    Q.quality_levels(x, stats.band_edges)
    Q.quality_prefixes(x, stats.prefix_edges)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--parts", type=int, default=20)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=1, help="pass-2 actors")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mosaiq-bench-"))
    cfg = Q.QuantizeConfig(resources=Resources(batch_size=65536, concurrency=args.concurrency))
    try:
        t = time.perf_counter()
        parts = write_input(work / "scores", args.rows, args.parts, args.seed)
        print(f"generated {args.rows:,} rows in {len(parts)} parts in {time.perf_counter() - t:.1f}s (not timed)")

        t = time.perf_counter()
        np_stats = numpy_path(parts, work / "out_numpy", cfg)
        t_np = time.perf_counter() - t

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        t = time.perf_counter()
        m = Q.fit_moments(parts)
        stats = Q.make_stats(m, cfg)
        t_fit = time.perf_counter() - t
        backend.map_parts(Q.QuantizeStage, {"stats": stats.to_dict()}, work / "scores", work / "out_ray", cfg.resources,
                          params=stats.id)
        t_ray = time.perf_counter() - t
        ray.shutdown()

        x = np.random.default_rng(args.seed).normal(3.8, 0.3, args.rows)
        t = time.perf_counter()
        numpy_in_memory(x, cfg)
        t_mem = time.perf_counter() - t

        same = all(pq.read_table(work / "out_ray" / p.name).equals(pq.read_table(work / "out_numpy" / p.name)) for p in parts)
        print(f"stats: ray {stats.id}, numpy {np_stats.id}; outputs identical: {same}")
        print(f"ray   (fit_moments + run_stage, {args.num_cpus} CPUs): {t_ray:7.1f}s  {args.rows / t_ray:12,.0f} rows/s"
              f"   (pass 1 {t_fit:.1f}s, pass 2 {t_ray - t_fit:.1f}s)")
        print(f"numpy (same files, one process):          {t_np:7.1f}s  {args.rows / t_np:12,.0f} rows/s")
        print(f"ratio ray/numpy rows/s: {t_np / t_ray:.3f}")
        print(f"numpy in memory, no I/O (for scale):      {t_mem:7.2f}s  {args.rows / t_mem:12,.0f} rows/s")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
