"""A catalogue of hostile inputs and damaged files, shared by tests/test_fuzz*.py and bench_reliability.

Every `BadCase` is one call the library must refuse with a typed error (`EsgMemoryError`, or
`ScopedIndexError` for the index package) while leaving the state it was called on exactly as it
was; `run_case` checks both, comparing a full state fingerprint (`memory_state`, `index_state`)
taken before and after. The builders return plain lists so the benchmark can count refusals per
category and per error type, and the tests can assert that every case passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from _memory_fixtures import HashKeyEncoder, png_bytes, shape_image
from PIL import Image

from esg_memory.config import MemoryConfig
from esg_memory.errors import EsgMemoryError
from esg_memory.images import MAX_IMAGE_BYTES, load_image
from esg_memory.memory import MAX_TEXT_CHARS, EditMemory
from esg_memory.types import Positive
from index import ScopedIndex
from index.errors import ScopedIndexError

__all__ = [
    "CFG",
    "BadCase",
    "Outcome",
    "fuzz_index",
    "fuzz_memory",
    "hostile_images",
    "image_cases",
    "index_cases",
    "index_state",
    "memory_cases",
    "memory_state",
    "png_header",
    "run_case",
    "save_targets",
    "save_targets_intact",
    "summarize",
]

#: Small scopes: few generated positives/negatives keep every write fast.
CFG = MemoryConfig(n_text_positives=1, n_image_positives=1, n_generic_questions=2, n_pool_images=1)
DIM = 32


@dataclass(frozen=True)
class BadCase:
    """One call that must raise one of ``expect`` and change nothing."""

    category: str
    name: str
    call: Callable[[], Any]
    expect: tuple[type[BaseException], ...] = (EsgMemoryError,)


@dataclass(frozen=True)
class Outcome:
    category: str
    name: str
    raised: str | None  # the exception type's name, None when the call was accepted
    typed: bool  # raised one of the expected typed errors
    unchanged: bool  # state fingerprint equal before and after
    message: str

    @property
    def ok(self) -> bool:
        return self.typed and self.unchanged


def run_case(case: BadCase, state: Callable[[], str]) -> Outcome:
    before = state()
    try:
        case.call()
    except case.expect as e:
        raised, typed, msg = type(e).__name__, True, str(e)
    except Exception as e:  # anything untyped is a finding
        raised, typed, msg = type(e).__name__, False, f"untyped {type(e).__name__}: {e}"
    else:
        raised, typed, msg = None, False, "accepted (no error)"
    after = state()
    return Outcome(case.category, case.name, raised, typed, after == before, msg[:300])


def summarize(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Per category: cases tried, refused correctly, and how (error type -> count)."""
    out: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        c = out.setdefault(o.category, {"tried": 0, "refused": 0, "failed": [], "by_error": {}})
        c["tried"] += 1
        if o.ok:
            c["refused"] += 1
            c["by_error"][o.raised] = c["by_error"].get(o.raised, 0) + 1
        else:
            c["failed"].append(f"{o.name}: {o.message}" + ("" if o.unchanged else " [STATE CHANGED]"))
    return out


# --------------------------------------------------------------------------------------- state


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


