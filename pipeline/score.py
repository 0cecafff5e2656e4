"""score: clip table -> p-MOS per clip, as a Ray job.

Each `ok` clip is decoded, downmixed to mono, resampled to 16 kHz, checked (NaN/Inf samples,
silence) and scored by a p-MOS model in batches on a pool of actors that load the model once.
Clips that fail to decode become `error` rows and unusable ones `rejected`, with the reason;
rows that arrive not `ok` pass through. A re-run skips finished output parts.

Embedded:            python pipeline/score.py --input CLIPS --output SCORES
On a Ray cluster:    ray job submit --address http://HEAD:8265 --working-dir . -- \\
                         python pipeline/score.py --input CLIPS --output SCORES
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script (`python pipeline/score.py`, `ray job submit`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa

from jobs import config as jobcfg
from pipeline import audio, backend
from pipeline.stage import Resources, Stage, StageReport
from schemas import tables as T

log = logging.getLogger(__name__)

CONFIG_FILE = "score_config.json"


@dataclass(frozen=True)
class ScoreConfig:
    scorer: Literal["distillmos", "wav2vec2"] = "distillmos"
    model: str | None = None  # local folder for wav2vec2 (see `mosaiq convert-qama`)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor has a GPU
    silence_dbfs: float = T.SILENCE_DBFS
    resources: Resources = field(default_factory=lambda: Resources(batch_size=8, concurrency=1, num_cpus=1.0))


class ScoreStage(Stage):
    """Callable over an Arrow batch of clip rows -> the same rows with `pmos` (one out per in)."""

    name = "score"
    input_schema = T.CLIPS_SCHEMA
    output_schema = T.SCORES_SCHEMA

    def __init__(self, cfg: ScoreConfig):
        import torch

        from model.pmos import build_scorer

        self.cfg = cfg
        if cfg.resources.num_cpus >= 1:
            torch.set_num_threads(int(cfg.resources.num_cpus))
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and cfg.resources.num_gpus > 0 else "cpu"
        self.scorer = build_scorer(cfg.scorer, cfg.model, device)
        self.checks = audio.SignalChecks(silence_dbfs=cfg.silence_dbfs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check_input(batch.schema)
        rows = batch.select(T.CLIPS_SCHEMA.names).to_pylist()
        pmos: list[float | None] = [None] * len(rows)
        wavs, idx = [], []
        for i, r in enumerate(rows):
            if r[T.STATUS] != T.OK:
                continue
            try:
                audio.check_unchanged(r[T.AUDIO_PATH], r[T.SOURCE_SIZE_BYTES], r[T.SOURCE_MTIME_NS])
                wav = audio.load_clip(r[T.AUDIO_PATH], r[T.START_S], r[T.DURATION_S], self.scorer.sample_rate)
            except audio.AudioError as e:
                r[T.STATUS], r[T.REASON] = e.status, e.reason
                continue
            bad = self.checks.reason(wav)
            if bad:
                r[T.STATUS], r[T.REASON] = T.REJECTED, bad
                continue
            wavs.append(wav)
            idx.append(i)
        if wavs:
            scores = self.scorer(wavs)
            for i, s in zip(idx, scores):
                if np.isfinite(s):
                    pmos[i] = float(s)
                else:
                    rows[i][T.STATUS], rows[i][T.REASON] = T.ERROR, f"scorer returned {s}"
        for r, s in zip(rows, pmos):
            r[T.PMOS] = s
            r[T.SCORER] = self.scorer.name
        return pa.Table.from_pylist(rows, schema=T.SCORES_SCHEMA)


def main(cfg: ScoreConfig, input_dir: str | Path, output_dir: str | Path) -> StageReport:
    """Score every pending part of `input_dir` into `output_dir` on Ray (the caller starts it)."""
    report = backend.map_parts(ScoreStage, {"cfg": cfg}, input_dir, output_dir, cfg.resources)
    jobcfg.save_resolved(cfg, Path(output_dir) / CONFIG_FILE)
    return report


def _config_from_args(a) -> ScoreConfig:
    base = jobcfg.load(ScoreConfig, a.config, section="score" if a.config else None,
                       scorer=a.scorer, model=a.model, device=a.device)
    res = dataclasses.replace(
        base.resources,
        **{k: v for k, v in {"batch_size": a.batch_size, "concurrency": a.concurrency,
                             "num_cpus": a.num_cpus_per_actor, "num_gpus": a.num_gpus}.items() if v is not None},
    )
    return dataclasses.replace(base, resources=res)


def cli(argv: list[str] | None = None) -> int:
    from pipeline.raycluster import add_ray_args, init_ray

    p = argparse.ArgumentParser(prog="mosaiq score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="clip table folder (from `mosaiq ingest`)")
    p.add_argument("--output", required=True, help="scores folder (part-NNNNN.parquet, same parts as the input)")
    p.add_argument("--config", default=None, help="job YAML; its 'score' section sets the options below")
    p.add_argument("--scorer", choices=["distillmos", "wav2vec2"], default=None, help="p-MOS model (default distillmos, offline)")
    p.add_argument("--model", default=None, help="local model folder (wav2vec2: made by `mosaiq convert-qama`)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--batch-size", type=int, default=None, help="clips per model call")
    p.add_argument("--concurrency", type=int, default=None, help="scorer actors")
    p.add_argument("--num-cpus-per-actor", type=float, default=None)
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor")
    add_ray_args(p)
    a = p.parse_args(argv)
    cfg = _config_from_args(a)
    init_ray(a.address, a.num_cpus)
    report = main(cfg, a.input, a.output)
    print(report.line())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.cli import run_command
    from pipeline.score import cli as _cli  # the importable module, so Ray pickles its classes by reference

    sys.exit(run_command("score", _cli, None))
