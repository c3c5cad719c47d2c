"""The demo's story holds on the shipped easy-vqa models (issue 9's "the demo's story holds"); its
report shows each row's picture (issue 18)."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from esg_memory.demo import THUMB_PX, demo_pictures, run_demo
from esg_memory.images import load_image

URI = "data:image/png;base64,"


class _Tables(HTMLParser):
    """Every <table> as rows of cells, each cell ``(text, [img src, ...])``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, list[str]]]]] = []
        self.imgs_outside: list[str] = []
        self._cell: tuple[list[str], list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ([], [])
        elif tag == "img":
            (self._cell[1] if self._cell is not None else self.imgs_outside).append(a.get("src") or "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(("".join(self._cell[0]), self._cell[1]))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0].append(data)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    report = run_demo(out_dir=out, echo=lines.append)
    return report, out, lines


def _decode(src: str) -> Image.Image:
    assert src.startswith(URI), src[:40]
    data = base64.b64decode(src[len(URI):], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "PNG"
    return im.convert("RGB")


def _row_pictures(out) -> list[list[list[str]]]:
    """Per table, per data row, the img srcs of its first ("picture") cell; checks the header."""
    p = _Tables()
    p.feed((out / "report.html").read_text())
    assert not [s for s in p.imgs_outside if not s.startswith(URI)]  # the plot is embedded too: one file
    tables = []
    for t in p.tables:
        assert t[0][0][0] == "picture"
        tables.append([row[0][1] for row in t[1:]])
    return tables


@pytest.mark.slow  # end to end, several seconds; still run in CI
def test_demo_story_holds_and_writes_report(demo):
    report, out, lines = demo
    failed = [text for text, ok in report.checks if not ok]
    assert not failed, failed
    assert len(report.checks) >= 15
    # an edit generalises to another picture of the same subject and leaves other subjects alone
    titles = {s.title.split(".")[0]: s for s in report.steps}
    assert any("other red circle" in r[0] and r[4] == "oval" for r in titles["2"].rows)
    assert all(r[5] == "yes" for r in titles["3"].rows)
    saved = json.loads((out / "report.json").read_text())
    assert saved["passed"] is True
    assert (out / "report.html").read_text().count("<table") == len(report.steps)
    assert any(line.startswith("Summary:") for line in lines)


@pytest.mark.slow
def test_report_shows_each_rows_picture_as_an_embedded_thumbnail(demo):
    report, out, _ = demo
    tables = _row_pictures(out)
    assert len(tables) == len(report.steps)
    saved = json.loads((out / "report.json").read_text())
    n_pictures = 0
    for st, rows_html, js in zip(report.steps, tables, saved["steps"], strict=True):
        assert len(rows_html) == len(st.rows) == len(js["rows"]) == len(js["pictures"])
        for i, srcs in enumerate(rows_html):
            pic = st.picture(i)
            if pic is None:
                assert srcs == [] and js["pictures"][i] is None, (st.title, st.rows[i])
                continue
            n_pictures += 1
            assert len(srcs) == 1, (st.title, st.rows[i])
            thumb = _decode(srcs[0])
            w, h = pic.size
            assert max(thumb.size) == THUMB_PX
            assert abs(thumb.size[0] / thumb.size[1] - w / h) < 0.05  # aspect kept
            assert js["pictures"][i] == load_image(pic).sha256  # json: the blob id, never pixels
    assert n_pictures >= 20
    assert "base64" not in (out / "report.json").read_text()
    # the picture column is not decoration: the text-only probe has none, every probe of step 2 has one
    step3 = report.steps[2]
    text_only = [i for i, r in enumerate(step3.rows) if r[0] == "text only"]
    assert len(text_only) == 1 and tables[2][text_only[0]] == []
    assert all(len(srcs) == 1 for srcs in tables[1])
    # small thumbnails keep the one-file report small
    size = (out / "report.html").stat().st_size
    assert size < 2 * 1024 * 1024, size


@pytest.mark.slow
def test_a_rows_thumbnail_is_the_picture_of_that_row(demo):
    report, out, _ = demo
    tables = _row_pictures(out)
    pics = demo_pictures()  # the same held-out pictures, loaded independently of the run
    step2 = report.steps[1]
    labels = [r[0] for r in step2.rows]

    def thumb_of(label: str) -> np.ndarray:
        return np.asarray(_decode(tables[1][labels.index(label)][0]), dtype=np.int16)

    def scaled(im: Image.Image) -> np.ndarray:
        small = im.convert("RGB").resize((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        return np.asarray(small, dtype=np.int16)

    red0, red1, blue2 = pics["red circle"][0], pics["red circle"][1], pics["blue triangle"][2]
    a_edit, a_other = thumb_of("A: edit input"), thumb_of("A: other red circle")
    b_other = thumb_of("B: other blue triangle")
    err = lambda got, im: float(np.abs(got - scaled(im)).mean())  # noqa: E731
    assert err(a_edit, red0) < 1.0
    assert err(a_other, red1) < 1.0 and err(a_other, red0) > 2.0  # another red circle, not A's own
    assert err(b_other, blue2) < 1.0 and err(b_other, red0) > 2.0
    # a photo's thumbnail keeps its aspect (coffee is 600 x 400)
    photos = [i for i, r in enumerate(report.steps[2].rows) if r[0].startswith("photo")]
    for i in photos:
        w, h = report.steps[2].picture(i).size
        want = (THUMB_PX, round(h * THUMB_PX / w)) if w >= h else (round(w * THUMB_PX / h), THUMB_PX)
        assert _decode(tables[2][i][0]).size == want
