"""Crash trials for the durable edit memory: SIGKILL a writer at random moments, then check the directory.

Each trial starts a child process (this file with ``--child``) that opens a memory with
`EditMemory.open` and applies a seeded stream of adds, revisions, rollbacks, attachments and
deletes. Before each call the child prints what it is about to do; after the call returns it
prints the acknowledgement (flushed), so the parent knows exactly which writes were acknowledged.
The parent SIGKILLs the child after a random number of acknowledgements plus a random delay (a
small ``compact_bytes`` makes compactions frequent, so many kills land inside one), then:

* loads the directory (``EditMemory.load``: snapshot + journal replay) and checks that every
  acknowledged write is there with the acknowledged version and answer, deleted edits are gone,
  and the one write in flight is either wholly there or wholly absent;
* checks consistency: the index holds exactly the edits' keys, each edit's own input routes to it;
* reopens it as a writer (``EditMemory.open``: torn tail truncated, leftovers cleaned), adds one
  edit, closes (compaction), reloads, and checks the same again.

The child avoids torch: a small numpy encoder (hashed words + a fixed image projection).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["CrashEncoder", "run_crash_trials"]

logger = logging.getLogger("esg_memory.crash")
_WORD = re.compile(r"[a-z0-9]+")
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "cyan"]
SHAPES = ["circle", "square", "triangle"]


class CrashEncoder:
    """Deterministic and cheap: hashed bag-of-words text vectors + random-projection image vectors."""

    def __init__(self, dim: int = 32) -> None:
        self.dim = dim
        self.name = f"crash-hash:dim={dim}"
        self._proj = np.random.default_rng(7).standard_normal((4 * 4 * 3, dim))

    def _word(self, w: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def _vec(self, im: Any, text: str | None) -> np.ndarray:
        from PIL import Image

        from esg_memory.images import load_image

        v = np.zeros(self.dim)
        if im is not None:
            img = im.convert("RGB") if isinstance(im, Image.Image) else load_image(im).image
            px = np.asarray(img.resize((4, 4)), dtype=np.float64).reshape(-1) / 255.0 - 0.5
            p = px @ self._proj
            v += p / max(np.linalg.norm(p), 1e-12)
        if text is not None:
            t = sum((self._word(w) for w in _WORD.findall(text.lower())), np.zeros(self.dim))
            v += t / max(np.linalg.norm(t), 1e-12)
        return v / max(np.linalg.norm(v), 1e-12)

    def encode(self, images: Sequence[Any], texts: Sequence[str | None]) -> np.ndarray:
        return np.stack([self._vec(i, t) for i, t in zip(images, texts, strict=True)]).astype(np.float32)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        return self.encode(list(images), [None] * len(images))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode([None] * len(texts), list(texts))


def _image(k: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = random.Random(k)
    im = Image.new("RGB", (24, 24), (250, 250, 250))
    d = ImageDraw.Draw(im)
    box = (4 + rng.randrange(4), 4 + rng.randrange(4), 18 + rng.randrange(4), 18 + rng.randrange(4))
    fill = tuple(rng.randrange(256) for _ in range(3))
    d.ellipse(box, fill=fill) if k % 2 else d.rectangle(box, fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _spec(k: int) -> dict[str, Any]:
    """The k-th edit (deterministic): a text-only edit every third, else image + question."""
    q = f"what {SHAPES[k % 3]} colour is item {k} {COLORS[k % len(COLORS)]}?"
    return {"image": None if k % 3 == 0 else _image(k), "question": q, "answer": f"answer {k}"}


# ------------------------------------------------------------------------------------ child
def child(path: Path, seed: int, n_ops: int, compact_bytes: int, background: bool) -> None:
    from esg_memory.config import JournalConfig, MemoryConfig
    from esg_memory.memory import EditMemory

    rng = random.Random(seed)
    enc = CrashEncoder()
    cfg = JournalConfig(compact_bytes=compact_bytes, background=background)
    if not path.exists():
        # few generated positives: the point is the write path, not scope quality
        EditMemory(enc, MemoryConfig(n_text_positives=1, n_image_positives=1)).save(path)
    mem = EditMemory.open(path, enc, journal=cfg)
    out = sys.stdout

    def say(d: dict[str, Any]) -> None:
        out.write(json.dumps(d) + "\n")
        out.flush()

    next_id = max([-1, *(e.id for e in mem.list())]) + 1
    for i in range(n_ops):
        live = sorted(e.id for e in mem.list())
        r = rng.random()
        if not live or r < 0.45:
            k = next_id
            next_id += 1
            spec = _spec(k)
            say({"begin": i, "op": "add", "id": k})
            mem.add(edit_id=k, **spec)
            say({"ack": i, "op": "add", "id": k, "version": 1, "answer": spec["answer"]})
        elif r < 0.65:
            eid = rng.choice(live)
            ans = f"revised {i}"
            say({"begin": i, "op": "revise", "id": eid, "answer": ans})
            v = mem.revise(eid, answer=ans)
            say({"ack": i, "op": "revise", "id": eid, "version": v, "answer": ans})
        elif r < 0.75:
            eid = rng.choice(live)
            hist = mem.history(eid)
            back = rng.choice(hist)
            say({"begin": i, "op": "rollback", "id": eid, "answer": back.answer})
            v = mem.rollback(eid, back.version)
            say({"ack": i, "op": "rollback", "id": eid, "version": v, "answer": back.answer})
        elif r < 0.85:
            eid = rng.choice(live)
            data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * rng.randrange(1, 64)
            ver = mem.get(eid).version
            sha = hashlib.sha256(data).hexdigest()
            # in flight, it may replace the acknowledged attachment of the same version: say which
            say({"begin": i, "op": "attach", "id": eid, "version": ver, "sha256": sha})
            mem.attach(eid, "adapter", data, version=ver)
            say({"ack": i, "op": "attach", "id": eid, "version": ver, "sha256": sha})
        else:
            eid = rng.choice(live)
            say({"begin": i, "op": "delete", "id": eid})
            mem.delete(eid)
            say({"ack": i, "op": "delete", "id": eid})
    say({"done": True})
    mem.close()


# ------------------------------------------------------------------------------------ parent
def _expected(lines: list[dict]) -> tuple[dict[int, dict], set[int], dict | None]:
    """Acknowledged state (id -> {version, answer, attach}), acknowledged deletes, the op in flight."""
    live: dict[int, dict] = {}
    deleted: set[int] = set()
    pending = None
    for d in lines:
        if "begin" in d:
            pending = d
            continue
        if "ack" not in d:
            continue
        pending = None
        eid = d["id"]
        if d["op"] == "add":
            live[eid] = {"version": 1, "answer": d["answer"], "attach": {}}
        elif d["op"] in ("revise", "rollback"):
            live[eid].update(version=d["version"], answer=d["answer"])
        elif d["op"] == "attach":
            live[eid]["attach"][d["version"]] = d["sha256"]
        elif d["op"] == "delete":
            live.pop(eid)
            deleted.add(eid)
    return live, deleted, pending


def check_memory(mem: Any, live: dict[int, dict], deleted: set[int], pending: dict | None) -> list[str]:
    """Problems found (empty = consistent and nothing acknowledged lost)."""
    from esg_memory.errors import InternalError

    problems = []
    present = {e.id: e for e in mem.list()}
    fl = pending or {}
    for eid, want in live.items():
        e = present.get(eid)
        if e is None:
            if not (fl.get("op") == "delete" and fl.get("id") == eid):
                problems.append(f"acknowledged edit {eid} lost")
            continue
        ok = (e.version, e.answer) == (want["version"], want["answer"])
        in_flight = fl.get("id") == eid and fl.get("op") in ("revise", "rollback")
        if not ok and not (in_flight and (e.version, e.answer) == (want["version"] + 1, fl["answer"])):
            problems.append(f"edit {eid}: v{e.version} {e.answer!r}, acknowledged v{want['version']} "
                            f"{want['answer']!r}")
        for ver, sha in want["attach"].items():
            data = mem.attachment(eid, "adapter", version=ver) if ver <= e.version else None
            got = None if data is None else hashlib.sha256(data).hexdigest()
            in_flight = fl.get("op") == "attach" and fl.get("id") == eid and fl.get("version") == ver
            if got != sha and not (in_flight and got == fl.get("sha256")):  # whole, or absent
                problems.append(f"edit {eid}: acknowledged attachment of v{ver} lost")
    for eid in present:
        if eid in deleted:
            problems.append(f"deleted edit {eid} is back")
        elif eid not in live and not (fl.get("op") == "add" and fl.get("id") == eid):
            problems.append(f"edit {eid} was never acknowledged")
    index = mem.snapshot(settle=False).index  # the live index (read only)
    ix = sorted(int(i) for i in index.edit_ids())
    if ix != sorted(present):
        problems.append(f"index holds {ix}, records {sorted(present)}")
    for eid in present:
        k, t = index.keys_of(eid)
        mk, mt = mem.keys_of(eid)
        if k.shape != mk.shape or not np.array_equal(t, mt):
            problems.append(f"edit {eid}: index keys differ from its record")
    try:
        mem.verify()
    except InternalError as e:
        problems.append(f"derived structures: {e}")
    for eid, e in present.items():
        img = mem.open_image(e.image) if e.image else None
        got = int(mem.route(images=[img], texts=[e.question]).edit_ids[0])
        if got != eid:
            problems.append(f"edit {eid}: its own input routes to {got}")
    return problems


def _leftovers(path: Path) -> bool:
    """A compaction was under way: its temp files or more than one journal segment are on disk."""
    names = [p.name for p in path.iterdir()] if path.is_dir() else []
    segs = list((path / "journal").glob("*.wal")) if (path / "journal").is_dir() else []
    temp = any(n.startswith((".snapshot.", ".compact-")) or n == "snapshot.old" for n in names)
    return temp or len(segs) > 1


def run_crash_trials(trials: int, seed: int, workdir: Path, *, ops: int = 40, compact_bytes: int = 48 * 1024,
                     max_delay_s: float = 0.05, timeout_s: float = 60.0) -> dict[str, Any]:
    """Run ``trials`` kill-and-recover trials; returns counts (``lost`` and ``partial`` must be 0).

    Keys: trials, kills (children killed before they finished), acknowledged (writes acknowledged
    before the kills), recovered (acknowledged writes found intact), lost, partial (in-flight or
    unacknowledged writes found half-applied or never-acknowledged state), kills_during_compaction,
    problems (the first few messages), seconds.
    """
    from esg_memory.memory import EditMemory

    rng = random.Random(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enc = CrashEncoder()
    stats = {"trials": 0, "kills": 0, "acknowledged": 0, "recovered": 0, "lost": 0, "partial": 0,
             "kills_during_compaction": 0, "in_flight_present": 0, "in_flight_absent": 0, "problems": []}
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for t in range(trials):
        path = workdir / f"trial{t}"
        shutil.rmtree(path, ignore_errors=True)
        background = t % 2 == 0
        stop_after = rng.randrange(1, ops)
        delay = rng.random() * max_delay_s
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path),
               "--seed", str(seed * 1000 + t), "--ops", str(ops), "--compact-bytes", str(compact_bytes)]
        if background:
            cmd.append("--background")
        errf = open(workdir / f"trial{t}.stderr", "w+")  # noqa: SIM115  (closed below)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, env=env, text=True)
        lines: list[dict] = []
        acks = 0
        deadline = time.monotonic() + timeout_s
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            d = json.loads(line)
            lines.append(d)
            acks += "ack" in d
            if acks >= stop_after:
                time.sleep(delay)
                break
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        # read through the same buffered reader: readline() may already hold lines read ahead
        rest = proc.stdout.read()
        proc.wait(timeout_s)
        errf.seek(0)
        err = errf.read()
        errf.close()
        (workdir / f"trial{t}.stderr").unlink()
        lines += [json.loads(x) for x in rest.splitlines() if x.strip()]
        if not killed and not any(d.get("done") for d in lines):
            raise RuntimeError(f"crash child failed before being killed: {err[-2000:]}")
        stats["trials"] += 1
        stats["kills"] += killed
        stats["kills_during_compaction"] += killed and _leftovers(path)
        live, deleted, pending = _expected(lines)
        n_ack = sum("ack" in d for d in lines)
        stats["acknowledged"] += n_ack
        problems = check_memory(EditMemory.load(path, enc), live, deleted, pending)
        # the writer's recovery: torn tail truncated, leftovers cleaned, then compact on close
        with EditMemory.open(path, enc) as mem:
            problems += check_memory(mem, live, deleted, pending)
            if pending is not None:
                stats["in_flight_present" if _applied(mem, pending, live) else "in_flight_absent"] += 1
            k = 10**6 + t
            mem.add(edit_id=k, **_spec(k))
            live[k] = {"version": 1, "answer": _spec(k)["answer"], "attach": {}}
            if pending and pending["op"] in ("add",) and pending["id"] in mem:
                live[pending["id"]] = {"version": 1, "answer": mem.get(pending["id"]).answer, "attach": {}}
                pending = None
        problems += check_memory(EditMemory.load(path, enc), live, deleted, pending)
        lost = [p for p in problems if "lost" in p]
        stats["lost"] += len(lost)
        stats["partial"] += len(problems) - len(lost)
        stats["recovered"] += n_ack if not lost else n_ack - len(lost)
        stats["problems"] += [f"trial {t}: {p}" for p in problems][:5]
        if problems:  # keep the evidence: the child's transcript next to its directory
            (workdir / f"trial{t}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
        else:
            shutil.rmtree(path, ignore_errors=True)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats["problems"] = stats["problems"][:20]
    return stats


def _applied(mem: Any, pending: dict, live: dict[int, dict]) -> bool:
    eid, op = pending["id"], pending["op"]
    if op == "add":
        return eid in mem
    if op == "delete":
        return eid not in mem
    if op in ("revise", "rollback"):
        return eid in mem and mem.get(eid).version == live[eid]["version"] + 1
    if op == "attach":
        data = mem.attachment(eid, "adapter", version=pending["version"]) if eid in mem else None
        return data is not None and hashlib.sha256(data).hexdigest() == pending["sha256"]
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", type=Path, help="(internal) run the writer child on this directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", type=int, default=40)
    p.add_argument("--compact-bytes", type=int, default=48 * 1024)
    p.add_argument("--background", action="store_true")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child, args.seed, args.ops, args.compact_bytes, args.background)
        return 0
    import tempfile

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as d:
        stats = run_crash_trials(args.trials, args.seed, Path(args.workdir or d), ops=args.ops,
                                 compact_bytes=args.compact_bytes)
    print(json.dumps(stats, indent=1))
    return 0 if stats["lost"] == 0 and stats["partial"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
