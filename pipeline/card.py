"""The dataset card: `README.md` in the shards folder, with PNG plots under `card/`.

It shows counts per status and reason, the p-MOS histogram with the quality band edges (from
the quality-stats JSON when there is one), level counts, CLAP scores, and refined captions
beside their originals. Captions are untrusted input: they are escaped, never interpreted.
Same inputs, same bytes (the PNGs carry no software version or date).
"""

from __future__ import annotations

import html
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import fs
from schemas import facts as F
from schemas import stats as Q
from schemas import tables as T

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
CARD_DIR = "card"
PLOT_STATUS = "status_reasons.png"
PLOT_PMOS = "pmos.png"
PLOT_LEVELS = "levels.png"
PLOT_CLAP = "clap.png"
PLOT_FACTS = "facts.png"
# the measured-facts columns the card shows when the table has them (analyze ran)
FACT_COLUMNS = [F.TEMPO_BPM, F.TEMPO_CONFIDENCE, F.KEY, F.MODE, F.KEY_CONFIDENCE, F.LOUDNESS_LUFS, F.BANDWIDTH_HZ,
                F.PERCUSSIVE_RATIO, F.KICK_RATIO, F.DEFECTS, T.CAPTION_CONTRADICTS, T.CANDIDATE_REJECTS]
CELL_CHARS = 160  # longest caption shown in a table cell
NO_REASON = "(none)"
STATUS_COLORS = {T.OK: "#3a7d44", T.REJECTED: "#d08c00", T.ERROR: "#b03030"}


def reason_kind(reason: str) -> str:
    """The reason's category: the text before its first ':' (details vary per row)."""
    kind = (reason or "").split(":", 1)[0].strip()
    return kind or NO_REASON


_MD_PUNCT = re.compile(r"([\\\[\]!])")  # what link, image and reference syntax needs


