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
from pipeline import audio, backend, fs
from pipeline.stage import Resources, Stage, StageReport
from schemas import tables as T

log = logging.getLogger(__name__)

CONFIG_FILE = "_score_config.json"  # "_": Parquet readers of the folder skip it


@dataclass(frozen=True)
class ScoreConfig:
    scorer: Literal["distillmos", "wav2vec2"] = "distillmos"
    model: str | None = None  # local folder for wav2vec2 (see `mosaiq convert-qama`)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor has a GPU
    # on a GPU, TF32 matmuls and convolutions: wav2vec2-large scored 3.1x the clips/s of fp32 on
    # an H200 with scores within 1e-4 of fp32's (bf16 was 4.7x but moved scores by 0.01)
    tf32: bool = True
    silence_dbfs: float = T.SILENCE_DBFS
    resources: Resources = field(default_factory=lambda: Resources(batch_size=8, concurrency=1, num_cpus=1.0))


WAVE = "_pmos_wave"  # the decoded clip (mono, PMOS_SAMPLE_RATE) between `prepare` and the scorer


class ScoreStage(Stage):
    """Callable over an Arrow batch of clip rows -> the same rows with `pmos` (one out per in).

    `prepare` (CPU tasks on Ray, ahead of the scorer actors) decodes, downmixes, resamples and
    checks each `ok` clip into the `WAVE` column; `__call__` only runs the scorer, and prepares
    the batch itself when it arrives without that column."""

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
        if device == "cuda":  # this process is the scorer's own (a Ray actor)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.scorer = build_scorer(cfg.scorer, cfg.model, device)
        if self.scorer.sample_rate != T.PMOS_SAMPLE_RATE:
            raise ValueError(f"scorer {cfg.scorer!r} takes {self.scorer.sample_rate} Hz; score decodes at {T.PMOS_SAMPLE_RATE} Hz")

    @staticmethod
    def prepare(table: pa.Table, cfg: ScoreConfig) -> pa.Table:
        """Decode each `ok` clip (mono, 16 kHz) into `WAVE`; a clip that fails to decode or is
        unusable (NaN/Inf, silent) becomes an `error`/`rejected` row with the reason."""
        ScoreStage.check_input(table.schema)
        checks = audio.SignalChecks(silence_dbfs=cfg.silence_dbfs)
        cols = [table.column(c).to_pylist() for c in (T.STATUS, T.REASON, T.AUDIO_PATH, T.START_S, T.DURATION_S,
                                                      T.SOURCE_SIZE_BYTES, T.SOURCE_MTIME_NS, T.SOURCE_DIGEST)]
        status, reason, waves = cols[0], cols[1], []
        for i, (_, _, path, start, dur, size, mtime, digest) in enumerate(zip(*cols)):
            wav = None
            if status[i] == T.OK:
                try:
                    audio.check_unchanged(path, size, mtime, digest)
                    wav = audio.load_clip(path, start, dur, T.PMOS_SAMPLE_RATE)
                    bad = checks.reason(wav)
                    if bad and bad.startswith("silent"):
                        bad = audio.cancels_in_mono(path, start, dur, checks) or bad
                    if bad:
                        status[i], reason[i], wav = T.REJECTED, bad, None
                except audio.AudioError as e:
                    status[i], reason[i] = e.status, e.reason
            waves.append(wav)
        table = table.set_column(table.schema.get_field_index(T.STATUS), T.STATUS, pa.array(status, pa.string()))
        table = table.set_column(table.schema.get_field_index(T.REASON), T.REASON, pa.array(reason, pa.string()))
        return table.append_column(WAVE, backend.wave_column(waves))

    def __call__(self, batch: pa.Table) -> pa.Table:
        if WAVE not in batch.column_names:
            batch = self.prepare(batch, self.cfg)
        self.check_input(batch.schema)
        waves = backend.column_waves(batch.column(WAVE))
        status, reason = batch.column(T.STATUS).to_pylist(), batch.column(T.REASON).to_pylist()
        idx = [i for i, (s, w) in enumerate(zip(status, waves)) if s == T.OK and w is not None]
        pmos: list[float | None] = [None] * batch.num_rows
        if idx:
            for i, s in zip(idx, self.scorer([waves[i] for i in idx])):
                if np.isfinite(s):
                    pmos[i] = float(s)
                else:
                    status[i], reason[i] = T.ERROR, f"scorer returned {s}"
        return self._rows(batch, status, reason, pmos, [self.scorer.name] * batch.num_rows)

    # a clip's p-MOS depends on its audio alone (and the params): map_parts takes it from the
    # previous output when an earlier setting changed but the clip did not
    reuse_on = (T.CLIP_ID, T.SOURCE_DIGEST, T.START_S, T.DURATION_S)

    @classmethod
    def reuse(cls, rows: pa.Table, previous: pa.Table, cfg: ScoreConfig) -> pa.Table:
        """The output of `rows` with the p-MOS their clips got before (`previous`, aligned; null
        for rows that are not `ok`, which pass through); a file that changed since ingest is an
        `error` row here too, as it would be when decoded."""
        status, reason = rows.column(T.STATUS).to_pylist(), rows.column(T.REASON).to_pylist()
        pmos = previous.column(T.PMOS).to_pylist()
        cols = [rows.column(c).to_pylist() for c in (T.AUDIO_PATH, T.SOURCE_SIZE_BYTES, T.SOURCE_MTIME_NS, T.SOURCE_DIGEST)]
        for i, (path, size, mtime, digest) in enumerate(zip(*cols)):
            if status[i] != T.OK:
                continue
            try:
                audio.check_unchanged(path, size, mtime, digest)
            except audio.AudioError as e:
                status[i], reason[i], pmos[i] = e.status, e.reason, None
        return cls._rows(rows, status, reason, pmos, [cfg.scorer] * rows.num_rows)

    @classmethod
    def _rows(cls, batch: pa.Table, status: list, reason: list, pmos: list, scorer: list) -> pa.Table:
        out = T.with_facts(batch)  # the clip and its measured facts (null when analyze did not run)
        out = out.set_column(out.schema.get_field_index(T.STATUS), T.STATUS, pa.array(status, pa.string()))
        out = out.set_column(out.schema.get_field_index(T.REASON), T.REASON, pa.array(reason, pa.string()))
        out = out.append_column(T.PMOS, pa.array(pmos, pa.float64()))
        out = out.append_column(T.SCORER, pa.array(scorer, pa.string()))
        return T.conform(out, cls.output_schema)


def params(cfg: ScoreConfig) -> str:
    """What the scores depend on besides the clips: the config less how it runs (the device and
    TF32 too: CPU, GPU and TF32 scores agree within 1e-4) and the model's files as they are now."""
    return backend.config_params(cfg, leave_out=("resources", "device", "tf32"), files=[cfg.model])


def main(cfg: ScoreConfig, input_dir: str | Path, output_dir: str | Path) -> StageReport:
    """Score every pending part of `input_dir` into `output_dir` on Ray (the caller starts it)."""
    report = backend.map_parts(ScoreStage, {"cfg": cfg}, input_dir, output_dir, cfg.resources, params=params(cfg))
    jobcfg.save_resolved(cfg, fs.location(output_dir) / CONFIG_FILE)
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
