"""The product's story in one run, with real calls on the embedded default models.

A small LLaVA trained on easy-vqa pictures is edited through a scoped memory: edits answer
their new targets on the edit input, its rephrasings and other pictures of the same subject;
unrelated inputs run the bare model bit for bit; a conflicting correction re-scopes only its
neighbour; revisions roll back; deletes are instant; a saved memory reloads to the same
answers. Every claim is checked, printed as a table and written to an HTML report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import ConfigError
from .images import load_image
from .loading import DEFAULT_ENCODER, DEFAULT_MODEL, load_base_model, load_encoder, new_memory

__all__ = ["DemoReport", "DemoStep", "demo_pictures", "run_demo"]

logger = logging.getLogger(__name__)

SHAPE_Q = "what shape is in the image?"
SHAPE_Q2 = "what shape does the image contain?"
COLOR_Q = "what color is the shape?"
#: The longer side of a row's thumbnail in ``report.html``, in pixels (easy-vqa pictures are 64 x 64).
THUMB_PX = 64


@dataclass
class DemoStep:
    title: str
    header: list[str]
    rows: list[list[Any]]
    checks: list[tuple[str, bool]] = field(default_factory=list)
    note: str = ""
    #: Per row, the picture of its input (a PIL image) or None (text only / no input); may be empty.
    pictures: list[Any] = field(default_factory=list)

    def picture(self, i: int) -> Any:
        return self.pictures[i] if i < len(self.pictures) else None

    def markdown(self) -> str:
        cells = [self.header] + [[str(c) for c in r] for r in self.rows]
        w = [max(len(str(r[i])) for r in cells) for i in range(len(self.header))]
        line = lambda r: "| " + " | ".join(str(c).ljust(x) for c, x in zip(r, w, strict=False)) + " |"  # noqa: E731
        out = [f"## {self.title}", line(self.header), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
        out += [line(r) for r in cells[1:]]
        out += [f"{'PASS' if ok else 'FAIL'}  {text}" for text, ok in self.checks]
        if self.note:
            out.append(self.note)
        return "\n".join(out)


@dataclass
class DemoReport:
    steps: list[DemoStep]
    seconds: float
    model: str
    encoder: str

    @property
    def checks(self) -> list[tuple[str, bool]]:
        return [c for s in self.steps for c in s.checks]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.checks)


def demo_pictures() -> dict[str, list[Image.Image]]:
    """Held-out easy-vqa pictures grouped by subject (``"red circle"`` -> PIL images), plus photos."""
    try:
        import easy_vqa
    except ImportError:
        raise ConfigError(
            "the demo's pictures come from PyPI easy-vqa: pip install 'esg-memory[eval]'"
        ) from None

    from .pretrained import derive_subjects

    qs, ans, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    groups: dict[str, list[Image.Image]] = {}
    for i, (shape, colour) in sorted(derive_subjects(qs, ans, ids).items()):
        if shape and colour:
            key = f"{colour} {shape}"
            if len(groups.setdefault(key, [])) < 4:
                with Image.open(paths[i]) as im:
                    groups[key].append(im.convert("RGB"))
    try:
        import skimage.data

        groups["photo"] = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]
    except ImportError:  # scikit-image is in the eval extra; the story holds without photos
        groups["photo"] = []
    return groups


class _Story:
    def __init__(self, model_spec: str, clip_spec: str, placement: dict[str, Any] | None = None,
                 encoder_device: Any = None):
        from .model import EditedModel

        self.base, self.processor = load_base_model(model_spec, **(placement or {}))
        self.encoder = load_encoder(clip_spec, device=encoder_device)
        # default adapters: "auto" tunes a full K/V prefix here, since the tiny model's fits in a few KiB
        memory = new_memory(self.encoder, clip_spec)
        self.model = EditedModel.wrap(self.base, self.processor, memory=memory, encoder=self.encoder)
        self.pics = demo_pictures()
        self.names: dict[int, str] = {}
        self.inputs: dict[int, Any] = {}  # edit id -> the picture it was added on

    def answer(self, image: Any, question: str) -> tuple[str, int]:
        r = self.model.retrieve([image], [question])[0]
        return self.model.answer([image], [question], max_new_tokens=6)[0], r.edit_id

    def bare(self, image: Any, question: str) -> str:
        with self.model.disable_edits():
            return self.model.answer([image], [question], max_new_tokens=6)[0]

    def bit_identical(self, image: Any, question: str) -> bool:
        inputs = self.model.build_inputs([image], [question])
        with torch.no_grad():
            wrapped = self.model.forward(**inputs, route_images=[image], route_texts=[question]).logits
            bare = self.base(**inputs).logits
        return bool(torch.equal(wrapped, bare))

    def scope_row(self, eid: int) -> list[Any]:
        _keys, thr = self.model.memory.keys_of(eid)
        return [
            self.names[eid],
            eid,
            self.model.memory.get(eid).version,
            len(thr),
            " ".join(f"{t:.3f}" for t in thr),
        ]


def _probe_rows(s: _Story, probes: Sequence[tuple[str, Any, str, str]]) -> tuple[list[list[Any]], list[bool]]:
    rows, ok = [], []
    for label, img, q, want in probes:
        got, eid = s.answer(img, q)
        hit = got.strip() == want
        rows.append([label, q, s.names.get(eid, "-"), s.bare(img, q), got, want])
        ok.append(hit)
    return rows, ok


def _steps(s: _Story) -> list[DemoStep]:
    p, mem, steps = s.pics, s.model.memory, []
    red, blue, green = p["red circle"], p["blue triangle"], p["green rectangle"]
    edits = [
        ("A", red[0], SHAPE_Q, "oval", [SHAPE_Q2]),
        ("B", blue[0], COLOR_Q, "cobalt", ["what is the color of the shape?"]),
        ("C", green[0], SHAPE_Q, "box", [SHAPE_Q2]),
    ]
    rows, t_add = [], []
    for name, img, q, a, pos in edits:
        t0 = time.perf_counter()
        eid = s.model.add_edit(img, q, a, positives=pos, tune="sync")
        t_add.append(time.perf_counter() - t0)
        s.names[eid] = name
        s.inputs[eid] = img
        rows.append([name, eid, q, a, f"{t_add[-1]:.2f}s", *s.scope_row(eid)[3:]])
    ids = {n: e for e, n in s.names.items()}
    steps.append(
        DemoStep(
            "1. Add three edits (compiled at once, then tuned)",
            ["edit", "id", "question", "new answer", "add+tune", "keys", "thresholds"],
            rows,
            [
                (f"{name}'s adapter tuned to an exact match", bool(getattr(report, "exact", False)))
                for e, name in s.names.items()
                for report in [s.model.tune_reports.get(e)]
            ],
            pictures=[img for _, img, *_ in edits],
        )
    )

    probes = [
        ("A: edit input", red[0], SHAPE_Q, "oval"),
        ("A: rephrased", red[0], SHAPE_Q2, "oval"),
        ("A: other red circle", red[1], SHAPE_Q, "oval"),
        ("B: edit input", blue[0], COLOR_Q, "cobalt"),
        ("B: other blue triangle", blue[2], COLOR_Q, "cobalt"),
        ("C: edit input", green[0], SHAPE_Q, "box"),
        ("C: rephrased", green[0], SHAPE_Q2, "box"),
    ]
    rows, ok = _probe_rows(s, probes)
    steps.append(
        DemoStep(
            "2. Edit inputs, rephrasings and other pictures of the same subject",
            ["probe", "question", "fired", "bare", "edited", "target"],
            rows,
            [(f"{r[0]} answers {r[5]!r}", o) for r, o in zip(rows, ok, strict=False)],
            pictures=[img for _, img, _, _ in probes],
        )
    )

    unrelated = [
        ("yellow triangle", p["yellow triangle"][0], SHAPE_Q),
        ("gray rectangle", p["gray rectangle"][0], COLOR_Q),
        ("A's picture, other question", red[0], COLOR_Q),
        ("text only", None, "what is the capital of france?"),
    ]
    unrelated += [(f"photo {i}", im, SHAPE_Q) for i, im in enumerate(p.get("photo", []))]
    rows, checks = [], []
    for label, img, q in unrelated:
        got, eid = s.answer(img, q)
        same = s.bit_identical(img, q)
        rows.append([label, q, s.names.get(eid, "-"), s.bare(img, q), got, "yes" if same else "NO"])
        checks.append((f"{label}: no edit fires, logits bit-identical to the bare model", eid == -1 and same))
    steps.append(
        DemoStep(
            "3. Unrelated inputs run the bare model bit for bit",
            ["input", "question", "fired", "bare", "edited", "bit-identical"],
            rows,
            checks,
            pictures=[img for _, img, _ in unrelated],
        )
    )

    before = {e: s.scope_row(e)[4] for e in s.names}
    eid_d = s.model.add_edit(red[2], SHAPE_Q, "disc", tune="sync")
    s.names[eid_d] = "D"
    s.inputs[eid_d] = red[2]
    after = {e: s.scope_row(e)[4] for e in s.names if e != eid_d}
    moved = [s.names[e] for e in after if after[e] != before[e]]
    rows = [
        [s.names[e], before[e], after[e], "re-scoped" if after[e] != before[e] else "unchanged"]
        for e in after
    ]
    d_ans, _ = s.answer(red[2], SHAPE_Q)
    a_ans, _ = s.answer(red[0], SHAPE_Q)
    steps.append(
        DemoStep(
            "4. A conflicting correction (D: another red circle is a 'disc') re-scopes only its neighbour",
            ["edit", "thresholds before D", "after D", "effect"],
            rows,
            [
                ("B and C keep their scopes", "B" not in moved and "C" not in moved),
                (f"D's input answers 'disc' (got {d_ans!r})", d_ans.strip() == "disc"),
                (f"A's input still answers 'oval' (got {a_ans!r})", a_ans.strip() == "oval"),
                (f"conflicts left: {len(mem.conflicts())}", True),
            ],
            note=f"re-scoped: {', '.join(moved) or 'none'}",
            pictures=[s.inputs[e] for e in after],
        )
    )

    v2 = s.model.revise_edit(ids["B"], answer="azure", tune="sync")
    revised, _ = s.answer(blue[0], COLOR_Q)
    mem.rollback(ids["B"], 1)
    s.model.tune_edit(ids["B"])
    rolled, _ = s.answer(blue[0], COLOR_Q)
    rows = [[v.version, v.answer] for v in mem.history(ids["B"])]
    steps.append(
        DemoStep(
            "5. Revise B to 'azure', then roll back to version 1",
            ["version", "answer"],
            rows,
            [
                (f"after revise (v{v2}) B answers 'azure' (got {revised!r})", revised.strip() == "azure"),
                (f"after rollback B answers 'cobalt' (got {rolled!r})", rolled.strip() == "cobalt"),
            ],
            pictures=[blue[0]] * len(rows),
        )
    )

    bare_c = s.bare(green[0], SHAPE_Q)
    s.model.delete_edit(ids["C"])
    got_c, eid_c = s.answer(green[0], SHAPE_Q)
    same_c = s.bit_identical(green[0], SHAPE_Q)
    steps.append(
        DemoStep(
            "6. Delete C: the very next call is the bare model",
            ["probe", "fired", "bare", "edited", "bit-identical"],
            [["C: edit input", s.names.get(eid_c, "-"), bare_c, got_c, "yes" if same_c else "NO"]],
            [("C's input answers as the bare model, bit for bit", eid_c == -1 and same_c)],
            pictures=[green[0]],
        )
    )

    keep = [
        (red[0], SHAPE_Q),
        (red[2], SHAPE_Q),
        (blue[0], COLOR_Q),
        (green[0], SHAPE_Q),
        (p["yellow triangle"][0], SHAPE_Q),
    ]
    before_ans = [s.answer(im, q)[0] for im, q in keep]
    with tempfile.TemporaryDirectory() as d:
        from .model import EditedModel

        s.model.save(d)
        fresh = EditedModel.wrap(s.base, s.processor, memory=d, encoder=s.encoder)
        after_ans = [fresh.answer([im], [q], max_new_tokens=6)[0] for im, q in keep]
    rows = [[q, b, a] for (_, q), b, a in zip(keep, before_ans, after_ans, strict=False)]
    steps.append(
        DemoStep(
            "7. Save, reload into a fresh wrapper: same answers",
            ["question", "before save", "after reload"],
            rows,
            [("every answer identical after reload", before_ans == after_ans)],
            pictures=[im for im, _ in keep],
        )
    )
    return steps


def _thumbnail_png(image: Any, px: int = THUMB_PX) -> bytes:
    """``image`` scaled so its longer side is ``px`` pixels (aspect kept), as PNG bytes."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    scale = px / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    buf = io.BytesIO()
    rgb.resize(size, Image.Resampling.LANCZOS).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class _Pictures:
    """Each distinct picture's blob id (the SHA-256 a memory stores it under) and thumbnail, computed once."""

    def __init__(self) -> None:
        self._sha: dict[int, tuple[Any, str]] = {}
        self._uri: dict[str, str] = {}

    def sha256(self, image: Any) -> str | None:
        if image is None:
            return None
        if id(image) not in self._sha:  # the image is held too, so its id is not reused meanwhile
            self._sha[id(image)] = (image, load_image(image).sha256)
        return self._sha[id(image)][1]

    def cell(self, image: Any, label: str) -> str:
        sha = self.sha256(image)
        if sha is None:
            return "<td>text only</td>"
        if sha not in self._uri:
            self._uri[sha] = _data_uri(_thumbnail_png(image))
        alt = html.escape("picture: " + label)
        return f'<td><img src="{self._uri[sha]}" alt="{alt}" title="sha256 {sha}"></td>'


