"""Stage quantize: p-MOS scores -> corpus statistics, quality level 1..5 and text prefix.

Pass 1 fits count, mean, population standard deviation and skewness of the `ok` scores: each
part yields its partial moments (count, mean, M2, M3, min, max) in a Ray task
(`pipeline.backend.aggregate_parts`) and the partials are merged with the parallel (Chan/Pebay)
formulas, in a canonical order, so no score leaves its worker and the result does not depend on
the order the tasks finish in.
A skew-normal fitted by the method of moments is reported beside them.

Pass 2 is row-wise through `pipeline.backend.map_parts`: `quality_level` by the empirical-rule
bands (what the official QA-MDT code does) and `quality_prefix` by the paper's rule; rows that
are not `ok` keep their status, with a null level and an empty prefix. See docs/quality.md.

Outputs beside the parts, each named with a leading `_` so that every Parquet reader opens the
folder as one table: `_quality_stats.json` (schemas/stats.py STAGE_STATS_FILE), `_quality_report.json`
(counts per level, per prefix, histogram), `_quality.png`, `_quantize_config.json`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a script (`ray job submit ... -- python pipeline/quantize.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa

from jobs import config as jobconfig
from pipeline import backend, fs
from pipeline.stage import Resources, Stage, StageReport
from pipeline.quality_plot import (PLOT_FILE, PREFIXES, REPORT_FILE, LevelReport, histogram_range, plot_quality,
                                  report_partial, summary)
from schemas import stats as S
from schemas import tables as T

log = logging.getLogger(__name__)

STAGE = "quantize"
CONFIG_FILE = "_quantize_config.json"  # "_": Parquet readers of the folder skip it
# the largest |skewness| a skew-normal can have is 0.9952...; sample values beyond are clipped
_SKEWNORM_MAX_SKEW = 0.99


class QuantizeError(ValueError):
    """The scores cannot be quantized as asked (too few ok rows, no spread, bad values)."""


@dataclass(frozen=True)
class QuantizeConfig:
    """Job config for `mosaiq quantize` (section `quantize` of a job YAML)."""

    mu: float | None = None  # fixed band centre; None = fitted mean (3.80 = official QA-MDT)
    sigma: float | None = None  # fixed band width; None = fitted std (0.20 = official QA-MDT)
    band_multipliers: tuple[float, ...] = (-2.0, -1.0, 1.0, 2.0)  # level edges at mu + k*sigma
    prefix_low_below: float = -2.0  # "low quality" if s < mu + this*sigma
    prefix_medium_within: float = 1.0  # "medium quality" if |s - mu| <= this*sigma
    prefix_high_above: float = 2.0  # "high quality" if s > mu + this*sigma
    plot_bins: int = 60
    resources: Resources = field(default_factory=lambda: Resources(batch_size=65536))  # pass 2

    def __post_init__(self):
        if (self.mu is None) != (self.sigma is None):
            raise ValueError(f"give both mu and sigma or neither, got mu={self.mu!r} sigma={self.sigma!r}")
        if self.mu is not None and not (math.isfinite(self.mu) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"mu must be finite and sigma finite and > 0, got mu={self.mu!r} sigma={self.sigma!r}")
        k = self.band_multipliers
        if len(k) != T.NUM_QUALITY_LEVELS - 1 or any(b <= a for a, b in zip(k, k[1:])):
            raise ValueError(f"band_multipliers must be {T.NUM_QUALITY_LEVELS - 1} strictly increasing numbers, got {list(k)}")
        if self.prefix_medium_within < 0 or not self.prefix_low_below < self.prefix_high_above:
            raise ValueError(
                "prefix multipliers need prefix_medium_within >= 0 and prefix_low_below < prefix_high_above, got "
                f"{self.prefix_low_below}, {self.prefix_medium_within}, {self.prefix_high_above}"
            )
        if self.plot_bins < 1:
            raise ValueError(f"plot_bins must be >= 1, got {self.plot_bins}")


# --- pass 1, pure: partial moments and their exact-order merge -----------------------------


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred sums M2 = sum (x-mean)^2, M3 = sum (x-mean)^3 of some scores."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    bad: int = 0  # ok rows whose score is null or not finite

    def as_list(self) -> list[float]:
        return [float(self.n), self.mean, self.m2, self.m3, self.min, self.max, float(self.bad)]

    @classmethod
    def from_list(cls, v) -> Moments:
        return cls(int(v[0]), float(v[1]), float(v[2]), float(v[3]), float(v[4]), float(v[5]), int(v[6]))


def ok_scores(table: pa.Table) -> tuple[np.ndarray, int]:
    """The finite scores of the `ok` rows, and how many `ok` rows have no finite score."""
    T.require_columns(table, [T.STATUS, T.PMOS], STAGE)
    ok = table.column(T.STATUS).to_numpy(zero_copy_only=False) == T.OK
    scores = table.column(T.PMOS).cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)[ok]
    finite = np.isfinite(scores)
    return scores[finite], int((~finite).sum())


def moments_of(scores: np.ndarray, bad: int = 0) -> Moments:
    """Two-pass moments of one block."""
    n = int(scores.size)
    if n == 0:
        return Moments(bad=bad)
    mean = float(np.mean(scores))
    d = scores - mean
    d2 = d * d
    return Moments(n, mean, float(d2.sum()), float((d2 * d).sum()), float(scores.min()), float(scores.max()), bad)


def merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sets (Chan et al. 1979; Pebay 2008 for M3)."""
    if a.n == 0 or b.n == 0:
        m = b if a.n == 0 else a
        return Moments(m.n, m.mean, m.m2, m.m3, min(a.min, b.min), max(a.max, b.max), a.bad + b.bad)
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = (a.n * a.mean + b.n * b.mean) / n
    m2 = a.m2 + b.m2 + delta * delta * a.n * b.n / n
    m3 = a.m3 + b.m3 + delta**3 * a.n * b.n * (a.n - b.n) / (n * n) + 3.0 * delta * (a.n * b.m2 - b.n * a.m2) / n
    return Moments(n, mean, m2, m3, min(a.min, b.min), max(a.max, b.max), a.bad + b.bad)


