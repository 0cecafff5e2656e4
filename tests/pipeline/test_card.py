"""The dataset card treats captions as untrusted text: nothing in one becomes a link, an image
or HTML when the card is rendered."""

from __future__ import annotations

import pytest

from pipeline.card import md_cell

HOSTILE = [
    "![x](https://evil.example/p.png)",
    "[click](javascript:alert(1))",
    "[ref][1]\n\n[1]: https://evil.example",
    "see https://x.example and www.y.example",
    "<img src=x onerror=alert(1)>",
    "<https://auto.example>",
    "a | b ` c",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_caption_cells_render_as_plain_text(text):
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py renders the card as a CommonMark reader would")
    cell = md_cell(text)
    assert "\n" not in cell
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(f"| a |\n| - |\n| {cell} |\n")
    assert "<a " not in html and "<img" not in html and "<script" not in html
    body = html.split("<td>")[1].split("</td>")[0]
    assert body.replace("\u200b", "").replace("&lt;", "<").replace("&gt;", ">").replace("&#96;", "`").replace("&quot;", '"') \
        == " ".join(text.split())  # the reader sees what the caption says


def test_long_cells_are_cut_and_empty_ones_shown():
    assert md_cell("x" * 500).endswith("…") and len(md_cell("x" * 500)) <= 160
    assert md_cell(None) == "&nbsp;" and md_cell("") == "&nbsp;"


def test_the_card_shows_the_measured_facts(tmp_path):
    import pyarrow as pa

    from pipeline import card
    from schemas import facts as F
    from schemas import tables as T

    rows = []
    for i in range(6):
        r = T.blank_row(T.CAPTIONS_SCHEMA)
        r.update({T.CLIP_ID: f"clip{i:04d}", T.STATUS: T.OK if i < 5 else T.REJECTED, T.PMOS: 3.5 + 0.1 * i,
                  T.QUALITY_LEVEL: 3, T.CAPTION_ORIGINAL: "a slow song [x](javascript:y)", T.CAPTION: "a fast song",
                  F.TEMPO_BPM: 150.0 + i, F.KEY: "A", F.MODE: "minor", F.LOUDNESS_LUFS: -14.0, F.BANDWIDTH_HZ: 8000.0,
                  F.PERCUSSIVE_RATIO: 0.3, F.DEFECTS: ["band_limited"] if i % 2 else [],
                  T.CAPTION_CONTRADICTS: ["contradicts_tempo"] if i < 2 else [],
                  T.CANDIDATE_REJECTS: ["contradicts_key"] if i == 3 else []})
        rows.append(r)
    table = pa.Table.from_pylist(rows, schema=T.CAPTIONS_SCHEMA)
    report = {"exported": 5, "input_rows": 6, "shards": 1, "bytes": 1000, "stats_id": None, "shard_names": ["shard-000000.tar"]}
    path = card.write_card(tmp_path, table, report, None, examples=5)
    text = path.read_text()
    assert "## Measured facts" in text and f"({card.CARD_DIR}/{card.PLOT_FACTS})" in text
    assert "| band_limited | 2 |" in text and "| clipping | 0 |" in text  # exported (ok) clips only
    assert "contradicts_key 1" in text
    assert "2 original caption(s) contradict the measurements" in text and "150 BPM, A minor" in text
    assert "a slow song \\[x\\](javascript:y)" in text.split("## Measured facts")[1]  # captions stay escaped here too
    assert (tmp_path / card.CARD_DIR / card.PLOT_FACTS).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
