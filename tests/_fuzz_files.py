"""Damaged memory and index directories for the loader part of the fuzz suite (see `_fuzz_fixtures`)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from _fuzz_fixtures import DIM, BadCase, index_state, memory_state
from _memory_fixtures import HashKeyEncoder, png_bytes, shape_image
from safetensors.numpy import load_file, save

from esg_memory.errors import EsgMemoryError
from esg_memory.memory import EditMemory
from esg_memory.persist.snapshot import doc_checksum
from index import ScopedIndex
from index.errors import ScopedIndexError

__all__ = [
    "IdenticalLoad",
    "TornTailDropped",
    "corrupted_memory_dirs",
    "durable_cases",
    "flip_bytes",
    "loader_cases",
]


class IdenticalLoad(Exception):
    """A damaged copy loaded into exactly the pristine state: the flipped bit carried no data.

    Counts as a pass for random bit flips (nothing wrong was loaded); never raised by the library.
    """


def flip_bytes(path: Path, rng: random.Random, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    doc = json.loads(path.read_text())
    new = fn(doc)
    path.write_text(json.dumps(doc if new is None else new))


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def corrupted_memory_dirs(
    src: Path, work: Path, seed: int = 0, n_flips: int = 24
) -> Iterator[tuple[str, Path]]:
    """Damaged copies of the saved memory ``src``: (what was done, directory). Each must fail to load.

    Deterministic damage (missing, truncated, foreign, newer, traversal names) plus ``n_flips``
    seeded single-bit flips, each in a file chosen at random.
    """
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)

    def copy(name: str) -> Path:
        dst = work / name.replace("/", "_").replace(" ", "_")
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, symlinks=True)
        return dst

    yield "missing directory", work / "nothing-here"
    f = work / "a-file"
    f.write_text("{}")
    yield "a file, not a directory", f
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    yield "empty directory", empty

    def variant(name: str, fn: Callable[[Path], Any]) -> tuple[str, Path]:
        d = copy(name)
        fn(d)
        return name, d

    mj = "memory.json"
    yield variant("memory.json missing", lambda d: (d / mj).unlink())
    yield variant("memory.json empty", lambda d: (d / mj).write_bytes(b""))
    for frac in (0.1, 0.5, 0.9, 0.999):
        yield variant(
            f"memory.json truncated to {frac:.1%}",
            lambda d, frac=frac: (d / mj).write_bytes(
                (d / mj).read_bytes()[: int(len((d / mj).read_bytes()) * frac)]
            ),
        )
    yield variant(
        "memory.json not UTF-8", lambda d: (d / mj).write_bytes(b"\xff\xfe" + (d / mj).read_bytes())
    )
    yield variant("memory.json is a list", lambda d: (d / mj).write_text("[1, 2, 3]"))
    yield variant(
        "memory.json nested 100k deep", lambda d: (d / mj).write_text("[" * 100_000 + "]" * 100_000)
    )
    yield variant("foreign format", lambda d: _edit_json(d / mj, lambda x: x.update(format="something-else")))
    yield variant("newer format version", lambda d: _edit_json(d / mj, lambda x: x.update(format_version=99)))
    yield variant(
        "format version as string", lambda d: _edit_json(d / mj, lambda x: x.update(format_version="1"))
    )
    yield variant("format version 0", lambda d: _edit_json(d / mj, lambda x: x.update(format_version=0)))
    yield variant("edits is a number", lambda d: _edit_json(d / mj, lambda x: x.update(edits=5)))
    yield variant("edits missing", lambda d: _edit_json(d / mj, lambda x: x.pop("edits")))
    yield variant("config invalid", lambda d: _edit_json(d / mj, lambda x: x["config"].update(margin=7)))
    yield variant("config unknown field", lambda d: _edit_json(d / mj, lambda x: x["config"].update(bogus=1)))
    yield variant("an edit id negative", lambda d: _edit_json(d / mj, lambda x: x["edits"][0].update(id=-5)))
    yield variant(
        "an edit's versions empty", lambda d: _edit_json(d / mj, lambda x: x["edits"][0].update(versions=[]))
    )
    yield variant(
        "an answer changed",
        lambda d: _edit_json(d / mj, lambda x: x["edits"][0]["versions"][-1].update(answer="tampered")),
    )
    yield variant(
        "a threshold record changed",
        lambda d: _edit_json(
            d / mj, lambda x: x["edits"][0]["versions"][-1]["scope"][0].update(threshold=0.123)
        ),
    )
    yield variant(
        "an image reference with '..'",
        lambda d: _edit_json(d / mj, lambda x: x["edits"][0]["versions"][0].update(image="../../etc/passwd")),
    )
    yield variant(
        "attachment reference with '..'",
        lambda d: _edit_json(d / mj, lambda x: x["attachments"][0].update(sha256="../memory.json")),
    )
    yield variant("next_id below a live id", lambda d: _edit_json(d / mj, lambda x: x.update(next_id=0)))
    yield variant("retired holds a live id", lambda d: _edit_json(d / mj, lambda x: x.update(retired=[0])))
    yield variant("encoder dim changed", lambda d: _edit_json(d / mj, lambda x: x["encoder"].update(dim=16)))
    yield variant(
        "encoder name changed", lambda d: _edit_json(d / mj, lambda x: x["encoder"].update(name="other"))
    )
    yield variant("keys.safetensors missing", lambda d: (d / "keys.safetensors").unlink())
    yield variant(
        "keys.safetensors truncated",
        lambda d: (d / "keys.safetensors").write_bytes((d / "keys.safetensors").read_bytes()[:100]),
    )
    # images and attachments live in packs whose size and sha256 memory.json records: "resealed"
    # damage rewrites the pack *and* those records (and memory.json's own checksum), so only the
    # check of each image / attachment against its own sha256 is left to catch it
    bp, ap = "blobs.safetensors", "attachments.safetensors"
    yield variant("a blob missing from its pack (resealed)", lambda d: _repack(d, bp, _drop_first))
    yield variant(
        "a blob's bytes replaced (resealed)",
        lambda d: _repack(d, bp, _alter_first(lambda b: png_bytes(shape_image("black")))),
    )
    yield variant("a blob truncated (resealed)", lambda d: _repack(d, bp, _alter_first(lambda b: b[:-5])))
    yield variant("an attachment missing (resealed)", lambda d: _repack(d, ap, _drop_first))
    yield variant(
        "an attachment altered (resealed)", lambda d: _repack(d, ap, _alter_first(lambda b: b"tampered"))
    )
    yield variant("the blob pack missing", lambda d: (d / bp).unlink())
    yield variant("the blob pack truncated", lambda d: (d / bp).write_bytes((d / bp).read_bytes()[:100]))
    yield variant(
        "a blob replaced in the pack",
        lambda d: (d / bp).write_bytes(_replace_in_pack((d / bp).read_bytes())),
    )
    yield variant("the blob pack is a symlink outside", lambda d: _symlink_over(d / bp, work / "a-file"))
    yield variant("keys.safetensors is a FIFO", lambda d: _fifo_over(d / "keys.safetensors"))
    yield variant("memory.json is a FIFO", lambda d: _fifo_over(d / "memory.json"))
    yield variant("the blob pack is a FIFO", lambda d: _fifo_over(d / bp))
    yield variant("the blob pack is /dev/zero", lambda d: _symlink_over(d / bp, Path("/dev/zero")))
    yield variant("the attachment pack is /dev/zero", lambda d: _symlink_over(d / ap, Path("/dev/zero")))
    yield variant("index dir missing", lambda d: shutil.rmtree(d / "index"))
    yield variant(
        "index.json foreign", lambda d: _edit_json(d / "index" / "index.json", lambda x: x.update(format="x"))
    )
    yield variant(
        "index.json newer",
        lambda d: _edit_json(d / "index" / "index.json", lambda x: x.update(format_version=9)),
    )
    yield variant("index keys.npy truncated", lambda d: (d / "index" / "keys.npy").write_bytes(b"\x93NUMPY"))
    yield variant("index of another memory", lambda d: _swap_index(d))
    for i in range(n_flips):
        files = _files(src)
        target = rng.choice(files)
        rel = target.relative_to(src)
        sub = random.Random(rng.random())
        yield variant(f"bit flip #{i} in {rel}", lambda d, rel=rel, sub=sub: flip_bytes(d / rel, sub))


def _repack(d: Path, name: str, fn: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Rewrite pack ``name`` of memory directory ``d`` with ``fn`` applied, resealing memory.json to match."""
    tensors = load_file(d / name)
    fn(tensors)
    data = save(tensors)
    (d / name).write_bytes(data)
    doc = json.loads((d / "memory.json").read_text())
    doc.pop("checksum", None)
    doc["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    doc["checksum"] = doc_checksum(doc)
    (d / "memory.json").write_text(json.dumps(doc))


def _drop_first(tensors: dict[str, np.ndarray]) -> None:
    del tensors[min(tensors)]


def _alter_first(alter: Callable[[bytes], bytes]) -> Callable[[dict[str, np.ndarray]], None]:
    def fn(tensors: dict[str, np.ndarray]) -> None:
        name = min(tensors)
        tensors[name] = np.frombuffer(alter(tensors[name].tobytes()), dtype=np.uint8)

    return fn


def _replace_in_pack(data: bytes) -> bytes:
    """The pack's first image overwritten in place by other bytes of the same length (header intact)."""
    body = 8 + int(np.frombuffer(data[:8], dtype="<u8")[0])
    head = json.loads(data[8:body])
    start, end = head[min(k for k in head if k != "__metadata__")]["data_offsets"]
    other = png_bytes(shape_image("black"))
    new = (other * (1 + (end - start) // len(other)))[: end - start]
    return data[: body + start] + new + data[body + end :]


def _fifo_over(p: Path) -> None:
    """A FIFO where a data file was: opening it for reading would block forever."""
    p.unlink()
    os.mkfifo(p)


def _symlink_over(p: Path, target: Path) -> None:
    p.unlink()
    p.symlink_to(target)


def _swap_index(d: Path) -> None:
    ix = ScopedIndex(DIM)
    ix.add([0], np.ones((1, DIM)), 0.5)
    shutil.rmtree(d / "index")
    ix.save(d / "index")


def loader_cases(mem: EditMemory, work: Path, seed: int = 0, n_flips: int = 24) -> list[BadCase]:
    """`EditMemory.load` / `ScopedIndex.load` on damaged copies of a saved ``mem`` and of its index."""
    src = work / "pristine"
    if src.exists():
        shutil.rmtree(src)
    mem.save(src)
    enc = HashKeyEncoder(int(mem.encoder.dim))
    pristine = memory_state(mem)

    def load(d: Path, flip: bool) -> None:
        got = EditMemory.load(d, encoder=enc)
        if flip and memory_state(got) == pristine:
            raise IdenticalLoad(f"{d.name}: loaded exactly the pristine memory")

    cases = [
        BadCase(
            "files",
            f"EditMemory.load: {name}",
            partial(load, d, name.startswith("bit flip")),
            (EsgMemoryError, IdenticalLoad),
        )
        for name, d in corrupted_memory_dirs(src, work / "bad", seed, n_flips)
    ]
    cases.append(
        BadCase(
            "files",
            "EditMemory.load with another encoder name",
            lambda: EditMemory.load(src, encoder=HashKeyEncoder(int(mem.encoder.dim), name="other")),
        )
    )
    cases.append(
        BadCase(
            "files",
            "EditMemory.load with another encoder dim",
            lambda: EditMemory.load(src, encoder=HashKeyEncoder(int(mem.encoder.dim) + 1)),
        )
    )
    rng = random.Random(seed + 1)
    ix_src = src / "index"
    ix_pristine = index_state(ScopedIndex.load(ix_src))

    def load_index(d: Path, flip: bool) -> None:
        got = ScopedIndex.load(d)
        if flip and index_state(got) == ix_pristine:
            raise IdenticalLoad(f"{d.name}: loaded exactly the pristine index")

    for i, (name, fn) in enumerate(
        [
            ("index.json missing", lambda d: (d / "index.json").unlink()),
            ("index.json not JSON", lambda d: (d / "index.json").write_text("{nope")),
            (
                "index.json nested 100k deep",
                lambda d: (d / "index.json").write_text("[" * 100_000 + "]" * 100_000),
            ),
            ("index dim changed", lambda d: _edit_json(d / "index.json", lambda x: x.update(dim=3))),
            (
                "index counts changed",
                lambda d: _edit_json(d / "index.json", lambda x: x["counts"].update(edits=99)),
            ),
            ("structure.faiss truncated", lambda d: (d / "structure.faiss").write_bytes(b"IxM2")),
            ("keys.npy is /dev/zero", lambda d: _symlink_over(d / "keys.npy", Path("/dev/zero"))),
            ("structure.faiss is a FIFO", lambda d: _fifo_over(d / "structure.faiss")),
            *[(f"index bit flip #{j}", _flipper(rng.random())) for j in range(max(4, n_flips // 3))],
        ]
    ):
        d = work / "bad-index" / f"{i:02d}"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(ix_src, d)
        fn(d)
        cases.append(
            BadCase(
                "index files",
                f"ScopedIndex.load: {name}",
                partial(load_index, d, name.startswith("index bit flip")),
                (ScopedIndexError, IdenticalLoad),
            )
        )
    return cases


def _flipper(seed: float) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        r = random.Random(seed)
        flip_bytes(r.choice(_files(d)), r)

    return fn


class TornTailDropped(Exception):
    """A durable directory damaged inside its last journal record loaded as the state before that write.

    That is the journal's torn-write rule (a last record that does not check out was never
    acknowledged); a pass for damage confined to the last record. Never raised by the library.
    """


def durable_cases(work: Path, seed: int = 0, n_flips: int = 16) -> list[BadCase]:
    """`EditMemory.load` of damaged copies of a durable directory (snapshot + journal).

    Every case must raise `FormatError`, load exactly the undamaged state, or — for damage inside
    the last journal record only — the state before that last write.
    """
    p = work / "durable"
    if p.exists():
        shutil.rmtree(p)
    enc = HashKeyEncoder(DIM)
    mem = EditMemory.open(p, enc)
    states = [memory_state(mem)]
    seg_sizes = []
    writes = [
        lambda: mem.add(png_bytes(shape_image("red")), "what color is the lamp?", "red"),
        lambda: mem.add(None, "who wrote hamlet?", "marlowe"),
        lambda: mem.revise(0, answer="crimson"),
        lambda: mem.add(None, "where does the river flow?", "north"),
        lambda: mem.delete(1),
        lambda: mem.attach(0, "adapter", b"opaque"),
    ]
    segment = None
    for w in writes:
        w()
        states.append(memory_state(mem))
        segment = sorted((p / "journal").glob("*.wal"))[-1]
        seg_sizes.append(segment.stat().st_size)
    assert segment is not None
    last_start = seg_sizes[-2]  # the last record occupies [last_start, end) of the segment
    rng = random.Random(seed)
    variants: list[tuple[str, Callable[[Path], Any], bool]] = []  # (name, damage, inside last record)
    rel = segment.relative_to(p)

    def flip_at(pos: int, bit: int) -> Callable[[Path], None]:
        def fn(d: Path) -> None:
            data = bytearray((d / rel).read_bytes())
            data[pos] ^= 1 << bit
            (d / rel).write_bytes(bytes(data))

        return fn

    for _ in range(n_flips):
        pos = rng.randrange(seg_sizes[-1])
        variants.append(
            (f"journal bit flip at byte {pos}", flip_at(pos, rng.randrange(8)), pos >= last_start)
        )
    for cut in sorted({last_start + 1, (last_start + seg_sizes[-1]) // 2, seg_sizes[-1] - 1}):
        variants.append(
            (
                f"journal truncated to {cut} bytes (inside the last record)",
                lambda d, cut=cut: (d / rel).write_bytes((d / rel).read_bytes()[:cut]),
                True,
            )
        )
    snap_files = sorted(f.relative_to(p) for f in (p / "snapshot").rglob("*") if f.is_file())
    for _ in range(max(2, n_flips // 4)):
        f = rng.choice(snap_files)
        s = rng.random()
        variants.append(
            (f"snapshot bit flip in {f}", lambda d, f=f, s=s: flip_bytes(d / f, random.Random(s)), False)
        )
    variants += [
        ("snapshot removed", lambda d: shutil.rmtree(d / "snapshot"), False),
        ("journal directory removed", lambda d: shutil.rmtree(d / "journal"), False),
        ("journal segment removed", lambda d: (d / rel).unlink(), False),
        ("journal segment is a FIFO", lambda d: _fifo_over(d / rel), False),
        ("journal segment is /dev/zero", lambda d: _symlink_over(d / rel, Path("/dev/zero")), False),
        (
            "garbage segment after the last",
            lambda d: (d / "journal" / f"{10**19:020d}.wal").write_bytes(b"junk"),
            False,
        ),
        (
            "journal segment header damaged",
            lambda d: (d / rel).write_bytes(b"\0" * 8 + (d / rel).read_bytes()[8:]),
            False,
        ),
    ]
    cases = []
    for i, (name, damage, in_last) in enumerate(variants):
        d = work / "durable-bad" / f"{i:02d}"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(p, d)
        damage(d)

        def load(d: Path = d, in_last: bool = in_last) -> None:
            got = memory_state(EditMemory.load(d, encoder=HashKeyEncoder(DIM)))
            if got == states[-1]:
                raise IdenticalLoad(f"{d.name}: loaded exactly the undamaged state")
            if in_last and got == states[-2]:
                raise TornTailDropped(f"{d.name}: the damaged last record was dropped as a torn write")

        cases.append(
            BadCase(
                "durable files",
                f"EditMemory.load (durable): {name}",
                load,
                (EsgMemoryError, IdenticalLoad, TornTailDropped),
            )
        )
    mem.close()
    return cases