def merge_all(partials) -> Moments:
    """Merge partials in a canonical (sorted) order: the same partials give the same bits."""
    return functools.reduce(merge, sorted(partials, key=Moments.as_list), Moments())


# --- pass 1, pure: statistics and the skew-normal -----------------------------------------


def skewnorm_from_moments(mean: float, std: float, skewness: float) -> S.SkewNormal:
    """Method-of-moments skew-normal (scipy's a, loc, scale) with this mean, std and skewness."""
    g = min(abs(skewness), _SKEWNORM_MAX_SKEW)
    c = ((4.0 - math.pi) / 2.0) ** (2.0 / 3.0)
    delta = math.copysign(math.sqrt(math.pi / 2.0 * g ** (2 / 3) / (g ** (2 / 3) + c)), skewness)
    scale = std / math.sqrt(1.0 - 2.0 * delta * delta / math.pi)
    return S.SkewNormal(
        a=delta / math.sqrt(1.0 - delta * delta),
        loc=mean - scale * delta * math.sqrt(2.0 / math.pi),
        scale=scale,
        clipped=abs(skewness) > _SKEWNORM_MAX_SKEW,
    )


def _published(x: float) -> float:
    # rounded so that the stats id does not hang on the last bits of the block merge
    return round(x, S.EDGE_DECIMALS) + 0.0


def fit_from_moments(m: Moments) -> S.Fit:
    """Population std (ddof 0) and biased Fisher-Pearson skewness; errors instead of NaN."""
    if m.bad:
        raise QuantizeError(f"{m.bad} ok row(s) have a null or non-finite {T.PMOS!r}; score them again or mark them rejected")
    if m.n < 2:
        raise QuantizeError(f"need at least 2 ok rows with a {T.PMOS!r} to fit the statistics, found {m.n}")
    if m.m2 <= 0 or m.min == m.max:
        raise QuantizeError(f"all {m.n} ok scores equal {m.min!r}: zero spread, the bands are undefined (give --mu/--sigma)")
    mean, std = _published(m.mean), _published(math.sqrt(m.m2 / m.n))
    skew = _published(math.sqrt(m.n) * m.m3 / m.m2**1.5)
    return S.Fit(mean=mean, std=std, skewness=skew, min=m.min, max=m.max, skewnorm=skewnorm_from_moments(mean, std, skew))


def make_stats(m: Moments, cfg: QuantizeConfig) -> S.QualityStats:
    """The quality stats: fitted mu/sigma, or the config's fixed ones with the fit beside them."""
    fixed = cfg.mu is not None
    try:
        fit = fit_from_moments(m)
    except QuantizeError as e:
        if not fixed or m.bad:
            raise
        log.warning("%s: no fit reported (%s); using the fixed mu/sigma", STAGE, e)
        fit = None
    mu, sigma = (cfg.mu, cfg.sigma) if fixed else (fit.mean, fit.std)
    return S.make(m.n, fit, mu, sigma, fixed, cfg.band_multipliers, cfg.prefix_low_below,
                  cfg.prefix_medium_within, cfg.prefix_high_above)


# --- pass 2, pure: levels and prefixes ----------------------------------------------------


def quality_levels(scores: np.ndarray, edges) -> np.ndarray:
    """Level 1 + number of band edges <= score: 1..len(edges)+1, as int8."""
    return (np.searchsorted(np.asarray(edges, dtype=np.float64), scores, side="right") + 1).astype(np.int8)