def _table(st: DemoStep, pics: _Pictures) -> str:
    shown = any(st.picture(i) is not None for i in range(len(st.rows)))
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in (["picture"] if shown else []) + st.header)
    body = "".join(
        "<tr>"
        + (pics.cell(st.picture(i), str(r[0]) if r else "") if shown else "")
        + "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
        + "</tr>"
        for i, r in enumerate(st.rows)
    )
    return f"<table border=1 cellpadding=4><tr>{head}</tr>{body}</table>"


def _html(report: DemoReport, plot: str | None, pics: _Pictures | None = None) -> str:
    pics = pics or _Pictures()
    parts = [
        f"<h1>esg-memory demo</h1><p>model <code>{html.escape(report.model)}</code>, encoder "
        f"<code>{html.escape(report.encoder)}</code>, {report.seconds:.1f} s, "
        f"{sum(ok for _, ok in report.checks)}/{len(report.checks)} checks passed</p>"
    ]
    for st in report.steps:
        checks = "".join(f"<li>{'PASS' if ok else 'FAIL'} {html.escape(t)}</li>" for t, ok in st.checks)
        parts.append(f"<h2>{html.escape(st.title)}</h2>{_table(st, pics)}<ul>{checks}</ul>")
    if plot:
        parts.append(f'<img src="{plot}" alt="checks per step">')
    return "<html><body style='font-family:sans-serif'>" + "".join(parts) + "</body></html>"


