"""Loaders for the edit-benchmark formats people already have, and `load_dataset` over every kind.

Every loader turns its file into :class:`EditCase` objects (one edit with its probes, defined in
:mod:`.cases` and re-exported here) inside an :class:`EvalDataset`, validating as it goes: a missing
or mistyped field raises :class:`DatasetError` naming the file, the record index and the field.

Images. MMEdit and VLKEB records carry *relative* image paths. With ``image_root`` every path is
resolved under it and a missing file is an :class:`~esg_memory.errors.ImageError` naming it (checked
at load time, before any model runs). Without ``image_root`` the loaders run in **text-side mode**:
each image is replaced by a small PNG whose pixels are seeded by the picture's *subject id* (the COCO
image id for MMEdit, whose ``image_rephrase`` is generated from the same photo; the ``m.<freebase id>``
folder for VLKEB, whose two photos show the same entity). Pictures of one subject are then identical
and pictures of different subjects unrelated: an oracle image recognizer that leaves the text side
carrying all the difficulty. The dataset says so (``image_mode = "text-side"``) and the results file
records it; nothing is ever silently replaced by a blank image.

Subject ids (`picture_subject`), for any file names: the record's ``subject`` / ``subject_id`` field
when it has one (it names the subject of ``image`` and ``image_rephrase``); else the benchmark's
naming (`subject_of`: COCO id, VLKEB folder); else the picture itself — the sha256 of the file's bytes
under an image root, its path in text-side mode (no bytes to read). Without a subject field such a
record's ``image_rephrase`` is then a subject of its own (I-Gen asks about another subject).

CounterFact is read in EasyEdit's text-editing layout or in its original layout (ROME's
``counterfact.json``: ``requested_rewrite`` with a ``{}`` prompt, ``paraphrase_prompts``,
``neighborhood_prompts``), told apart per record.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError, InvalidInputError
from .cases import EditCase, EvalDataset, ImageRef, Probe
from .easyvqa import easyvqa_dataset
from .scenes import scenes_dataset

__all__ = [
    "BUILT_IN_KINDS",
    "DATA_KINDS",
    "DatasetError",
    "EditCase",
    "EvalDataset",
    "ImageRef",
    "Probe",
    "load_dataset",
    "load_mmedit",
    "load_pool",
    "load_text_records",
    "load_vlkeb",
    "picture_subject",
    "subject_of",
    "subject_png",
]

logger = logging.getLogger(__name__)

#: What ``--kind`` accepts.
DATA_KINDS = ("vqa", "caption", "vlkeb", "counterfact", "zsre", "easyvqa", "scenes")
#: The kinds built in (no ``--data``; 100 edits unless ``limit`` says otherwise).
BUILT_IN_KINDS = ("easyvqa", "scenes")

_MMEDIT_FIELDS = (
    "src",
    "pred",
    "rephrase",
    "alt",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)
_TEXT_FIELDS = (
    "prompt",
    "subject",
    "target_new",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
)
_PORT_FIELDS = ("port_q", "port_a")
_COCO = re.compile(r"(\d{6,})\.(?:jpg|jpeg|png)$", re.IGNORECASE)


class DatasetError(InvalidInputError):
    """A data file is unreadable, or a record lacks a field or has one of the wrong type."""


# ----------------------------------------------------------------------------- text-side images
def subject_of(path: str) -> str:
    """The subject id of a benchmark image path: ``coco:<id>`` or VLKEB's ``m.<freebase id>`` folder."""
    if path.startswith("m."):
        return path.split("/")[0]
    m = _COCO.search(path)
    if not m:
        raise InvalidInputError(f"cannot find a subject id (COCO id or m.<id> folder) in {path!r}")
    return f"coco:{int(m.group(1))}"


def picture_subject(rel: str, root: str | Path | None = None, given: str | None = None) -> str:
    """The subject id of a record's picture at ``rel``: ``given`` (the record's subject field), else the
    benchmark naming (`subject_of`), else ``sha256:<hex>`` of the file's bytes under ``root``, else (no
    root: text-side mode) ``file:<rel>``. See the module docstring."""
    if given is not None:
        return given
    try:
        return subject_of(rel)
    except InvalidInputError:
        pass
    if root is None:
        return f"file:{rel}"
    p = Path(root) / rel
    try:
        return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError as e:
        raise ImageError(f"image file {str(p)!r} cannot be read ({e.strerror or e})") from None


