"""curate: ingest -> analyze -> score -> quantize -> caption -> export -> verify, as one resumable job.

Every stage writes its own folder under `output/` and skips what an earlier run finished, so a
killed curation picks up where it stopped. A banner marks each stage, Ray Data's progress
display runs inside it, and a summary table closes the run.

    mosaiq curate --config jobs/demo.yaml              # the bundled sample, offline models
    mosaiq curate --config jobs/curate.yaml --input /data/music --output /data/curated
    ray job submit --working-dir . -- python pipeline/curate.py --config jobs/curate.yaml ...
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python pipeline/curate.py`, `ray job submit`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import config as jobcfg
from pipeline import fs
from pipeline.analyze import AnalyzeConfig
from pipeline.caption import CaptionConfig
from pipeline.export import ExportConfig
from pipeline.ingest import IngestConfig
from pipeline.quantize import QuantizeConfig
from pipeline.score import ScoreConfig
from pipeline.stage import StageReport
from pipeline.synth import SampleConfig
from pipeline.verify import VerifyConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageEntry:
    """One stage of the curation: its config section, its folder under --output, its module
    (which exposes `main(cfg, input_dir, output_dir) -> StageReport`), and a banner line."""

    name: str
    folder: str
    module: str
    what: str


# The curation, in order: each stage reads the folder of the stage before it (ingest reads the
# input). A new stage is one line here, one config field below, and its module.
REGISTRY = (
    StageEntry("ingest", "clips", "pipeline.ingest", "folder or manifest -> clip table"),
    StageEntry("analyze", "facts", "pipeline.analyze", "measured facts and defect flags (signal processing, CPU)"),
    StageEntry("score", "scores", "pipeline.score", "p-MOS per clip"),
    StageEntry("quantize", "quality", "pipeline.quantize", "corpus statistics, quality levels and prefixes"),
    StageEntry("caption", "captions", "pipeline.caption", "LLM candidates, CLAP choice"),
    StageEntry("export", "shards", "pipeline.export", "WebDataset shards, index and dataset card"),
    StageEntry("verify", "shards", "pipeline.verify", "re-reading every shard"),
)
STAGES = tuple(e.name for e in REGISTRY)
SAMPLE_FOLDER = "sample"
CONFIG_FILE = "curate_config.json"


@dataclass(frozen=True)
class CurateConfig:
    input: str = ""  # folder or manifest of music; "" = generate the bundled sample
    output: str = "out/curate"
    stages: tuple[str, ...] = STAGES
    sample: SampleConfig = field(default_factory=SampleConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")

    def folder(self, stage: str) -> Path:
        """The folder of a stage (or of the sample) under the output: a path or a URL."""
        if stage == SAMPLE_FOLDER:
            return fs.location(self.output) / SAMPLE_FOLDER
        return fs.location(self.output) / next(e.folder for e in REGISTRY if e.name == stage)


def load_config(path: str | None, **overrides) -> CurateConfig:
    return jobcfg.load(CurateConfig, path, **overrides)


def _banner(i: int, n: int, stage: str, what: str) -> None:
    log.info("=" * 72)
    log.info("[%d/%d] %s: %s", i, n, stage, what)
    log.info("=" * 72)


def _source(cfg: CurateConfig) -> str:
    """The input of ingest: the configured one, else the bundled sample (written once)."""
    if cfg.input:
        return cfg.input
    folder = cfg.folder(SAMPLE_FOLDER)
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        from pipeline.synth import write_sample

        log.info("no input given: writing the bundled sample to %s", folder)
        if not fs.is_remote(folder):
            write_sample(folder, cfg.sample)
        else:  # written here, then uploaded; the manifest last, so it marks a complete upload
            with tempfile.TemporaryDirectory(prefix="mosaiq-sample-") as tmp:
                write_sample(tmp, cfg.sample)
                for f in sorted(Path(tmp).rglob("*"), key=lambda f: (f.name == "manifest.csv", str(f))):
                    if f.is_file():
                        target = folder.joinpath(*f.relative_to(tmp).parts)
                        target.fs.put_file(str(f), target.path)
    return str(manifest)


def main(cfg: CurateConfig) -> list[StageReport]:
    """Run the selected stages in registry order; each resumes from what its folder holds.
    Ray must be started by the caller (`cli` does)."""
    fs.check_reachable(cfg.output, "curate output")
    out = fs.location(cfg.output)
    if not fs.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    jobcfg.save_resolved(cfg, out / CONFIG_FILE)
    selected = [e for e in REGISTRY if e.name in cfg.stages]
    reports: list[StageReport] = []
    for i, entry in enumerate(selected, 1):
        k = STAGES.index(entry.name)
        input_dir = _source(cfg) if k == 0 else str(cfg.folder(REGISTRY[k - 1].name))
        output_dir = str(cfg.folder(entry.name))
        _banner(i, len(selected), entry.name, f"{entry.what}: {input_dir} -> {output_dir}")
        module = importlib.import_module(entry.module)
        report = module.main(getattr(cfg, entry.name), input_dir, output_dir)
        reports.append(report)
        log.info("%s done in %.1fs: %s", entry.name, report.seconds, report.line())
    return reports


def summary(reports: list[StageReport], cfg: CurateConfig) -> str:
    """The table printed at the end: one line per stage."""
    width = max([len(r.stage) for r in reports] + [5])
    rows = [f"{'stage':<{width}}  {'seconds':>8}  result", f"{'-' * width}  {'-' * 8}  {'-' * 40}"]
    for r in reports:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(r.status_counts.items()))
        detail = "; ".join(x for x in (f"{r.parts_total} part(s), {r.parts_skipped} already done, {r.rows_written} row(s) written",
                                       f"[{counts}]" if counts else "", r.detail) if x)
        rows.append(f"{r.stage:<{width}}  {r.seconds:8.1f}  {detail}")
    if "export" in cfg.stages:
        rows.append(f"\nshards and dataset card: {cfg.folder('export')}/README.md")
    return "\n".join(rows)


def cli(argv: list[str] | None = None) -> int:
    from pipeline.raycluster import add_ray_args

    p = argparse.ArgumentParser(prog="mosaiq curate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="job YAML (jobs/demo.yaml, jobs/curate.yaml)")
    p.add_argument("--input", default=None, help="folder or manifest of music (default: the config's, else the bundled sample)")
    p.add_argument("--output", default=None, help="output folder (one subfolder per stage)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    add_ray_args(p)
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, input=a.input, output=a.output,
                          stages=tuple(s.strip() for s in a.stages.split(",")) if a.stages else None)
    except (jobcfg.ConfigError, ValueError) as e:
        print(f"mosaiq curate: {e}", file=sys.stderr)
        return 2
    from pipeline.raycluster import init_ray

    init_ray(a.address, a.num_cpus)
    reports = main(cfg)
    print(summary(reports, cfg))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.cli import run_command
    from pipeline.curate import cli as _cli  # the importable module, so Ray pickles its classes by reference

    sys.exit(run_command("curate", _cli, None))
