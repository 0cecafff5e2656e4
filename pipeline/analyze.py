"""analyze: clip table -> the same rows with measured facts and defect flags (CPU only).

Each `ok` clip is decoded at its native rate and channels and measured by `pipeline.facts`
(loudness, true peak, clipping, bandwidth, noise, silence, DC, stereo correlation, tempo, key,
percussive ratio, onset rate, centroid). Defects are flagged in `defects`; by default a flagged
clip stays `ok` (the model learns what low quality sounds like), and `reject_defects` turns the
listed flags into `rejected` rows with reason `defect:<name>`. A clip that cannot be decoded is
an `error` row, an unusable one (NaN/Inf samples, silence) `rejected`, with the reason; rows
that arrive not `ok` pass through with null facts. No model weights: it runs anywhere, offline.

    python pipeline/analyze.py --input CLIPS --output FACTS [--config job.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python pipeline/analyze.py`, `ray job submit`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa

from jobs import config as jobcfg
from pipeline import audio, backend, fs
from pipeline import facts as FX
from pipeline.stage import Resources, Stage, StageReport
from schemas import facts as F
from schemas import tables as T

log = logging.getLogger(__name__)

CONFIG_FILE = "_analyze_config.json"  # "_": Parquet readers of the folder skip it


@dataclass(frozen=True)
class AnalyzeConfig:
    measure: FX.MeasureConfig = field(default_factory=FX.MeasureConfig)
    thresholds: FX.DefectThresholds = field(default_factory=FX.DefectThresholds)
    reject_defects: tuple[str, ...] = ()  # defects that make a row `rejected` ("defect:<name>")
    silence_dbfs: float = T.SILENCE_DBFS  # a whole clip under this is rejected as silent
    resources: Resources = field(default_factory=lambda: Resources(batch_size=8, concurrency=1, num_cpus=1.0))

    def __post_init__(self):
        unknown = [d for d in self.reject_defects if d not in F.DEFECT_NAMES]
        if unknown:
            raise ValueError(f"reject_defects: unknown defect(s) {unknown}; known: {list(F.DEFECT_NAMES)}")


def _null_facts() -> dict:
    row = {name: None for name in F.FACT_NAMES}
    row.update({F.KEY: "", F.MODE: "", F.DEFECTS: []})
    return row


class AnalyzeStage(Stage):
    """Callable over an Arrow batch of clip rows -> the same rows with the facts (one out per in)."""

    name = "analyze"
    input_schema = T.CLIPS_SCHEMA
    output_schema = F.FACTS_SCHEMA

    def __init__(self, cfg: AnalyzeConfig = AnalyzeConfig()):
        self.cfg = cfg
        self.checks = audio.SignalChecks(silence_dbfs=cfg.silence_dbfs)

    def analyze_row(self, r: dict) -> dict:
        """One clip row -> the row with its facts, status and reason."""
        out = {**r, **_null_facts()}
        if r[T.STATUS] != T.OK:
            return out
        try:
            audio.check_unchanged(r[T.AUDIO_PATH], r[T.SOURCE_SIZE_BYTES], r[T.SOURCE_MTIME_NS], r[T.SOURCE_DIGEST])
            wav = audio.load_clip(r[T.AUDIO_PATH], r[T.START_S], r[T.DURATION_S], None, mono=False,
                                  expected_sr=r.get(T.SOURCE_SAMPLE_RATE))  # (C, T) at the native rate
        except audio.AudioError as e:
            out[T.STATUS], out[T.REASON] = e.status, e.reason
            return out
        bad = self.checks.reason(wav)
        if bad:
            out[T.STATUS], out[T.REASON] = T.REJECTED, bad
            return out
        sr = int(r[T.SOURCE_SAMPLE_RATE]) if r.get(T.SOURCE_SAMPLE_RATE) else _rate_of(r[T.AUDIO_PATH])
        facts = FX.measure(wav, sr, self.cfg.measure)
        defects = FX.find_defects(facts, self.cfg.thresholds)
        out.update(facts)
        out[F.DEFECTS] = defects
        rejected = [d for d in defects if d in self.cfg.reject_defects]
        if rejected:
            out[T.STATUS], out[T.REASON] = T.REJECTED, F.DEFECT_REASON_PREFIX + rejected[0]
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check_input(batch.schema)
        rows = batch.select(T.CLIPS_SCHEMA.names).to_pylist()
        return pa.Table.from_pylist([self.analyze_row(r) for r in rows], schema=self.output_schema)


def _rate_of(path: str) -> int:
    return audio.probe(path).sample_rate


def params(cfg: AnalyzeConfig) -> str:
    """The params of analyze's parts: the config that decides the rows, and the version of the
    measurements (`FACTS_VERSION`), so a folder an older mosaiq measured is measured again."""
    return f"{backend.config_params(cfg)}|facts v{F.FACTS_VERSION}"


def main(cfg: AnalyzeConfig, input_dir: str | Path, output_dir: str | Path) -> StageReport:
    """Analyze every pending part of `input_dir` into `output_dir` on Ray (the caller starts it)."""
    report = backend.map_parts(AnalyzeStage, {"cfg": cfg}, input_dir, output_dir, cfg.resources,
                               params=params(cfg))
    jobcfg.save_resolved(cfg, fs.location(output_dir) / CONFIG_FILE)
    flagged = Counter(d for v in backend.read_folder(output_dir, [F.DEFECTS]).column(F.DEFECTS).to_pylist() for d in v or [])
    report.detail = "defects flagged: " + (", ".join(f"{k}={v}" for k, v in sorted(flagged.items())) or "none")
    return report


def cli(argv: list[str] | None = None) -> int:
    from pipeline.raycluster import add_ray_args, init_ray

    p = argparse.ArgumentParser(prog="mosaiq analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="clip table folder (from `mosaiq ingest`)")
    p.add_argument("--output", required=True, help="facts folder (part-NNNNN.parquet, same parts as the input)")
    p.add_argument("--config", default=None, help="job YAML; its 'analyze' section sets the options")
    p.add_argument("--reject", action="append", default=None, choices=F.DEFECT_NAMES,
                   help="turn this defect into a rejected row (repeatable)")
    p.add_argument("--concurrency", type=int, default=None, help="analyze workers")
    add_ray_args(p)
    a = p.parse_args(argv)
    cfg = jobcfg.load(AnalyzeConfig, a.config, section="analyze" if a.config else None)
    if a.reject:
        cfg = dataclasses.replace(cfg, reject_defects=tuple(a.reject))
    if a.concurrency is not None:
        cfg = dataclasses.replace(cfg, resources=dataclasses.replace(cfg.resources, concurrency=a.concurrency))
    init_ray(a.address, a.num_cpus)
    print(main(cfg, a.input, a.output).line())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.analyze import cli as _cli  # the importable module, so Ray pickles the stage by reference
    from pipeline.cli import run_command

    sys.exit(run_command("analyze", _cli, None))