def _record_subject(rec: Mapping[str, Any], where: str) -> str | None:
    """The record's own ``subject`` / ``subject_id`` field (a non-empty string), or None."""
    for name in ("subject", "subject_id"):
        if name in rec:
            return _field(rec, name, where)
    return None


def subject_png(subject: str) -> bytes:
    """The text-side placeholder picture of a subject: 8x8 PNG of pixels seeded by the subject id."""
    from PIL import Image

    seed = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "little")
    px = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


class _Images:
    """Resolves a record's relative image path: under ``root`` (checked), or to its subject's placeholder."""

    def __init__(self, root: str | Path | None, what: str):
        self.root = None if root is None else Path(root)
        self.what = what
        self._png: dict[str, bytes] = {}
        if self.root is not None and not self.root.is_dir():
            raise ImageError(f"image root {str(self.root)!r} is not a directory")

    @property
    def mode(self) -> str:
        return "text-side" if self.root is None else "files"

    def __call__(self, rel: str, where: str, subject: str | None = None) -> ImageRef:
        """The picture at ``rel``; ``subject`` (text-side mode): the record's subject field."""
        if self.root is None:
            s = picture_subject(rel, None, subject)
            if s not in self._png:
                self._png[s] = subject_png(s)
            return self._png[s]
        p = self.root / rel
        if not p.is_file():
            raise ImageError(f"{where}: image file {str(p)!r} not found under the image root")
        return str(p)


# ----------------------------------------------------------------------------- readers
def _read_json(path: str | Path) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"data file {str(p)!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"data file {str(p)!r} is not readable JSON ({e})") from None


def _records(path: str | Path) -> list[Mapping[str, Any]]:
    doc = _read_json(path)
    if not isinstance(doc, list) or not doc:
        raise DatasetError(f"{str(path)!r}: expected a non-empty JSON list of records")
    return doc


def _field(rec: Any, name: str, where: str, kind: type = str) -> Any:
    if not isinstance(rec, Mapping):
        raise DatasetError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if name not in rec:
        raise DatasetError(f"{where}: missing field {name!r}")
    v = rec[name]
    if not isinstance(v, kind) or (kind is str and not v.strip()):
        raise DatasetError(f"{where}: field {name!r} must be a non-empty {kind.__name__}, got {v!r}")
    return v.strip() if kind is str else v


def _limit(recs: list, limit: int | None) -> list:
    return recs if limit is None else recs[: max(0, int(limit))]


def _alternatives(targets: Sequence[str], i: int, k: int = 3) -> tuple[str, ...]:
    """Other records' targets as revision candidates for record ``i`` (deterministic, nearest first)."""
    out: list[str] = []
    n = len(targets)
    for d in range(1, n):
        t = targets[(i + d) % n]
        if t != targets[i] and t not in out:
            out.append(t)
        if len(out) == k:
            break
    return tuple(out)


def _hard(v: Mapping[str, str], image: ImageRef, other: ImageRef, kind: str) -> tuple[Probe, ...]:
    """The OKEDIT-style hard negatives a record implies: the edit's picture with the unrelated question
    (``m_loc_q``), and the edit's question on the unrelated picture (``m_loc``). VLKEB's ``m_loc_q`` asks
    the same generic kind of question ("what is shown?") and is a rephrasing on this picture, so only
    the second is used there; E-IC's question is "a photo of" everywhere, which makes the second the one
    that matters. Targets are teacher-forcing text only (locality compares with the pre-edit model)."""
    out = []
    if kind != "vlkeb" and not (v["m_loc_q"] == v["src"] and other == image):
        out.append(Probe("hard_same_image", image, v["m_loc_q"], v["m_loc_a"]))
    if other != image:
        out.append(Probe("hard_same_question", other, v["src"], v["pred"]))
    return tuple(out)