def md_cell(text, limit: int = CELL_CHARS) -> str:
    """Untrusted text as one Markdown table cell: one line, HTML-escaped, pipes escaped, the
    brackets of links and images backslash-escaped, and URLs broken (a zero-width space after
    the scheme, and in `www.`) so that no renderer turns them into links or images."""
    s = " ".join(str("" if text is None else text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    s = html.escape(s, quote=False).replace("`", "&#96;")
    s = _MD_PUNCT.sub(r"\\\1", s).replace("|", "\\|").replace("://", ":/\u200b/").replace("www.", "www\u200b.")
    return s or "&nbsp;"


def status_reason_counts(table: pa.Table) -> list[tuple[str, str, int]]:
    """(status, reason kind, count), ordered by status then count (descending) then reason."""
    c = Counter(zip(table.column(T.STATUS).to_pylist(), map(reason_kind, table.column(T.REASON).to_pylist())))
    order = {s: i for i, s in enumerate(T.STATUSES)}
    return sorted(((s, r, n) for (s, r), n in c.items()), key=lambda x: (order.get(x[0], 99), -x[2], x[1]))


def _figure(width: float = 7.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    return fig, ax


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with fs.atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)


def plot_status(counts: list[tuple[str, str, int]], path: Path) -> None:
    labels = [f"{s}: {r}" if s != T.OK else s for s, r, _ in counts]
    values = [n for _, _, n in counts]
    fig, ax = _figure(7.0, max(1.6, 0.45 * len(counts) + 1.0))
    y = np.arange(len(counts))
    ax.barh(y, values, color=[STATUS_COLORS.get(s, "grey") for s, _, _ in counts])
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v}", va="center", fontsize=9)
    ax.set_xlabel("clips")
    ax.set_title("Clips per status and reason")
    ax.set_xlim(0, max(values + [1]) * 1.15)
    _save(fig, path)


def plot_pmos(exported: np.ndarray, left_out: np.ndarray, stats: Q.QualityStats | None, path: Path) -> None:
    fig, ax = _figure(7.0, 4.0)
    both = np.concatenate([exported, left_out])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (1.0, 5.0)
    if stats is not None:
        lo, hi = min(lo, *stats.band_edges), max(hi, *stats.band_edges)
    bins = np.linspace(lo - 0.05, hi + 0.05, 41)
    ax.hist([exported, left_out], bins=bins, stacked=True, color=[STATUS_COLORS[T.OK], "#999999"],
            label=[f"exported ({exported.size})", f"left out ({left_out.size})"])
    if stats is not None:
        for e in stats.band_edges:
            ax.axvline(e, color="black", linestyle="--", linewidth=1)
        top = ax.secondary_xaxis("top")
        top.set_xticks(list(stats.band_edges), [f"{e:.2f}" for e in stats.band_edges], fontsize=8)
        bounds = [lo] + list(stats.band_edges) + [hi]
        for level in range(1, T.NUM_QUALITY_LEVELS + 1):
            a, b = max(bounds[level - 1], lo), min(bounds[level], hi)
            if b > a:
                ax.text((a + b) / 2, 0.95, f"L{level}", ha="center", va="top", fontsize=9, color="#1f4e99",
                        transform=ax.get_xaxis_transform(), bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
        ax.set_title(f"p-MOS with quality band edges (mu={stats.mu:.3f}, sigma={stats.sigma:.3f})")
    else:
        ax.set_title("p-MOS (no quality-stats JSON: band edges unknown)")
    ax.set_xlabel("p-MOS")
    ax.set_ylabel("clips")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    _save(fig, path)


def plot_levels(levels: list[int], path: Path) -> None:
    c = Counter(levels)
    x = np.arange(1, T.NUM_QUALITY_LEVELS + 1)
    v = [c.get(int(i), 0) for i in x]
    fig, ax = _figure(5.0, 3.2)
    ax.bar(x, v, color="#1f4e99")
    for xi, vi in zip(x, v):
        ax.text(xi, vi, str(vi), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x)
    ax.set_xlabel("quality level")
    ax.set_ylabel("exported clips")
    ax.set_ylim(0, max(v + [1]) * 1.15)
    ax.set_title("Exported clips per quality level")
    _save(fig, path)


def plot_clap(chosen: np.ndarray, original: np.ndarray, left_out: np.ndarray, path: Path) -> None:
    fig, ax = _figure()
    both = np.concatenate([chosen, original, left_out])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (-1.0, 1.0)
    bins = np.linspace(lo - 0.01, hi + 0.01, 31)
    ax.hist(chosen, bins=bins, color="#3a7d44", alpha=0.75, label=f"exported, chosen caption ({chosen.size})")
    ax.hist(original, bins=bins, histtype="step", color="black", linewidth=1.5, label=f"exported, original caption ({original.size})")
    if left_out.size:
        ax.hist(left_out, bins=bins, color="#b03030", alpha=0.6, label=f"left out ({left_out.size})")
    ax.set_xlabel("CLAP text-audio similarity")
    ax.set_ylabel("clips")
    ax.set_title("CLAP scores")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def _floats(values) -> np.ndarray:
    return np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)


def plot_facts(ok: list[dict], path: Path) -> None:
    """Tempo, key, loudness and bandwidth of the exported clips, in one figure of four panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.0), dpi=100)
    tempo = _floats(r.get(F.TEMPO_BPM) for r in ok)
    axes[0, 0].hist(tempo, bins=30, range=(40, 240), color="#4c72b0")
    axes[0, 0].set_title(f"tempo, BPM ({tempo.size})", fontsize=9)
    keys = Counter(f"{r.get(F.KEY)}{'m' if r.get(F.MODE) == F.MINOR else ''}" for r in ok if r.get(F.KEY))
    labels = [k + m for k in F.KEY_NAMES for m in ("", "m")]
    axes[0, 1].bar(range(len(labels)), [keys.get(k, 0) for k in labels], color="#55a868")
    axes[0, 1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axes[0, 1].set_title("key (m: minor)", fontsize=9)
    loud = _floats(r.get(F.LOUDNESS_LUFS) for r in ok)
    axes[1, 0].hist(loud, bins=30, color="#c44e52")
    axes[1, 0].set_title(f"integrated loudness, LUFS ({loud.size})", fontsize=9)
    bw = _floats(r.get(F.BANDWIDTH_HZ) for r in ok) / 1000.0
    axes[1, 1].hist(bw, bins=30, color="#8172b2")
    axes[1, 1].set_title(f"effective bandwidth, kHz ({bw.size})", fontsize=9)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    _save(fig, path)


def facts_section(rows: list[dict], ok: list[dict], examples: int) -> list[str]:
    """The card's measured-facts section: plots, defect counts, candidates dropped for
    contradicting the facts, and original captions that contradict them."""
    if not any(F.DEFECTS in r for r in rows):
        return []
    defects = Counter(d for r in ok for d in (r.get(F.DEFECTS) or []))
    dropped = Counter(x for r in rows for x in (r.get(T.CANDIDATE_REJECTS) or []) if x in F.CHECK_REASONS)
    wrong = [r for r in rows if r.get(T.CAPTION_CONTRADICTS)]
    lines = ["## Measured facts", "", f"![tempo, key, loudness and bandwidth]({CARD_DIR}/{PLOT_FACTS})", "",
             "| defect (exported clips) | clips |", "| --- | ---: |"]
    lines += [f"| {d} | {defects.get(d, 0)} |" for d in F.DEFECT_NAMES]
    lines += ["", "LLM candidates dropped for contradicting the measured facts: "
              + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none") + ".", ""]
    lines.append(f"{len(wrong)} original caption(s) contradict the measurements; the first {min(examples, len(wrong))} by clip id:")
    lines += ["", "| clip | original caption | contradicts | measured |", "| --- | --- | --- | --- |"]
    for r in sorted(wrong, key=lambda r: r[T.CLIP_ID])[:examples]:
        tempo = f"{r[F.TEMPO_BPM]:.0f} BPM" if r.get(F.TEMPO_BPM) else "?"
        key = f"{r.get(F.KEY)} {r.get(F.MODE)}".strip() or "?"
        drums = [f"{name} {r[col]:.4f}" for name, col in (("percussive", F.PERCUSSIVE_RATIO), ("kick", F.KICK_RATIO))
                 if r.get(col) is not None]
        measured = ", ".join([tempo, key, *drums])
        lines.append(f"| `{r[T.CLIP_ID][:12]}` | {md_cell(r[T.CAPTION_ORIGINAL])} | {', '.join(r[T.CAPTION_CONTRADICTS])} | {measured} |")
    return lines + [""]


def render(table: pa.Table, report: dict, stats: Q.QualityStats | None, examples: int) -> str:
    """The card's Markdown (plots are referenced under `card/`)."""
    rows = table.to_pylist()
    ok = sorted((r for r in rows if r[T.STATUS] == T.OK), key=lambda r: r[T.CLIP_ID])
    counts = status_reason_counts(table)
    lines = [
        "# mosaiq dataset card",
        "",
        f"{report['exported']} of {report['input_rows']} clips exported to {report['shards']} WebDataset "
        f"shard(s), {report['bytes'] / 1e6:.1f} MB (FLAC + JSON per sample, stable-audio-tools layout).",
        "",
        "| | |",
        "| --- | --- |",
        f"| quality stats id | `{report['stats_id'] or 'none'}` |",
    ]
    if stats is not None:
        lines += [
            f"| mu, sigma | {stats.mu:.4f}, {stats.sigma:.4f} ({'fixed' if stats.fixed else 'fitted'}) |",
            f"| band edges | {', '.join(f'{e:.4f}' for e in stats.band_edges)} |",
        ]
    lines += [
        "",
        f"Load with `webdataset.WebDataset(\"{_brace(report)}\", shardshuffle=...)` and decode",
        "`flac` with soundfile; `json` holds `prompt` (with the quality prefix) and `quality_level`.",
        "`sizes.json`, `index.parquet`, `SHA256SUMS` and `export_report.json` sit beside the shards;",
        "`mosaiq verify .` re-checks everything.",
        "",
        "## Clips per status and reason",
        "",
        "| status | reason | clips |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| {s} | {md_cell(r)} | {n} |" for s, r, n in counts]
    lines += ["", f"![clips per status and reason]({CARD_DIR}/{PLOT_STATUS})", "",
              "## p-MOS", "", f"![p-MOS histogram]({CARD_DIR}/{PLOT_PMOS})", "",
              "## Quality levels", "", f"![exported clips per quality level]({CARD_DIR}/{PLOT_LEVELS})", "",
              "## CLAP scores", "", f"![CLAP scores]({CARD_DIR}/{PLOT_CLAP})", ""]
    lines += facts_section(rows, ok, examples)
    lines += ["## Refined captions", ""]
    refined = [r for r in ok if (r[T.CAPTION] or "") != (r[T.CAPTION_ORIGINAL] or "")]
    lines.append(f"{len(refined)} of {len(ok)} exported clips use an LLM-refined caption; the first {min(examples, len(refined))} by clip id:")
    lines += ["", "| clip | level | CLAP original → chosen | original caption | refined caption |", "| --- | ---: | --- | --- | --- |"]
    for r in refined[:examples]:
        clap = f"{_fmt(r[T.CLAP_ORIGINAL])} → {_fmt(r[T.CLAP_SCORE])}"
        lines.append(f"| `{r[T.CLIP_ID][:12]}` | {r[T.QUALITY_LEVEL]} | {clap} | {md_cell(r[T.CAPTION_ORIGINAL])} | {md_cell(r[T.CAPTION])} |")
    return "\n".join(lines) + "\n"


def _brace(report: dict) -> str:
    """The brace pattern naming every shard, e.g. `shard-{000000..000012}.tar`."""
    names = sorted(report.get("shard_names") or [])
    if len(names) <= 1:
        return names[0] if names else "(no shards)"
    stem, last = names[0].rsplit("-", 1)[0], names[-1].rsplit("-", 1)[1]
    first = names[0].rsplit("-", 1)[1]
    ext = first[first.index("."):]
    return f"{stem}-{{{first[: first.index('.')]}..{last[: last.index('.')]}}}{ext}"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def write_card(out_dir: str | Path, table: pa.Table, report: dict, stats: Q.QualityStats | None, examples: int) -> Path:
    """Write README.md and its plots into `out_dir`; return the README path."""
    out = fs.location(out_dir)
    plots = out / CARD_DIR
    if not fs.is_remote(plots):
        plots.mkdir(parents=True, exist_ok=True)
    status = table.column(T.STATUS).to_pylist()
    is_ok = [s == T.OK for s in status]
    pmos = table.column(T.PMOS).to_pylist()
    clap = table.column(T.CLAP_SCORE).to_pylist()
    plot_status(status_reason_counts(table), plots / PLOT_STATUS)
    plot_pmos(_floats(p for p, k in zip(pmos, is_ok) if k), _floats(p for p, k in zip(pmos, is_ok) if not k), stats, plots / PLOT_PMOS)
    plot_levels([lv for lv, k in zip(table.column(T.QUALITY_LEVEL).to_pylist(), is_ok) if k and lv is not None], plots / PLOT_LEVELS)
    plot_clap(_floats(c for c, k in zip(clap, is_ok) if k),
              _floats(c for c, k in zip(table.column(T.CLAP_ORIGINAL).to_pylist(), is_ok) if k),
              _floats(c for c, k in zip(clap, is_ok) if not k), plots / PLOT_CLAP)
    if F.DEFECTS in table.column_names:
        plot_facts([r for r in table.to_pylist() if r[T.STATUS] == T.OK], plots / PLOT_FACTS)
    path = out / CARD_FILE
    fs.atomic_write_text(path, render(table, report, stats, examples))
    log.info("export: dataset card written to %s", path)
    return path
