"""Throughput of ingest as a Ray job, and the driver's memory as the input grows.

Prints, on generated audio files:
  - files/s of `pipeline.ingest.main` on an embedded Ray of 1 CPU and of 2 CPUs, on the same
    N files (listing, probing, hashing, duplicates, parts; Ray start-up not counted),
  - the driver's peak memory (Python allocations by tracemalloc, and the growth of the process's
    peak RSS) for N files and for 10 x N files: it must stay flat, since the driver holds only
    the names of its work files and counts, never the list of audio files.

    .venv/bin/python benchmarks/ingest_throughput.py --n 2000
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import soundfile as sf

from pipeline import ingest


def make_files(folder: Path, n: int, seconds: float, sr: int = 16000, per_folder: int = 500, seed: int = 0) -> None:
    """`n` distinct short WAV files, `per_folder` to a subfolder (as collections are laid out)."""
    rng = np.random.default_rng(seed)
    base = (0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32)
    for i in range(n):
        sub = folder / f"d{i // per_folder:04d}"
        if i % per_folder == 0:
            sub.mkdir(parents=True, exist_ok=True)
        x = base.copy()
        x[:3] = [((i >> shift) & 0xFF) / 512 for shift in (0, 8, 16)]  # distinct content: no duplicates
        sf.write(sub / f"f{i:06d}.wav", x, sr, subtype="PCM_16")


def run_ingest(audio: Path, out: Path, cfg: ingest.IngestConfig) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = ingest.main(cfg, audio, out, progress=False)
    return time.perf_counter() - t0, report.rows_written


class RssPeak:
    """The driver's resident memory sampled every 10 ms while the block runs: (before, peak) MiB."""

    def __enter__(self):
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.before = self.peak = self.proc.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="files for the throughput runs (10 x n for the memory run)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each file of the throughput runs (16 kHz WAV)")
    p.add_argument("--memory-seconds", type=float, default=1.0, help="length of each file of the memory runs")
    p.add_argument("--files-per-task", type=int, default=ingest.IngestConfig.files_per_task)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    cfg = ingest.IngestConfig(files_per_task=a.files_per_task)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_files(tmp / "small", a.n, a.seconds)
        rates = {}
        for cpus in (1, 2):
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            run_ingest(tmp / "small", tmp / "warm", cfg)  # workers started, files in the page cache
            seconds, rows = run_ingest(tmp / "small", tmp / "out", cfg)
            rates[cpus] = a.n / seconds
            ray.shutdown()

        shutil.rmtree(tmp / "small")
        make_files(tmp / "n", a.n, a.memory_seconds, seed=1)
        make_files(tmp / "10n", 10 * a.n, a.memory_seconds, seed=2)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_ingest(tmp / "n", tmp / "warm", cfg)
        memory = {}
        for name, n in (("n", a.n), ("10n", 10 * a.n)):
            tracemalloc.start()
            with RssPeak() as rss:
                run_ingest(tmp / name, tmp / "out", cfg)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            memory[n] = (peak / 2**20, rss.peak, rss.peak - rss.before)
        ray.shutdown()

    print(f"throughput: {a.n} files of {a.seconds:g} s (16 kHz WAV), {a.files_per_task} files per task")
    for cpus, rate in rates.items():
        print(f"ingest on {cpus} CPU(s): {rate:8.1f} files/s")
    print(f"speed-up 2 vs 1 CPU:  {rates[2] / rates[1]:8.2f}x")
    for n, (traced, rss, grew) in memory.items():
        print(f"driver peak for {n:>6} files of {a.memory_seconds:g} s: {traced:6.1f} MiB Python allocations "
              f"(tracemalloc), RSS {rss:6.1f} MiB ({grew:+.1f} MiB during the run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