def load_mmedit(
    path: str | Path, kind: str = "vqa", image_root: str | Path | None = None, limit: int | None = None
) -> EvalDataset:
    """MMEdit E-VQA (``kind="vqa"``) or E-IC (``"caption"``) records; see the module docstring for images."""
    if kind not in ("vqa", "caption", "vlkeb"):
        raise InvalidInputError(f"load_mmedit kind must be 'vqa', 'caption' or 'vlkeb', not {kind!r}")
    source = {"vqa": "E-VQA", "caption": "E-IC", "vlkeb": "VLKEB"}[kind]
    recs = _limit(_records(path), limit)
    img = _Images(image_root, source)
    rows = []
    for i, r in enumerate(recs):
        where = f"{Path(path).name} record {i}"
        v = {f: _field(r, f, where) for f in _MMEDIT_FIELDS}
        v["subject"] = _record_subject(r, where)
        port: list[Probe] = []
        if kind == "vlkeb" and "port_new" in r:
            items = r["port_new"]
            if not isinstance(items, list):
                raise DatasetError(f"{where}: field 'port_new' must be a list, got {type(items).__name__}")
            for j, p in enumerate(items):
                pw = f"{where} port_new[{j}]"
                q, a = (_field(p, f, pw) for f in _PORT_FIELDS)
                port.append(Probe("portability", img(v["image"], where, v["subject"]), q, a))
        loc_q = v["loc"].removeprefix("nq question:").strip() or v["loc"]
        rows.append((i, v, tuple(port), loc_q))
    targets = [v["alt"] for _, v, _, _ in rows]
    cases = []
    for i, v, port, loc_q in rows:
        where = f"{Path(path).name} record {i}"
        image, other = img(v["image"], where, v["subject"]), img(v["m_loc"], where)
        cases.append(
            EditCase(
                uid=f"{source}:{i}",
                source=source,
                image=image,
                question=v["src"],
                target=v["alt"],
                pred=v["pred"],
                subject=picture_subject(v["image"], img.root, v["subject"]),
                rephrase=v["rephrase"],
                image_rephrase=(img(v["image_rephrase"], where, v["subject"]),),
                loc=Probe("t_loc", None, loc_q, v["loc_ans"]),
                m_loc=Probe("m_loc", other, v["m_loc_q"], v["m_loc_a"]),
                hard=_hard(v, image, other, kind),
                portability=port,
                revisions=_alternatives(targets, i),
            )
        )
    if img.mode == "text-side":
        logger.warning("%s: no image root given; text-side mode (subject-id placeholder pictures)", path)
    return EvalDataset(kind, cases, img.mode, source=f"{source} {Path(path).name}")


def load_vlkeb(
    path: str | Path, image_root: str | Path | None = None, limit: int | None = None
) -> EvalDataset:
    """VLKEB records (``eval.json``; ``eval_edit_onehop.json`` adds one-hop portability ``port_new``)."""
    return load_mmedit(path, "vlkeb", image_root, limit)


def load_text_records(path: str | Path, kind: str = "zsre", limit: int | None = None) -> EvalDataset:
    """Text-only CounterFact / zsRE records in EasyEdit's editing format, CounterFact also in its original
    layout (no image; I-Gen, M-Loc absent)."""
    if kind not in ("counterfact", "zsre"):
        raise InvalidInputError(f"text record kind must be 'counterfact' or 'zsre', not {kind!r}")
    recs = _limit(_records(path), limit)
    vals = []
    for i, r in enumerate(recs):
        where = f"{Path(path).name} record {i}"
        if kind == "counterfact" and isinstance(r, Mapping) and "requested_rewrite" in r:
            vals.append(_counterfact_original(r, where))
        else:
            vals.append({f: _field(r, f, where) for f in _TEXT_FIELDS})
    targets = [v["target_new"] for v in vals]
    cases = [
        EditCase(
            uid=f"{kind}:{i}",
            source=kind,
            image=None,
            question=v["prompt"],
            target=v["target_new"],
            pred=v.get("ground_truth"),
            subject=v["subject"],
            rephrase=v["rephrase_prompt"],
            loc=Probe("t_loc", None, v["locality_prompt"], v["locality_ground_truth"]),
            revisions=_alternatives(targets, i),
        )
        for i, v in enumerate(vals)
    ]
    return EvalDataset(kind, cases, "none", source=f"{kind} {Path(path).name}")


