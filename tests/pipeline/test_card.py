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
