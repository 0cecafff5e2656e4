"""What `mosaiq quantize` reports about a quality folder: counts per level and prefix, the
p-MOS histogram (`_quality_report.json`), the plot (`_quality.png`: histogram with the fitted
normal and skew-normal, band edges, counts per level) and the printed summary. Pure; the Ray
aggregate that sums `report_partial` over blocks lives in pipeline/quantize.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import fs
from schemas import stats as S
from schemas import tables as T

REPORT_FILE = "_quality_report.json"  # stage-folder side files start with "_": Parquet readers skip them
PLOT_FILE = "_quality.png"
PREFIXES = (S.PREFIX_LOW, S.PREFIX_MEDIUM, S.PREFIX_HIGH, S.PREFIX_NONE)
_LEVEL_COLORS = ("#d7301f", "#fc8d59", "#fdcc8a", "#91cf60", "#1a9850")  # level 1 .. 5


def report_partial(table: pa.Table, lo: float, hi: float, bins: int) -> list[int]:
    """[5 level counts] + [low, medium, high, none prefix counts] + [bins histogram counts]."""
    ok = table.column(T.STATUS).to_numpy(zero_copy_only=False) == T.OK
    levels = table.column(T.QUALITY_LEVEL).fill_null(0).to_numpy(zero_copy_only=False)[ok]
    prefixes = table.column(T.QUALITY_PREFIX).to_numpy(zero_copy_only=False)[ok]
    scores = table.column(T.PMOS).fill_null(np.nan).to_numpy(zero_copy_only=False)[ok]
    out = np.bincount(levels.astype(np.int64), minlength=T.NUM_QUALITY_LEVELS + 1)[1:].tolist()
    out += [int((prefixes == p).sum()) for p in PREFIXES]
    out += np.histogram(scores, bins=bins, range=(lo, hi))[0].tolist()
    return [int(x) for x in out]


def histogram_range(n: int, lo: float, hi: float) -> tuple[float, float]:
    """The histogram's span: the scores' range, widened when it is empty or a single value."""
    if n == 0:
        return 1.0, 5.0  # the p-MOS scale
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


@dataclass(frozen=True)
class LevelReport:
    level_counts: list[int]  # ok rows per level 1..5
    prefix_counts: dict[str, int]
    hist_edges: list[float]
    hist_counts: list[int]
    status_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self, stats_id: str) -> dict:
        return {"stats_id": stats_id, "level_counts": {str(i + 1): c for i, c in enumerate(self.level_counts)},
                "prefix_counts": self.prefix_counts, "hist_edges": self.hist_edges,
                "hist_counts": self.hist_counts, "status_counts": self.status_counts}

    def write(self, path: str | Path, stats_id: str) -> None:
        fs.atomic_write_text(path, json.dumps(self.to_dict(stats_id), indent=2, sort_keys=True) + "\n")


def summary(st: S.QualityStats, rep: LevelReport, stats_path: Path) -> str:
    """The lines `mosaiq quantize` prints at the end."""
    lines = [f"quality stats {st.id} ({stats_path})", f"  ok scores: {st.count}"]
    if st.fit is not None:
        f, sn = st.fit, st.fit.skewnorm
        lines.append(f"  fitted: mean {f.mean:.4f}  std {f.std:.4f} (ddof {f.std_ddof})  skewness {f.skewness:.4f}  "
                     f"range [{f.min:.3f}, {f.max:.3f}]")
        lines.append(f"  skew-normal ({sn.method}{', clipped' if sn.clipped else ''}): "
                     f"a {sn.a:.4f}  loc {sn.loc:.4f}  scale {sn.scale:.4f}")
    lines.append(f"  bands: mu {st.mu:.4f}  sigma {st.sigma:.4f} ({'fixed' if st.fixed else 'fitted'}); "
                 f"edges {', '.join(f'{e:g}' for e in st.band_edges)}")
    lines.append("  level counts: " + "  ".join(f"{i + 1}: {c}" for i, c in enumerate(rep.level_counts)))
    lines.append("  prefixes: " + "  ".join(f"{p or 'none'}: {c}" for p, c in rep.prefix_counts.items()))
    lines.append("  status: " + "  ".join(f"{k}: {v}" for k, v in sorted(rep.status_counts.items())))
    return "\n".join(lines)


def plot_quality(stats: S.QualityStats, report: LevelReport, path: str | Path) -> Path:
    """Draw the plot from the stats and a report (hist_edges, hist_counts, level_counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats as sps

    edges, counts = np.asarray(report.hist_edges), np.asarray(report.hist_counts, dtype=float)
    width = np.diff(edges)
    total = counts.sum()
    density = counts / (total * width) if total else counts

    fig, (ax, axl) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.3, 1]})
    lo = min(edges[0], stats.band_edges[0] - stats.sigma)
    hi = max(edges[-1], stats.band_edges[-1] + stats.sigma)
    bounds = [lo, *stats.band_edges, hi]
    for i in range(T.NUM_QUALITY_LEVELS):  # shaded bands, one colour per level
        ax.axvspan(bounds[i], bounds[i + 1], color=_LEVEL_COLORS[i], alpha=0.12, lw=0)
    ax.bar(edges[:-1], density, width=width, align="edge", color="#6b7b8c", alpha=0.75, label=f"p-MOS (n={stats.count})")
    x = np.linspace(lo, hi, 400)
    if stats.fit is not None:
        f, sn = stats.fit, stats.fit.skewnorm
        ax.plot(x, sps.norm.pdf(x, f.mean, f.std), color="#1f4e79", lw=1.8,
                label=f"normal  mean {f.mean:.3f}, std {f.std:.3f}")
        ax.plot(x, sps.skewnorm.pdf(x, sn.a, sn.loc, sn.scale), color="#b2182b", lw=1.8, ls="--",
                label=f"skew-normal  a {sn.a:.2f} (skewness {f.skewness:.2f})")
    for k, e in zip(stats.band_multipliers, stats.band_edges):
        ax.axvline(e, color="black", lw=1, ls=":")
        ax.annotate(f"{k:+g}σ\n{e:g}", (e, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("p-MOS")
    ax.set_ylabel("density")
    how = "fixed" if stats.fixed else "fitted"
    ax.set_title(f"μ {stats.mu:g}, σ {stats.sigma:g} ({how})", fontsize=10, pad=26)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)

    levels = np.arange(1, T.NUM_QUALITY_LEVELS + 1)
    bars = axl.bar(levels, report.level_counts, color=_LEVEL_COLORS, edgecolor="black", lw=0.5)
    for b, c in zip(bars, report.level_counts):
        share = f"\n{100 * c / total:.1f}%" if total else ""
        axl.annotate(f"{c}{share}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    axl.set_xticks(levels)
    axl.set_xlabel("quality level")
    axl.set_ylabel("clips")
    axl.set_ylim(0, max(max(report.level_counts), 1) * 1.25)
    axl.set_title("counts per level", fontsize=10, pad=26)
    fig.suptitle(f"quality stats {stats.id}", fontsize=11)
    fig.tight_layout()

    path = fs.location(path)
    try:
        with fs.atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, metadata={"Software": None})  # no version stamp: stable bytes
    finally:
        plt.close(fig)
    return path