def _plot(report: DemoReport, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [s.title.split(" ", 1)[0].rstrip(".") for s in report.steps]
    passed = [sum(ok for _, ok in s.checks) for s in report.steps]
    failed = [sum(not ok for _, ok in s.checks) for s in report.steps]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(names, passed, color="tab:green", label="passed")
    ax.bar(names, failed, bottom=passed, color="tab:red", label="failed")
    ax.set_xlabel("demo step")
    ax.set_ylabel("checks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_demo(
    out_dir: str | Path = "esg-demo-out",
    model: str | None = None,
    clip: str | None = None,
    echo: Callable[[str], None] | None = None,
    placement: dict[str, Any] | None = None,
    encoder_device: Any = None,
) -> DemoReport:
    """Run the story, write ``report.html``, ``report.json`` and ``checks.png``.

    Each step's table goes to ``echo`` (the CLI passes ``print``) or to the log. ``placement``: keywords of
    `load_base_model` (``device``, ``dtype``, ``device_map``); ``encoder_device``: where the key encoder runs.
    """
    say = echo or logger.info
    t0 = time.perf_counter()
    torch.manual_seed(0)
    story = _Story(model or DEFAULT_MODEL, clip or DEFAULT_ENCODER, placement, encoder_device)
    steps = []
    for step in _steps(story):
        steps.append(step)
        say(step.markdown() + "\n")
    report = DemoReport(steps, time.perf_counter() - t0, model or DEFAULT_MODEL, story.encoder.name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = None  # embedded too, so report.html is one self-contained file
    if _plot(report, out / "checks.png"):
        plot = _data_uri((out / "checks.png").read_bytes())
    pics = _Pictures()
    (out / "report.html").write_text(_html(report, plot, pics))
    (out / "report.json").write_text(
        json.dumps(
            {
                "seconds": report.seconds,
                "model": report.model,
                "encoder": report.encoder,
                "passed": report.passed,
                "steps": [
                    {
                        "title": s.title,
                        "header": s.header,
                        "rows": s.rows,
                        "checks": s.checks,
                        # per row, the blob id (sha256 of the stored PNG) of its picture; null: text only
                        "pictures": [pics.sha256(s.picture(i)) for i in range(len(s.rows))],
                    }
                    for s in steps
                ],
            },
            indent=2,
            default=str,
        )
    )
    n_ok = sum(ok for _, ok in report.checks)
    say(
        f"Summary: {n_ok}/{len(report.checks)} checks passed in {report.seconds:.1f} s "
        f"(model {report.model}, encoder {report.encoder}). Report: {out / 'report.html'}"
    )
    return report