def quality_prefixes(scores: np.ndarray, prefix_edges: dict) -> np.ndarray:
    """The paper's rule: low below, medium within (inclusive), high above; "" elsewhere."""
    low = scores < prefix_edges["low_below"]
    medium = (scores >= prefix_edges["medium_from"]) & (scores <= prefix_edges["medium_to"])
    high = scores > prefix_edges["high_above"]
    return np.select([medium, low, high], [S.PREFIX_MEDIUM, S.PREFIX_LOW, S.PREFIX_HIGH], S.PREFIX_NONE).astype(object)


def quantize_table(table: pa.Table, stats: S.QualityStats | None) -> pa.Table:
    """Scores table -> quality table, one row per row; non-ok rows get a null level and "".
    `stats` None (a corpus with no ok row) takes only rows that are not ok."""
    table = T.conform(table, T.SCORES_SCHEMA)
    ok = table.column(T.STATUS).to_numpy(zero_copy_only=False) == T.OK
    if stats is None:
        if ok.any():
            raise QuantizeError(f"{int(ok.sum())} ok row(s) but no quality statistics to quantize them with")
        arrays = table.columns + [pa.nulls(len(table), pa.int8()), pa.array([S.PREFIX_NONE] * len(table), pa.string()),
                                  pa.array([""] * len(table), pa.string())]
        return pa.Table.from_arrays(arrays, schema=T.QUALITY_SCHEMA)
    scores = table.column(T.PMOS).fill_null(np.nan).to_numpy(zero_copy_only=False)
    broken = ok & ~np.isfinite(scores)
    if broken.any():
        ids = table.column(T.CLIP_ID).filter(pa.array(broken)).to_pylist()[:5]
        raise QuantizeError(f"{int(broken.sum())} ok row(s) have a null or non-finite {T.PMOS!r}, e.g. {ids}")
    safe = np.where(ok, scores, 0.0)
    levels = pa.array(quality_levels(safe, stats.band_edges), pa.int8(), mask=~ok)
    prefixes = np.where(ok, quality_prefixes(safe, stats.prefix_edges), S.PREFIX_NONE)
    arrays = table.columns + [levels, pa.array(prefixes, pa.string()), pa.array([stats.id] * len(table), pa.string())]
    return pa.Table.from_arrays(arrays, schema=T.QUALITY_SCHEMA)


class QuantizeStage(Stage):
    """Row-wise pass 2: stats given as their dict, so the class pickles plainly."""

    name = STAGE
    input_schema = T.SCORES_SCHEMA
    output_schema = T.QUALITY_SCHEMA

    def __init__(self, stats: dict | None):
        self.stats = S.from_dict(stats) if stats is not None else None

    def __call__(self, table: pa.Table) -> pa.Table:
        return quantize_table(table, self.stats)


# --- the passes on Ray (through pipeline.backend) ----------------------------------------------


def part_moments(table: pa.Table) -> Moments:
    """Pass 1's partial: the moments of one part's ok scores."""
    return moments_of(*ok_scores(table))


def fit_moments(parts: list[Path]) -> Moments:
    """Pass 1 on Ray: moments of the ok scores of every part, merged in a canonical order."""
    return backend.aggregate_parts(parts, part_moments, merge_all, columns=[T.STATUS, T.PMOS], desc=f"{STAGE} (fit)")


def _sum_lists(partials: list[list[int]]) -> list[int]:
    return [int(sum(v)) for v in zip(*partials)]


def level_report(output_dir: Path, m: Moments, bins: int) -> LevelReport:
    """Counts per level and prefix and the p-MOS histogram of the written output, on Ray."""
    lo, hi = histogram_range(m.n, m.min, m.max)
    parts = fs.list_parts(output_dir)
    cols = [T.STATUS, T.PMOS, T.QUALITY_LEVEL, T.QUALITY_PREFIX]
    partial = functools.partial(report_partial, lo=lo, hi=hi, bins=bins)
    v = backend.aggregate_parts(parts, partial, _sum_lists, columns=cols, desc=f"{STAGE} (report)")
    k = T.NUM_QUALITY_LEVELS
    return LevelReport(
        level_counts=[int(x) for x in v[:k]],
        prefix_counts={p: int(c) for p, c in zip(PREFIXES, v[k:k + len(PREFIXES)])},
        hist_edges=np.linspace(lo, hi, bins + 1).tolist(),
        hist_counts=[int(x) for x in v[k + len(PREFIXES):]],
        status_counts=backend.status_counts(output_dir),
    )


@dataclass(frozen=True)
class QuantizeResult:
    stats: S.QualityStats | None  # None: no ok row, nothing to fit
    moments: Moments
    report: LevelReport
    stage: StageReport
    output_dir: Path