def _counterfact_original(r: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One record of CounterFact's original layout (ROME's ``counterfact.json``) as the EasyEdit fields:
    the rewrite's prompt with the subject filled in, its ``target_new``, the first paraphrase prompt
    (T-Gen) and the first neighbourhood prompt (T-Loc, a subject that keeps the true answer)."""
    rw = _field(r, "requested_rewrite", where, dict)
    rww = f"{where} requested_rewrite"
    prompt, subject = _field(rw, "prompt", rww), _field(rw, "subject", rww)
    if prompt.count("{}") != 1:
        raise DatasetError(f"{rww}: field 'prompt' must hold one '{{}}' for the subject, got {prompt!r}")
    new = _field(_field(rw, "target_new", rww, dict), "str", f"{rww} target_new")
    true = _field(_field(rw, "target_true", rww, dict), "str", f"{rww} target_true")
    lists = {}
    for name in ("paraphrase_prompts", "neighborhood_prompts"):
        items = _field(r, name, where, list)
        if not items:
            raise DatasetError(f"{where}: field {name!r} must be a non-empty list")
        lists[name] = _field({name: items[0]}, name, f"{where} {name}[0]")
    return {
        "prompt": prompt.replace("{}", subject),
        "subject": subject,
        "target_new": new,
        "ground_truth": true,
        "rephrase_prompt": lists["paraphrase_prompts"],
        "locality_prompt": lists["neighborhood_prompts"],
        "locality_ground_truth": true,
    }


def load_pool(
    directory: str | Path, image_root: str | Path | None = None, size: int = 500
) -> list[tuple[ImageRef, str]]:
    """Unrelated inputs from the MMEdit locality pools in ``directory`` (``locality-nq/validation.json``,
    ``locality-okvqa/okvqa_loc.json``, the layout of ``../shared/data``): the first ``size`` of each.

    The edit records' own ``loc``/``m_loc`` probes are scored, never learned from; this pool is what the
    memory and the calibrated baselines may see. Empty when neither file exists.
    """
    d = Path(directory)
    out: list[tuple[ImageRef, str]] = []
    nq, ok = d / "locality-nq" / "validation.json", d / "locality-okvqa" / "okvqa_loc.json"
    if nq.is_file():
        doc = _read_json(nq)
        qs = doc.get("questions") if isinstance(doc, dict) else None
        if not isinstance(qs, list):
            raise DatasetError(f"{str(nq)!r}: missing field 'questions' (a list)")
        out += [(None, str(q).removeprefix("nq question:").strip()) for q in qs[:size]]
    if ok.is_file():
        img = _Images(image_root, "OK-VQA")
        for i, r in enumerate(_records(ok)[:size]):
            where = f"okvqa_loc.json record {i}"
            out.append((img(_field(r, "image", where), where), _field(r, "question", where)))
    return out


def load_dataset(
    kind: str,
    path: str | Path | None = None,
    image_root: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    pool_dir: str | Path | None = None,
) -> EvalDataset:
    """Any supported kind. ``easyvqa`` needs no ``path`` (PyPI easy-vqa, see :mod:`.easyvqa`);
    the others read ``path`` and take the locality pool from ``pool_dir`` (default: two levels above
    ``path``, i.e. ``../shared/data`` for its files) when it holds the MMEdit pools."""
    if kind not in DATA_KINDS:
        raise InvalidInputError(f"unknown data kind {kind!r}; one of {', '.join(DATA_KINDS)}")
    if kind in BUILT_IN_KINDS:
        if path is not None:
            logger.warning("--kind %s is built in; ignoring the data path %s", kind, path)
        n = limit if limit is not None else 100
        if kind == "scenes":
            return scenes_dataset(n, seed=seed, progress=n >= 1000)
        return easyvqa_dataset(n, seed=seed)
    if path is None:
        raise DatasetError(f"--kind {kind} needs --data PATH (a JSON file of records)")
    if kind in ("counterfact", "zsre"):
        ds = load_text_records(path, kind, limit)
    else:
        ds = load_mmedit(path, kind, image_root, limit)
    pdir = Path(pool_dir) if pool_dir is not None else Path(path).resolve().parent.parent
    ds.pool = load_pool(pdir, image_root if ds.image_mode == "files" else None)
    if ds.kind in ("counterfact", "zsre"):
        ds.pool = [(None, t) for im, t in ds.pool if im is None]  # a text model sees no pictures
    return ds
