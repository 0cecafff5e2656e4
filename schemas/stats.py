"""The quality-stats JSON: what defines a corpus's quality levels and prefixes, versioned.

`mosaiq quantize` writes it as `quality_stats.json` in its output folder; the export stage
copies it into the shards and the trainer into every checkpoint. Each quality row carries its
`id` in `stats_id`. The id is the first 16 hex digits of the sha256 of the canonical JSON
(sorted keys, no whitespace) of everything but the id, so equal content means equal id.

Band edges are in score units and rounded to `EDGE_DECIMALS` decimals, so that the official
QA-MDT numbers come out exact: 3.80 - 0.20 is 3.5999999999999996 in floating point, and
3.70 + 2 * 0.20 is 4.1000000000000005 (a score of 4.10 must then be level 5, not level 4).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from schemas.tables import NUM_QUALITY_LEVELS

STATS_VERSION = 1
STATS_KIND = "mosaiq.quality_stats"
STATS_FILE = "quality_stats.json"  # in the shards folder, where the trainer reads it beside the shards
STAGE_STATS_FILE = "_quality_stats.json"  # in the quantize output folder ("_": Parquet readers skip it)
EDGE_DECIMALS = 12
ID_HEX_DIGITS = 16
STD_DDOF = 0  # the population standard deviation (np.std's default) defines sigma

PREFIX_LOW = "low quality"
PREFIX_MEDIUM = "medium quality"
PREFIX_HIGH = "high quality"
PREFIX_NONE = ""

SKEWNORM_METHOD = "moments"  # skew-normal parameters from mean, std and skewness


class StatsError(ValueError):
    """A quality-stats JSON is malformed or inconsistent."""


def round_edge(x: float) -> float:
    return round(float(x), EDGE_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def band_edges(mu: float, sigma: float, multipliers) -> tuple[float, ...]:
    """Score values mu + k * sigma for each multiplier k, rounded to EDGE_DECIMALS."""
    return tuple(round_edge(mu + k * sigma) for k in multipliers)


@dataclass(frozen=True)
class SkewNormal:
    """scipy.stats.skewnorm(a, loc, scale) parameters; `clipped` when the sample skewness
    exceeded what a skew-normal can have and was clipped to the largest allowed value."""

    a: float
    loc: float
    scale: float
    method: str = SKEWNORM_METHOD
    clipped: bool = False


@dataclass(frozen=True)
class Fit:
    """Statistics of the `ok` p-MOS scores (population std, biased Fisher-Pearson skewness)."""

    mean: float
    std: float
    skewness: float
    min: float
    max: float
    skewnorm: SkewNormal
    std_ddof: int = STD_DDOF


@dataclass(frozen=True)
class QualityStats:
    """Everything that maps a p-MOS score to a quality level and prefix, plus the corpus fit.

    `fit` is None only when `fixed` is true and the corpus had too few distinct scores to fit.
    """

    count: int  # ok rows with a p-MOS
    fit: Fit | None
    mu: float
    sigma: float
    fixed: bool  # mu/sigma were given, not taken from the fit
    band_multipliers: tuple[float, ...]
    band_edges: tuple[float, ...]  # level = 1 + number of edges <= score
    prefix_low_below: float  # multipliers of sigma; the score edges follow
    prefix_medium_within: float
    prefix_high_above: float
    prefix_edges: dict  # {"low_below": x, "medium_from": x, "medium_to": x, "high_above": x}
    version: int = STATS_VERSION
    kind: str = STATS_KIND

    @property
    def id(self) -> str:
        return stats_id(self.to_dict(with_id=False))

    def to_dict(self, with_id: bool = True) -> dict:
        d = asdict(self)
        d["band_multipliers"] = list(self.band_multipliers)
        d["band_edges"] = list(self.band_edges)
        if with_id:
            d["id"] = stats_id(d)
        return d


def prefix_edges(mu: float, sigma: float, low_below: float, medium_within: float, high_above: float) -> dict:
    return {
        "low_below": round_edge(mu + low_below * sigma),
        "medium_from": round_edge(mu - medium_within * sigma),
        "medium_to": round_edge(mu + medium_within * sigma),
        "high_above": round_edge(mu + high_above * sigma),
    }


def canonical_json(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def stats_id(d: dict) -> str:
    body = {k: v for k, v in d.items() if k != "id"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()[:ID_HEX_DIGITS]


def dumps(stats: QualityStats) -> str:
    """Stable bytes: sorted keys, two-space indent, trailing newline."""
    return json.dumps(stats.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"


def _finite(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise StatsError(f"quality stats: {name} must be a finite number, got {x!r}")
    return float(x)


def _exact_keys(d, cls, where: str) -> None:
    if not isinstance(d, dict):
        raise StatsError(f"quality stats: {where} must be an object, got {d!r}")
    names = {f.name for f in fields(cls)}
    if set(d) != names:
        raise StatsError(
            f"quality stats: {where} has keys {sorted(d)}; expected {sorted(names)} "
            f"(missing {sorted(names - set(d))}, unknown {sorted(set(d) - names)})"
        )


def from_dict(d: dict) -> QualityStats:
    """Parse and validate a quality-stats object (as `to_dict` makes it), checking its id."""
    if not isinstance(d, dict):
        raise StatsError(f"quality stats: expected an object, got {type(d).__name__}")
    if d.get("kind") != STATS_KIND or d.get("version") != STATS_VERSION:
        raise StatsError(
            f"quality stats: kind/version is {d.get('kind')!r}/{d.get('version')!r}, "
            f"expected {STATS_KIND!r}/{STATS_VERSION}"
        )
    body = {k: v for k, v in d.items() if k != "id"}
    _exact_keys(body, QualityStats, "top level")
    fit = body["fit"]
    if fit is not None:
        _exact_keys(fit, Fit, "fit")
        _exact_keys(fit["skewnorm"], SkewNormal, "fit.skewnorm")
        sn = fit["skewnorm"]
        fit = Fit(
            **{k: _finite(f"fit.{k}", fit[k]) for k in ("mean", "std", "skewness", "min", "max")},
            skewnorm=SkewNormal(
                **{k: _finite(f"fit.skewnorm.{k}", sn[k]) for k in ("a", "loc", "scale")},
                method=str(sn["method"]),
                clipped=bool(sn["clipped"]),
            ),
            std_ddof=int(fit["std_ddof"]),
        )
    count = body["count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise StatsError(f"quality stats: count must be an integer >= 0, got {count!r}")
    stats = QualityStats(
        count=count,
        fit=fit,
        mu=_finite("mu", body["mu"]),
        sigma=_finite("sigma", body["sigma"]),
        fixed=bool(body["fixed"]),
        band_multipliers=tuple(_finite("band_multipliers[]", k) for k in body["band_multipliers"]),
        band_edges=tuple(_finite("band_edges[]", e) for e in body["band_edges"]),
        prefix_low_below=_finite("prefix_low_below", body["prefix_low_below"]),
        prefix_medium_within=_finite("prefix_medium_within", body["prefix_medium_within"]),
        prefix_high_above=_finite("prefix_high_above", body["prefix_high_above"]),
        prefix_edges={k: _finite(f"prefix_edges.{k}", v) for k, v in dict(body["prefix_edges"]).items()},
    )
    validate(stats)
    if "id" in d and d["id"] != stats.id:
        raise StatsError(f"quality stats: id {d['id']!r} does not match the content (expected {stats.id!r})")
    return stats


def validate(stats: QualityStats) -> QualityStats:
    """Raise StatsError if the stats are inconsistent; return them unchanged otherwise."""
    if stats.sigma <= 0:
        raise StatsError(f"quality stats: sigma must be > 0, got {stats.sigma!r}")
    if len(stats.band_multipliers) != NUM_QUALITY_LEVELS - 1:
        raise StatsError(
            f"quality stats: need {NUM_QUALITY_LEVELS - 1} band multipliers for {NUM_QUALITY_LEVELS} levels, "
            f"got {list(stats.band_multipliers)}"
        )
    if any(b <= a for a, b in zip(stats.band_multipliers, stats.band_multipliers[1:])):
        raise StatsError(f"quality stats: band multipliers must increase strictly, got {list(stats.band_multipliers)}")
    expected = band_edges(stats.mu, stats.sigma, stats.band_multipliers)
    if tuple(stats.band_edges) != expected:
        raise StatsError(f"quality stats: band edges {list(stats.band_edges)} do not follow from mu/sigma/multipliers {list(expected)}")
    if stats.prefix_medium_within < 0 or not stats.prefix_low_below < stats.prefix_high_above:
        raise StatsError(
            "quality stats: prefix multipliers need medium_within >= 0 and low_below < high_above, got "
            f"{stats.prefix_low_below}, {stats.prefix_medium_within}, {stats.prefix_high_above}"
        )
    pe = prefix_edges(stats.mu, stats.sigma, stats.prefix_low_below, stats.prefix_medium_within, stats.prefix_high_above)
    if stats.prefix_edges != pe:
        raise StatsError(f"quality stats: prefix edges {stats.prefix_edges} do not follow from mu/sigma/multipliers {pe}")
    if stats.fit is None and not stats.fixed:
        raise StatsError("quality stats: fit is missing but mu/sigma are not fixed")
    if stats.fit is not None:
        if stats.fit.std <= 0:
            raise StatsError(f"quality stats: fit.std must be > 0, got {stats.fit.std!r}")
        if not stats.fixed and (stats.mu, stats.sigma) != (stats.fit.mean, stats.fit.std):
            raise StatsError(f"quality stats: fitted mu/sigma {stats.mu}/{stats.sigma} differ from the fit {stats.fit.mean}/{stats.fit.std}")
    return stats


def loads(text: str) -> QualityStats:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise StatsError(f"quality stats: not valid JSON ({e})") from e
    return from_dict(d)


def load(path: str | Path) -> QualityStats:
    from pipeline.fs import location  # local paths and object storage alike

    path = location(path)
    if not path.is_file():
        raise StatsError(f"quality stats file {str(path)!r} does not exist")
    return loads(path.read_text(encoding="utf-8"))


def dump(stats: QualityStats, path: str | Path) -> None:
    """Write under a temporary name, then rename (same stats -> same bytes)."""
    from pipeline.fs import atomic_write_text  # the one atomic writer (imported here: schemas has no deps)

    atomic_write_text(path, dumps(validate(stats)))


def make(
    count: int,
    fit: Fit | None,
    mu: float,
    sigma: float,
    fixed: bool,
    band_multipliers,
    prefix_low_below: float,
    prefix_medium_within: float,
    prefix_high_above: float,
) -> QualityStats:
    """Build validated stats, deriving the band and prefix edges from mu/sigma."""
    mult = tuple(float(k) for k in band_multipliers)
    stats = QualityStats(
        count=int(count),
        fit=fit,
        mu=float(mu),
        sigma=float(sigma),
        fixed=bool(fixed),
        band_multipliers=mult,
        band_edges=band_edges(mu, sigma, mult) if sigma > 0 else (),
        prefix_low_below=float(prefix_low_below),
        prefix_medium_within=float(prefix_medium_within),
        prefix_high_above=float(prefix_high_above),
        prefix_edges=prefix_edges(mu, sigma, prefix_low_below, prefix_medium_within, prefix_high_above),
    )
    return validate(stats)