def run(cfg: QuantizeConfig, input_dir: str | Path, output_dir: str | Path) -> QuantizeResult:
    """Run both passes over a scores folder and write the quality folder (resumable: a part is
    computed again when its input part or the stats changed)."""
    input_dir, output_dir = fs.location(input_dir), fs.location(output_dir)
    moments = fit_moments(fs.list_parts(input_dir))  # 1. corpus statistics, before any output exists
    empty = moments.n == 0 and moments.bad == 0 and cfg.mu is None
    stats = None if empty else make_stats(moments, cfg)  # too few rows, no spread: an error, no folder left
    with fs.stage_output(STAGE, input_dir, output_dir):
        return _write(cfg, input_dir, output_dir, moments, stats)


def _write(cfg: QuantizeConfig, input_dir: Path, output_dir: Path, moments: Moments,
           stats: S.QualityStats | None) -> QuantizeResult:
    jobconfig.save_resolved(cfg, output_dir / CONFIG_FILE)
    if stats is None:
        # an empty corpus (an empty manifest, every clip rejected) flows through: no bands to fit
        log.warning("%s: no ok row with a p-MOS in %s: no statistics; rows pass through with no level", STAGE, input_dir)
        (output_dir / S.STAGE_STATS_FILE).unlink(missing_ok=True)  # an earlier run's stats would not apply
        stage = backend.map_parts(QuantizeStage, {"stats": None}, input_dir, output_dir, cfg.resources, params="no-stats")
        report = level_report(output_dir, moments, cfg.plot_bins)
        report.write(output_dir / REPORT_FILE, "")
        stage.detail = "no ok rows: no statistics"
        return QuantizeResult(None, moments, report, stage, output_dir)
    old = output_dir / S.STAGE_STATS_FILE
    if old.exists() and S.load(old).id != stats.id:
        log.info("%s: the stats changed since the last run (%s -> %s): every part is computed again",
                 STAGE, S.load(old).id, stats.id)
    S.dump(stats, output_dir / S.STAGE_STATS_FILE)
    log.info("%s: stats %s (mu=%s sigma=%s, edges %s)", STAGE, stats.id, stats.mu, stats.sigma, list(stats.band_edges))
    # 2. levels and prefixes, row-wise; the stats id is part of what each part is made from
    stage = backend.map_parts(QuantizeStage, {"stats": stats.to_dict()}, input_dir, output_dir, cfg.resources,
                              params=stats.id)
    # 3. counts, histogram and plot of what was written
    report = level_report(output_dir, moments, cfg.plot_bins)
    report.write(output_dir / REPORT_FILE, stats.id)
    plot_quality(stats, report, output_dir / PLOT_FILE)
    stage.detail = f"mu={stats.mu:.3f} sigma={stats.sigma:.3f} stats {stats.id}"
    return QuantizeResult(stats, moments, report, stage, output_dir)


def main(cfg: QuantizeConfig, input_dir: str | Path, output_dir: str | Path) -> StageReport:
    """The stage entry point: `run`, reported as every stage reports."""
    return run(cfg, input_dir, output_dir).stage


def build_parser() -> argparse.ArgumentParser:
    from pipeline.raycluster import add_ray_args

    p = argparse.ArgumentParser(prog="mosaiq quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="scores folder (part-NNNNN.parquet)")
    p.add_argument("--output", required=True, help="quality folder to write")
    p.add_argument("--config", default=None, help="job YAML; its `quantize` section is read")
    p.add_argument("--mu", type=float, default=None, help="fixed band centre (official QA-MDT: 3.80)")
    p.add_argument("--sigma", type=float, default=None, help="fixed band width (official QA-MDT: 0.20)")
    add_ray_args(p)
    return p


def cli(argv: list[str] | None = None) -> int:
    from pipeline.raycluster import init_ray

    args = build_parser().parse_args(argv)
    try:
        cfg = jobconfig.load(QuantizeConfig, args.config, section=STAGE, mu=args.mu, sigma=args.sigma)
    except jobconfig.ConfigError as e:
        print(f"mosaiq quantize: {e}", file=sys.stderr)
        return 2
    init_ray(args.address, args.num_cpus)
    try:
        result = run(cfg, args.input, args.output)
    except (QuantizeError, FileNotFoundError, T.SchemaError, S.StatsError) as e:
        print(f"mosaiq quantize: {e}", file=sys.stderr)
        return 2
    if result.stats is None:
        print(result.stage.line())
    else:
        print(summary(result.stats, result.report, result.output_dir / S.STAGE_STATS_FILE))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.cli import run_command
    from pipeline.quantize import cli as _cli  # the importable module, so Ray pickles its classes by reference

    sys.exit(run_command("quantize", _cli, None))
