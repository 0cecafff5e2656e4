"""The quality plot: p-MOS histogram with the fitted normal and skew-normal, the band edges,
and the counts per level. Written by `mosaiq quantize` as `quality.png` beside the stats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from schemas import stats as S
from schemas import tables as T

_LEVEL_COLORS = ("#d7301f", "#fc8d59", "#fdcc8a", "#91cf60", "#1a9850")  # level 1 .. 5


def plot_quality(stats: S.QualityStats, report, path: str | Path) -> Path:
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

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    os.replace(tmp, path)
    return path
