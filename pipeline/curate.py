"""curate: ingest -> score -> quantize -> caption -> export -> verify, as one resumable job.

Every stage writes its own folder under `output/` and skips what an earlier run finished, so a
killed curation picks up where it stopped. A banner marks each stage, Ray Data's progress
display runs inside it, and a summary table closes the run.

    mosaiq curate --config jobs/demo.yaml              # the bundled sample, offline models
    mosaiq curate --config jobs/curate.yaml --input /data/music --output /data/curated
    ray job submit --working-dir . -- python pipeline/curate.py --config jobs/curate.yaml ...
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python pipeline/curate.py`, `ray job submit`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import config as jobcfg
from pipeline.caption import CaptionConfig
from pipeline.ingest import IngestConfig
from pipeline.quantize import QuantizeConfig
from pipeline.synth import SampleConfig
from pipeline.score import ScoreConfig

log = logging.getLogger(__name__)

STAGES = ("ingest", "score", "quantize", "caption", "export", "verify")
FOLDERS = {"sample": "sample", "ingest": "clips", "score": "scores", "quantize": "quality",
           "caption": "captions", "export": "shards"}


@dataclass(frozen=True)
class CurateConfig:
    input: str = ""  # folder or manifest of music; "" = generate the bundled sample
    output: str = "out/curate"
    stages: tuple[str, ...] = STAGES
    sample: SampleConfig = field(default_factory=SampleConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    export: dict = field(default_factory=dict)  # ExportConfig fields but input/output

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
        self.export_config("in", "out")  # validate the export section now, not after an hour

    def export_config(self, input_dir: str, output_dir: str):
        from pipeline.export import ExportConfig

        return jobcfg.from_dict(ExportConfig, {**self.export, "input": input_dir, "output": output_dir}, "export")

    def folder(self, stage: str) -> Path:
        return Path(self.output) / FOLDERS[stage]


def load_config(path: str | None, **overrides) -> CurateConfig:
    return jobcfg.load(CurateConfig, path, **overrides)


@dataclass
class StageLine:
    stage: str
    seconds: float
    detail: str


def _banner(i: int, n: int, stage: str, what: str) -> None:
    log.info("=" * 72)
    log.info("[%d/%d] %s: %s", i, n, stage, what)
    log.info("=" * 72)


def main(cfg: CurateConfig, address: str | None = None, num_cpus: int | None = None) -> list[StageLine]:
    """Run the selected stages in order; each resumes from what its folder already holds."""
    from pipeline import ingest, score
    from pipeline.raycluster import init_ray

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    jobcfg.save_resolved(cfg, out / "curate_config.json")
    init_ray(address, num_cpus)
    lines: list[StageLine] = []
    stages = [s for s in STAGES if s in cfg.stages]
    source = cfg.input
    if not source:
        manifest = cfg.folder("sample") / "manifest.csv"
        if not manifest.exists():
            from pipeline.synth import write_sample

            log.info("no input given: writing the bundled sample to %s", cfg.folder("sample"))
            write_sample(cfg.folder("sample"), cfg.sample)
        source = str(manifest)

    for i, stage in enumerate(stages, 1):
        t0 = time.perf_counter()
        if stage == "ingest":
            _banner(i, len(stages), stage, f"{source} -> {cfg.folder('ingest')}")
            clips = cfg.folder("ingest")
            if any(clips.glob("part-*.parquet")) and _same_config(clips / "ingest_config.json", cfg.ingest):
                detail = "already done"
            else:
                table = ingest.main(source, clips, cfg.ingest)
                detail = ingest.summarize(table).splitlines()[0]
        elif stage == "score":
            _banner(i, len(stages), stage, f"p-MOS with {cfg.score.scorer}")
            detail = score.main(cfg.folder("ingest"), cfg.folder("score"), cfg.score).line()
        elif stage == "quantize":
            from pipeline import quantize

            _banner(i, len(stages), stage, "corpus statistics, quality levels and prefixes")
            result = quantize.main(cfg.quantize, cfg.folder("score"), cfg.folder("quantize"))
            s = result.stats
            detail = f"mu={s.mu:.3f} sigma={s.sigma:.3f} stats {s.id}; " + result.stage.line()
        elif stage == "caption":
            from pipeline import caption

            _banner(i, len(stages), stage, f"LLM candidates ({cfg.caption.llm.backend}), CLAP ({cfg.caption.clap.backend})")
            detail = caption.main(cfg.caption, str(cfg.folder("quantize")), str(cfg.folder("caption"))).line()
        elif stage == "export":
            from pipeline import export

            _banner(i, len(stages), stage, f"WebDataset shards -> {cfg.folder('export')}")
            detail = export.main(cfg.export_config(str(cfg.folder("caption")), str(cfg.folder("export")))).line()
        elif stage == "verify":
            from pipeline import verify

            _banner(i, len(stages), stage, "re-reading every shard")
            result = verify.main(verify.VerifyConfig(shards_dir=str(cfg.folder("export"))))
            if result.problems:
                raise RuntimeError(f"verify found {len(result.problems)} problem(s) in {cfg.folder('export')}: {result.problems[:5]}")
            detail = f"{result.samples} sample(s) in {result.shards} shard(s): ok"
        lines.append(StageLine(stage, time.perf_counter() - t0, detail))
        log.info("%s done in %.1fs: %s", stage, lines[-1].seconds, detail)
    return lines


def _same_config(path: Path, cfg) -> bool:
    import json

    return path.exists() and json.loads(path.read_text()) == json.loads(json.dumps(jobcfg.to_dict(cfg)))


def summary(lines: list[StageLine], cfg: CurateConfig) -> str:
    width = max(len(line.stage) for line in lines) if lines else 5
    rows = [f"{'stage':<{width}}  {'seconds':>8}  result", f"{'-' * width}  {'-' * 8}  {'-' * 40}"]
    rows += [f"{line.stage:<{width}}  {line.seconds:8.1f}  {line.detail}" for line in lines]
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
    lines = main(cfg, a.address, a.num_cpus)
    print(summary(lines, cfg))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.curate import cli as _cli  # the importable module, so Ray pickles by reference

    sys.exit(_cli())