def _arr(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def memory_state(mem: EditMemory) -> str:
    """A fingerprint of everything a memory holds and how it routes (public API plus counters)."""
    rng = np.random.default_rng(7)
    probes = rng.standard_normal((16, int(mem.encoder.dim))).astype(np.float32)
    ids = [e.id for e in mem.list()]
    keys = [mem.keys_of(i) for i in ids]
    if keys:
        probes = np.concatenate([probes, *(k for k, _ in keys)])
    r = mem.route(keys=probes)
    snap = mem.snapshot(settle=False)  # one consistent view, taken under the memory's locks
    internals = {
        "next_id": snap.next_id,
        "retired": sorted(snap.retired),
        "blobs": sorted(snap.blobs),
        "attachments": sorted(
            [e, v, k, hashlib.sha256(d).hexdigest()] for (e, v, k), d in snap.attachments.items()
        ),
        "index": [snap.index.edit_ids().tolist(), snap.index.n_keys],
    }
    return _digest(
        {
            "edits": [e.to_dict() for e in mem.list()],
            "history": {i: [v.to_dict() for v in mem.history(i)] for i in ids},
            "keys": {i: [_arr(k), _arr(t)] for i, (k, t) in zip(ids, keys, strict=True)},
            "route": [r.edit_ids.tolist(), _arr(r.margins), r.runner_up.tolist()],
            "conflicts": [c.to_dict() for c in mem.conflicts()],
            **internals,
        }
    )


def index_state(ix: ScopedIndex) -> str:
    rng = np.random.default_rng(11)
    q = rng.standard_normal((8, ix.dim)).astype(np.float32)
    ids = ix.edit_ids().tolist()
    kt = [ix.keys_of(i) for i in ids]
    if kt:
        q = np.concatenate([q, *(k for k, _ in kt)])
    s = ix.search(q, k=3)
    return _digest(
        {
            "ids": ids,
            "keys": [[_arr(k), _arr(t)] for k, t in kt],
            "match": ix.match(q).tolist(),
            "search": [s.edit_ids.tolist(), _arr(s.scores)],
            "n_keys": ix.n_keys,
        }
    )


# --------------------------------------------------------------------------------------- builders


def fuzz_memory(dim: int = DIM) -> tuple[EditMemory, SimpleNamespace]:
    """Three live edits (one revised, with an attachment) and one deleted id."""
    mem = EditMemory(HashKeyEncoder(dim), CFG, locality_pool=["who wrote hamlet?", "is it raining today?"])
    red, blue = png_bytes(shape_image("red")), png_bytes(shape_image("blue", "square"))
    a = mem.add(
        red,
        "what color is the circle?",
        "crimson",
        positives=["which colour is the circle?"],
        metadata={"by": "fuzz"},
    )
    b = mem.add(blue, "what shape is this?", "square")
    c = mem.add(None, "who wrote the play hamlet?", "marlowe")
    d = mem.add(None, "a temporary edit?", "yes")
    mem.delete(d)
    mem.revise(a, answer="scarlet")
    mem.attach(a, "adapter", b"\x00opaque adapter bytes")
    return mem, SimpleNamespace(a=a, b=b, c=c, retired=d, red=red, blue=blue, dim=dim)


def fuzz_index(dim: int = 16) -> ScopedIndex:
    rng = np.random.default_rng(3)
    ix = ScopedIndex(dim)
    ix.add([0, 0, 1, 5], rng.standard_normal((4, dim)), [0.5, 0.6, 0.7, 0.2])
    return ix


def png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG that *claims* ``width x height`` pixels but holds a few bytes of data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def hostile_images(tmp: Path) -> dict[str, Any]:
    """Things passed where an image is expected; every one must be refused with ImageError."""
    tmp.mkdir(parents=True, exist_ok=True)
    good = png_bytes(shape_image("green"))
    text = tmp / "notes.txt"
    text.write_text("not an image")
    link = tmp / "link-to-text.png"
    if not link.exists():
        link.symlink_to(text)
    fifo = tmp / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)  # opening it for reading would block forever: must be refused unread
    rng = random.Random(5)
    return {
        "empty bytes": b"",
        "random bytes": bytes(rng.randrange(256) for _ in range(512)),
        "text bytes": b"hello, I am not a picture",
        "truncated png": good[: len(good) // 2],
        "png signature only": good[:8],
        "png claiming 9000x9000 (over the pixel limit)": png_header(9000, 9000),
        "png claiming 40000x40000 (pillow decompression bomb)": png_header(40000, 40000),
        "eps (external interpreter format)": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"></svg>',
        "bytes over the size limit": b"\x89PNG" + bytes(MAX_IMAGE_BYTES),
        "bytearray of junk": bytearray(b"\x00\x01\x02"),
        "PIL image over the pixel limit": Image.new("1", (9000, 9000)),
        "PIL image of zero size": Image.new("RGB", (0, 0)),
        "int": 5,
        "float": 1.5,
        "bool": True,
        "dict": {"path": "x.png"},
        "list of bytes": [good],
        "numpy array": np.zeros((8, 8, 3), dtype=np.uint8),
        "missing path": str(tmp / "does-not-exist.png"),
        "directory path": str(tmp),
        "text file path": str(text),
        "symlink to a text file": link,
        "fifo path": str(fifo),
        "device path": "/dev/zero",
        "path with NUL": "a\x00b.png",
        "path too long": "x" * 5000 + ".png",
    }


def image_cases(tmp: Path) -> list[BadCase]:
    """`load_image` on hostile inputs, and `..` / symlink escapes from an allowed root."""
    out = [
        BadCase("images", f"load_image: {k}", lambda v=v: load_image(v))
        for k, v in hostile_images(tmp).items()
    ]
    root = tmp / "root"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    outside = tmp / "outside.png"
    outside.write_bytes(png_bytes(shape_image("red")))
    (root / "inside.png").write_bytes(png_bytes(shape_image("blue")))
    esc = root / "escape.png"
    if not esc.exists():
        esc.symlink_to(outside)
    dir_link = root / "up"
    if not dir_link.exists():
        dir_link.symlink_to(tmp)
    loop = root / "loop.png"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    for name, p in {
        "'..' out of the root": "../outside.png",
        "'..' deep": "sub/../../outside.png",
        "absolute path outside": str(outside),
        "symlink inside pointing outside": "escape.png",
        "symlinked directory pointing outside": "up/outside.png",
        "symlink loop": "loop.png",
        "root itself": ".",
        "NUL in a rooted path": "inside\x00.png",
    }.items():
        out.append(BadCase("paths", f"allowed_root: {name}", lambda p=p: load_image(p, allowed_root=root)))
    return out


_BAD_IDS: dict[str, Any] = {
    "unknown": 10**6,
    "negative": -1,
    "int64 min": -(2**63),
    "beyond int64": 2**64,
    "None": None,
    "float": 1.0,
    "bool": True,
    "string": "0",
    "numpy float": np.float64(0),
    "list": [0],
}

_BAD_TEXTS: dict[str, Any] = {
    "empty": "",
    "whitespace": " \n\t ",
    f"{MAX_TEXT_CHARS + 1} chars": "x" * (MAX_TEXT_CHARS + 1),
    "10 MB": "y" * (10 * 2**20),
    "NUL": "what\x00is this?",
    "lone surrogate": "what is \ud800?",
    "None": None,
    "int": 5,
    "bytes": b"what is this?",
    "list": ["what is this?"],
}


def _deep(n: int) -> dict:
    d: dict = {}
    cur = d
    for _ in range(n):
        cur["k"] = {}
        cur = cur["k"]
    return d


def memory_cases(mem: EditMemory, info: SimpleNamespace, tmp: Path) -> list[BadCase]:
    """Every public EditMemory entry point with bad ids, texts, images, arrays and structures."""
    cases: list[BadCase] = []

    def add(cat: str, name: str, fn: Callable[[], Any]) -> None:
        cases.append(BadCase(cat, name, fn))

    a, dim = info.a, info.dim
    id_ops: dict[str, Callable[[Any], Any]] = {
        "get": mem.get,
        "history": mem.history,
        "keys_of": mem.keys_of,
        "delete": mem.delete,
        "revise": lambda i: mem.revise(i, answer="new"),
        "rollback": lambda i: mem.rollback(i, version=1),
        "attach": lambda i: mem.attach(i, "adapter", b"x"),
        "attachment": lambda i: mem.attachment(i, "adapter"),
        "feedback(expected=)": lambda i: mem.feedback(None, "what color is the circle?", i),
    }
    for op, fn in id_ops.items():
        for name, bad in {**_BAD_IDS, "deleted id": info.retired}.items():
            if op == "feedback(expected=)" and bad is None:
                continue  # None means "should route to no edit"
            add("ids", f"{op}({name})", lambda fn=fn, bad=bad: fn(bad))
    for name, bad in {**_BAD_IDS, "existing id": a, "deleted id": info.retired, "2**63": 2**63}.items():
        if name in ("None", "unknown"):
            continue  # None means "pick one"; an unused id is a valid choice
        add("ids", f"add(edit_id={name})", lambda bad=bad: mem.add(None, "a new question?", "z", edit_id=bad))
    add(
        "ids",
        "add_many with one id twice",
        lambda: mem.add_many(
            [
                {"question": "first new?", "answer": "1", "edit_id": 77},
                {"question": "second?", "answer": "2", "edit_id": 77},
            ]
        ),
    )
    for name, v in {"0": 0, "-1": -1, "99": 99, "1.0": 1.0, "True": True, "'1'": "1", "None": None}.items():
        add("ids", f"rollback(version={name})", lambda v=v: mem.rollback(a, version=v))
        if v is not None:  # None means the current version
            add("ids", f"attach(version={name})", lambda v=v: mem.attach(a, "adapter", b"x", version=v))

    for name, bad in _BAD_TEXTS.items():
        add("texts", f"add(question={name})", lambda bad=bad: mem.add(None, bad, "answer"))
        add("texts", f"add(answer={name})", lambda bad=bad: mem.add(None, "a fresh question?", bad))
        add("texts", f"revise(answer={name})", lambda bad=bad: mem.revise(a, answer=bad))
        add("texts", f"revise(question={name})", lambda bad=bad: mem.revise(a, question=bad))
        add("texts", f"positives=[{name}]", lambda bad=bad: mem.add(None, "q?", "a", positives=[bad]))
        add("texts", f"route(texts=[{name}])", lambda bad=bad: mem.route(texts=[bad]))
        if bad is not None:
            add("texts", f"feedback(text={name})", lambda bad=bad: mem.feedback(None, bad, None))

    for name, img in hostile_images(tmp / "images").items():
        add("images", f"add(image={name})", lambda img=img: mem.add(img, "what is shown here?", "x"))
        add("images", f"revise(image={name})", lambda img=img: mem.revise(a, image=img))
        add(
            "images",
            f"positives=[({name}, None)]",
            lambda img=img: mem.add(None, "q?", "a", positives=[(img, None)]),
        )
        add("images", f"route(images=[{name}])", lambda img=img: mem.route(images=[img], texts=["q?"]))
        add("images", f"feedback(image={name})", lambda img=img: mem.feedback(img, "q?", None))

    bad_keys: dict[str, Any] = {
        "NaN": np.full((1, dim), np.nan),
        "inf": np.full((1, dim), np.inf),
        "-inf row": np.concatenate([np.ones((1, dim)), np.full((1, dim), -np.inf)]),
        "zero vector": np.zeros((1, dim)),
        "float32 overflow": np.full((1, dim), 1e39),
        "wrong dim": np.ones((1, dim + 1)),
        "1-D wrong length": np.ones(dim - 1),
        "3-D": np.ones((1, 1, dim)),
        "scalar": 1.0,
        "complex": np.ones((1, dim), dtype=complex),
        "strings": [["0.5"] * dim],
        "object with None": np.array([[None] * dim], dtype=object),
        "ragged": [[1.0] * dim, [1.0]],
        "dict": {"k": 1},
        "None rows": [None],
    }
    for name, k in bad_keys.items():
        add("arrays", f"route(keys={name})", lambda k=k: mem.route(keys=k))
        add(
            "arrays",
            f"EditMemory(locality_pool={name})",
            lambda k=k: EditMemory(HashKeyEncoder(dim), CFG, locality_pool=k),
        )

    structural: dict[str, Callable[[], Any]] = {
        "add_many(str)": lambda: mem.add_many("question"),
        "add_many(dict)": lambda: mem.add_many({"question": "q?", "answer": "a"}),
        "add_many([5])": lambda: mem.add_many([5]),
        "add_many unknown field": lambda: mem.add_many([{"question": "q?", "answer": "a", "bogus": 1}]),
        "add_many good then bad (atomic)": lambda: mem.add_many(
            [{"question": "a good one?", "answer": "yes"}, {"question": "", "answer": "no"}]
        ),
        "add(no question)": lambda: mem.add(info.red, None, "a"),
        "positives=5": lambda: mem.add(None, "q?", "a", positives=5),
        "positives='text'": lambda: mem.add(None, "q?", "a", positives="text"),
        "positives={dict}": lambda: mem.add(None, "q?", "a", positives={"a text": 1}),
        "positives=[triple]": lambda: mem.add(None, "q?", "a", positives=[(None, "a", "b")]),
        "positives=[(None, None)]": lambda: mem.add(None, "q?", "a", positives=[(None, None)]),
        "positives=[Positive(unknown sha)]": lambda: mem.add(
            None, "q?", "a", positives=[Positive(image="0" * 64)]
        ),
        "positives=[Positive()]": lambda: mem.add(None, "q?", "a", positives=[Positive()]),
        "metadata=list": lambda: mem.add(None, "q?", "a", metadata=[1, 2]),
        "metadata int key": lambda: mem.add(None, "q?", "a", metadata={1: "x"}),
        "metadata NaN": lambda: mem.add(None, "q?", "a", metadata={"x": float("nan")}),
        "metadata object": lambda: mem.add(None, "q?", "a", metadata={"x": object()}),
        "metadata nested 5000 deep": lambda: mem.add(None, "q?", "a", metadata=_deep(5000)),
        "metadata 2 MB": lambda: mem.add(None, "q?", "a", metadata={"x": "y" * (2 * 2**20)}),
        "revise(nothing)": lambda: mem.revise(a),
        "feedback(None, None)": lambda: mem.feedback(None, None, None),
        "attach kind '../x'": lambda: mem.attach(a, "../x", b"x"),
        "attach kind ''": lambda: mem.attach(a, "", b"x"),
        "attach kind 5": lambda: mem.attach(a, 5, b"x"),
        "attach data str": lambda: mem.attach(a, "adapter", "text"),
        "route()": lambda: mem.route(),
        "route(texts=str)": lambda: mem.route(texts="what color is the circle?"),
        "route(texts=5)": lambda: mem.route(texts=5),
        "route(images=PIL image)": lambda: mem.route(images=shape_image("red")),
        "route(rows differ)": lambda: mem.route(images=[info.red], texts=["a?", "b?"]),
        "route(keys and texts)": lambda: mem.route(texts=["a?"], keys=np.ones((1, dim))),
        "route(row with nothing)": lambda: mem.route(texts=[None]),
        "open_image(unknown)": lambda: mem.open_image("0" * 64),
        "open_image(5)": lambda: mem.open_image(5),
        "set_commit_hook(5)": lambda: mem.set_commit_hook(5),
        "EditMemory(encoder=None)": lambda: EditMemory(None),
        "EditMemory(config=5)": lambda: EditMemory(HashKeyEncoder(dim), config=5),
        "EditMemory(backend='bogus')": lambda: EditMemory(HashKeyEncoder(dim), CFG, backend="bogus"),
        "EditMemory(locality_pool=5)": lambda: EditMemory(HashKeyEncoder(dim), CFG, locality_pool=5),
        "MemoryConfig(margin=NaN)": lambda: MemoryConfig(margin=float("nan")),
        "MemoryConfig(max_keys=0)": lambda: MemoryConfig(max_keys=0),
        "MemoryConfig(route_k=True)": lambda: MemoryConfig(route_k=True),
    }
    for name, fn in structural.items():
        add("structure", name, fn)
    for name, target in save_targets(tmp / "targets").items():
        add("save targets", f"save({name})", lambda target=target: mem.save(target))
    return cases


def save_targets(tmp: Path) -> dict[str, Path]:
    """Paths a directory save must refuse to replace (a save swaps its target out and deletes it)."""
    tmp.mkdir(parents=True, exist_ok=True)
    f = tmp / "precious.txt"
    f.write_text("user data")
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    (home / "notes.txt").write_text("keep me")
    link = tmp / "link-to-home"
    if not link.is_symlink():
        link.symlink_to(home)
    fifo = tmp / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    return {
        "a regular file": f,
        "a FIFO": fifo,
        "a non-empty directory of something else": home,
        "a symlink to a directory": link,
        "a path with NUL": Path("mem\x00dir"),
    }


def save_targets_intact(tmp: Path) -> bool:
    """Every `save_targets` path is still what it was."""
    return (
        (tmp / "precious.txt").read_text() == "user data"
        and (tmp / "home" / "notes.txt").read_text() == "keep me"
        and sorted(os.listdir(tmp / "home")) == ["notes.txt"]
        and (tmp / "link-to-home").is_symlink()
        and (tmp / "fifo").exists()
        and not (tmp / "fifo").is_dir()
    )


def index_cases(ix: ScopedIndex, tmp: Path | None = None) -> list[BadCase]:
    """ScopedIndex writes and reads with bad ids, arrays and thresholds (typed `ScopedIndexError`)."""
    d = ix.dim
    one = np.ones((1, d))
    cases: list[BadCase] = []

    def add(name: str, fn: Callable[[], Any]) -> None:
        cases.append(BadCase("index", name, fn, (ScopedIndexError,)))

    for name, bad in {
        "negative": -1,
        "beyond int64": 2**64,
        "None": None,
        "float": 1.5,
        "bool": True,
        "string": "3",
    }.items():
        add(f"add(id={name})", lambda bad=bad: ix.add([bad], one, 0.5))
        add(f"remove({name})", lambda bad=bad: ix.remove([bad]))
        add(f"keys_of({name})", lambda bad=bad: ix.keys_of(bad))
    add("add(existing id)", lambda: ix.add([0], one, 0.5))
    add("remove(unknown)", lambda: ix.remove([999]))
    add("remove(known + unknown) is atomic", lambda: ix.remove([0, 999]))
    add("keys_of(unknown)", lambda: ix.keys_of(999))
    add("set_thresholds(duplicate ids)", lambda: ix.set_thresholds([0, 0], [0.1, 0.2]))
    add("set_thresholds(unknown)", lambda: ix.set_thresholds([999], [0.1]))
    add("set_key_thresholds(wrong count)", lambda: ix.set_key_thresholds(0, [0.1]))
    add("replace_keys(no keys)", lambda: ix.replace_keys(0, np.zeros((0, d)), []))
    add("replace_keys(unknown)", lambda: ix.replace_keys(999, one, 0.5))
    add("add_keys(unknown)", lambda: ix.add_keys(999, one, 0.5))
    for name, k in {
        "NaN": np.full((1, d), np.nan),
        "inf": np.full((1, d), np.inf),
        "zero": np.zeros((1, d)),
        "wrong dim": np.ones((1, d + 1)),
        "3-D": np.ones((1, 1, d)),
        "strings": [["a"] * d],
        "complex": np.ones((1, d), dtype=complex),
        "float32 overflow": np.full((1, d), 1e39),
    }.items():
        add(f"add(keys={name})", lambda k=k: ix.add([9], k, 0.5))
        add(f"search({name})", lambda k=k: ix.search(k))
        add(f"match({name})", lambda k=k: ix.match(k))
        add(f"replace_keys(0, {name})", lambda k=k: ix.replace_keys(0, k, 0.5))
    for name, t in {
        "NaN": np.nan,
        "above 1": 1.5,
        "below -1": -1.01,
        "inf": np.inf,
        "string": "0.5",
        "wrong length": [0.1, 0.2],
        "2-D": [[0.5]],
    }.items():
        add(f"add(threshold={name})", lambda t=t: ix.add([9], one, t))
        add(f"set_thresholds({name})", lambda t=t: ix.set_thresholds([1], t))
    add("add(ids and keys differ)", lambda: ix.add([9, 10], one, 0.5))
    for name, k in {"0": 0, "-1": -1, "True": True, "1.5": 1.5, "None": None}.items():
        add(f"search(k={name})", lambda k=k: ix.search(one, k=k))
    add("ScopedIndex(dim=0)", lambda: ScopedIndex(0))
    add("ScopedIndex(dim=True)", lambda: ScopedIndex(True))
    add("ScopedIndex(backend='bogus')", lambda: ScopedIndex(4, backend="bogus"))
    if tmp is not None:
        for name, target in save_targets(tmp / "index-targets").items():
            add(f"save({name})", lambda target=target: ix.save(target))
    return cases
