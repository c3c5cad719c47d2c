"""Concurrent writers and readers on one `EditedModel`, checked against a serial replay of the writes.

Writers add, revise and delete edits (compiled adapters) one at a time under a lock that also appends
each write to a log *after* it returns, so the log index is the write's sequence number and the
memory's committed state after write ``k`` is ``S_k``. A reader notes ``lo = len(log)`` before its
request and ``hi = len(log)`` after it; whatever state it saw was committed before it returned, and at
most one write is ever in flight, so it saw states within ``S_lo .. S_hi+1``.

After the run the log is replayed serially on a fresh memory (same encoder and config: scopes are a
function of the current set of edits, so the replay reproduces every ``S_k``), and each read is
checked: the edit it was routed to (id and version) is what some ``S_i`` in its window routes that
input to; the adapter it injected is that edit's current version in some ``S_j`` of the window; a
routed edit is dropped only if some ``S_j`` no longer holds it; `retrieve`'s answer belongs to the
routed version; and a generated text equals the serial model's text for the same input and edit.

Deletes are two-phase (`esg_memory.memory.settle`, the default ``settle="background"``): after
delete ``k`` returns, the memory may still be *unsettled*: the deleted edit gone, the others keeping
the scopes they had. The pending deletes are always a run of consecutive deletes (any other write
settles first), so the states a reader may also see after delete ``k`` are ``S_j`` less the keys of
the edits deleted by writes ``j+1 .. k``, for every ``j`` in that run; routing in them is replayed
from ``S_j``'s keys. The edits and versions in them are those of ``S_k``.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _fuzz_fixtures import CFG
from _memory_fixtures import HashKeyEncoder, shape_image

from esg_memory.memory import EditMemory
from esg_memory.model import EditedModel
from index import ScopedIndex

__all__ = ["ConcurrencyReport", "run_concurrency_check"]

_SLOTS = [
    ("red", "circle", "what is the lamp made of?", "what material is the lamp made of?"),
    ("blue", "square", "who painted the fence?", "which person painted the fence?"),
    ("green", "triangle", "where does the river flow?", "where does this river flow to?"),
    ("yellow", "circle", "when was the tower built?", "in which year was the tower built?"),
    ("purple", "square", "how heavy is the anchor?", "what does the anchor weigh?"),
]
_ANSWERS = ["glass", "copper", "north", "winter", "seven", "marble", "south", "autumn", "paper", "eleven"]


@dataclass
class ConcurrencyReport:
    writes: int = 0
    routes_checked: int = 0
    generations_checked: int = 0
    injections: int = 0
    stale_drops: int = 0  # routed edits deleted before their adapter was fetched (allowed, bare row)
    distinct_texts: int = 0
    errors: list[str] = field(default_factory=list)  # exceptions raised in any thread
    violations: list[str] = field(default_factory=list)  # reads no serial state explains

    @property
    def ops_checked(self) -> int:
        return self.writes + self.routes_checked + self.generations_checked

    def to_dict(self) -> dict[str, Any]:
        return {
            "writes": self.writes,
            "routes_checked": self.routes_checked,
            "generations_checked": self.generations_checked,
            "ops_checked": self.ops_checked,
            "injections": self.injections,
            "stale_drops": self.stale_drops,
            "distinct_texts": self.distinct_texts,
            "errors": list(self.errors),
            "violations": list(self.violations),
        }


def _images() -> list[Any]:
    return [shape_image(c, s) for c, s, _, _ in _SLOTS]


def _probes(images: list[Any]) -> list[tuple[Any, str]]:
    return [(images[i], q) for i, slot in enumerate(_SLOTS) for q in slot[2:]]


def run_concurrency_check(
    model: Any,
    processor: Any,
    seed: int = 0,
    writers: int = 2,
    routers: int = 2,
    generators: int = 2,
    n_writes: int = 30,
    min_reads: int = 6,
    max_seconds: float = 60.0,
) -> ConcurrencyReport:
    """``n_writes`` writes while readers route and generate (each reader at least ``min_reads`` times,
    going on until the writers are done), then check every read. Stops early after ``max_seconds``."""
    rng0 = random.Random(seed)
    enc = HashKeyEncoder(32)
    em = EditedModel.wrap(model, processor, EditMemory(enc, CFG))
    images = _images()
    probes = _probes(images)
    rep = ConcurrencyReport()
    log: list[tuple] = []  # ("add", eid, slot, answer) | ("revise", eid, answer) | ("delete", eid)
    wlock = threading.Lock()
    live: dict[int, int] = {}  # slot -> live edit id
    next_id = [0]
    local = threading.local()

    # per-thread records of what routing chose and which adapters were injected
    originals = {
        name: getattr(em.memory, name) for name in ("route", "route_ids") if hasattr(em.memory, name)
    }
    em_adapter = em.adapter

    def recorder(name: str):
        fn = originals[name]

        def rec(*a: Any, **k: Any) -> Any:
            res = fn(*a, **k)
            if getattr(local, "rec", None) is not None:
                if name == "route":
                    local.rec["routes"].append((res.edit_ids.tolist(), res.versions.tolist()))
                else:  # ids only: the version is checked through the injected adapter
                    local.rec["routes"].append((res.tolist(), None))
            return res

        return rec

    def adapter_rec(edit_id: int, version: int | None = None) -> Any:
        ad = em_adapter(edit_id, version)
        if getattr(local, "rec", None) is not None:
            local.rec["adapters"].append((ad.edit_id, ad.version))
        return ad

    for name in originals:
        setattr(em.memory, name, recorder(name))
    em.adapter = adapter_rec  # type: ignore[method-assign]

    def write_once(rng: random.Random) -> bool:
        with wlock:
            if len(log) >= n_writes:
                return False
            slot = rng.randrange(len(_SLOTS))
            eid = live.get(slot)
            q = _SLOTS[slot][2]
            if eid is None:
                eid, next_id[0] = next_id[0], next_id[0] + 1
                ans = rng.choice(_ANSWERS)
                em.add_edit(images[slot], q, ans, tune="never", edit_id=eid)
                live[slot] = eid
                log.append(("add", eid, slot, ans))
            elif rng.random() < 0.5:
                ans = rng.choice(_ANSWERS)
                em.revise_edit(eid, answer=ans, tune="never")
                log.append(("revise", eid, ans))
            else:
                em.delete_edit(eid)
                del live[slot]
                log.append(("delete", eid))
            return True

    reads: list[tuple] = []  # (kind, probe, lo, hi, record, result)
    stop = threading.Event()

    def guard(fn, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # any exception in any thread is a failure
            rep.errors.append(f"{threading.current_thread().name}: {type(e).__name__}: {e}")
            stop.set()

    def writer(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        while not stop.is_set() and write_once(rng):
            time.sleep(rng.random() * 0.02)

    def reader(k: int, kind: str) -> None:
        rng = random.Random(seed * 1000 + k)
        done = 0
        while not stop.is_set() and (done < min_reads or any(t.is_alive() for t in threads[:writers])):
            done += 1
            p = rng.randrange(len(probes))
            img, q = probes[p]
            local.rec = {"routes": [], "adapters": []}
            lo = len(log)
            if kind == "route":
                r = em.retrieve(images=[img], prompts=[q])[0]
                result: Any = (r.edit_id, r.version, r.answer)
            else:
                result = em.answer([img], [q], max_new_tokens=3)[0]
            hi = len(log)
            reads.append((kind, p, lo, hi, local.rec, result))
            local.rec = None
            time.sleep(0.002 if kind == "route" else 0.0)  # leave the generators some of the GIL

    for _ in range(2):  # a few edits exist before the readers start
        write_once(rng0)
    threads = [threading.Thread(target=guard, args=(writer, k), name=f"writer-{k}") for k in range(writers)]
    threads += [
        threading.Thread(target=guard, args=(reader, k, "route"), name=f"router-{k}") for k in range(routers)
    ]
    threads += [
        threading.Thread(target=guard, args=(reader, 100 + k, "generate"), name=f"generator-{k}")
        for k in range(generators)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    if any(t.is_alive() for t in threads):
        rep.errors.append("a thread did not finish (deadlock?)")
    for name in originals:
        delattr(em.memory, name)  # back to the class's methods
    del em.adapter
    rep.writes = len(log)
    _check(em, model, processor, enc, images, probes, log, reads, rep)
    return rep


def _replay(enc: Any, images: list[Any], probes: list[tuple[Any, str]], log: list[tuple]):
    """Per state k (after k writes): routing of every probe, and each live edit's (version, answer);
    per delete k: routing in each unsettled state it may leave (see the module docstring)."""
    mem = EditMemory(enc, CFG)
    routes, contents, keysets = [], [], []
    qkeys = mem.route(images=[p[0] for p in probes], texts=[p[1] for p in probes]).keys

    def snapshot() -> None:
        mem.settle()
        r = mem.route(keys=qkeys)
        routes.append(list(zip(r.edit_ids.tolist(), r.versions.tolist(), strict=True)))
        contents.append({e.id: (e.version, e.question, e.answer) for e in mem.list()})
        keysets.append({e.id: (*mem.keys_of(e.id), e.version) for e in mem.list()})

    snapshot()
    for op in log:
        if op[0] == "add":
            _, eid, slot, ans = op
            mem.add(images[slot], _SLOTS[slot][2], ans, edit_id=eid)
        elif op[0] == "revise":
            mem.revise(op[1], answer=op[2])
        else:
            mem.delete(op[1])
        snapshot()
    unsettled: dict[int, list[list[tuple[int, int]]]] = {}
    for k in range(1, len(log) + 1):
        j = k - 1
        while log[k - 1][0] == "delete":
            gone = {log[i - 1][1] for i in range(j + 1, k + 1)}
            unsettled.setdefault(k, []).append(_route_unsettled(keysets[j], gone, qkeys, CFG.route_k))
            if j == 0 or log[j - 1][0] != "delete":
                break
            j -= 1
    return mem, routes, contents, unsettled


def _route_unsettled(keyset: dict, gone: set[int], qkeys: np.ndarray, route_k: int) -> list[tuple[int, int]]:
    """Routing by one state's keys less the deleted edits' (as `EditMemory._route_keys` routes)."""
    left = {eid: v for eid, v in keyset.items() if eid not in gone}
    if not left:
        return [(-1, -1)] * qkeys.shape[0]
    ix = ScopedIndex(qkeys.shape[1])
    for eid in sorted(left):
        k, t, _ = left[eid]
        ix.add(np.full(t.shape[0], eid, dtype=np.int64), k, t)
    res = ix.search(qkeys, k=min(route_k, len(left)))
    ids = np.where(res.margins[:, 0] >= 0, res.edit_ids[:, 0], -1).tolist()
    return [(i, left[i][2] if i >= 0 else -1) for i in ids]


def _check(em, model, processor, enc, images, probes, log, reads, rep: ConcurrencyReport) -> None:
    _, routes, contents, unsettled = _replay(enc, images, probes, log)
    final = em.memory.route(images=[p[0] for p in probes], texts=[p[1] for p in probes]).edit_ids.tolist()
    if final != [r[0] for r in routes[-1]]:
        rep.violations.append(f"final routing {final} differs from the serial replay {routes[-1]}")
    history = {}  # (eid, version) -> answer, from the replay (versions are immutable)
    for c in contents:
        for eid, (v, _, a) in c.items():
            history[(eid, v)] = a
    texts: dict[tuple, set[str]] = {}
    for kind, p, lo, hi, rec, result in reads:
        window = range(lo, min(hi + 1, len(log)) + 1)
        allowed = {routes[k][p] for k in window}
        allowed |= {u[p] for k in window for u in unsettled.get(k, [])}
        what = f"{kind} probe {p} window S{lo}..S{window[-1]}"
        if rec["routes"]:
            ids, vers = rec["routes"][0]
            got = (ids[0], None if vers is None else vers[0])
        elif kind == "generate" and any(not contents[k] for k in window):
            got = (-1, -1)  # the wrapper skips routing while the memory is empty
        else:
            rep.violations.append(f"{what}: no routing recorded")
            continue
        if got not in allowed and (got[1] is not None or got[0] not in {e for e, _ in allowed}):
            rep.violations.append(f"{what}: routed to {got}, serial states allow {sorted(allowed)}")
        if kind == "route":
            rep.routes_checked += 1
            eid, ver, ans = result
            if (eid, ver) != got:
                rep.violations.append(f"{what}: retrieve reported {(eid, ver)} but routed {got}")
            elif (
                eid >= 0
                and ans != history.get((eid, ver))
                and not (ans is None and any(eid not in contents[k] for k in window))
            ):
                rep.violations.append(f"{what}: answer {ans!r} is not edit {eid} v{ver}'s")
            continue
        rep.generations_checked += 1
        eid = got[0]
        ads = rec["adapters"]
        if eid < 0 and ads:
            rep.violations.append(f"{what}: an adapter was injected for a row routed nowhere")
        if eid >= 0 and ads:
            rep.injections += 1
            a_eid, a_ver = ads[0]
            ok = a_eid == eid and any(contents[k].get(eid, (None,))[0] == a_ver for k in window)
            if not ok:
                rep.violations.append(f"{what}: injected edit {a_eid} v{a_ver} for a row routed to {got}")
            texts.setdefault((p, a_eid, a_ver), set()).add(result)
        elif eid >= 0:
            if not any(eid not in contents[k] for k in window):
                rep.violations.append(f"{what}: routed edit {eid} was live yet nothing was injected")
            rep.stale_drops += 1
            texts.setdefault((p, -1, -1), set()).add(result)
        else:
            texts.setdefault((p, -1, -1), set()).add(result)
    _check_texts(em, model, processor, enc, images, probes, contents, history, texts, rep)


def _check_texts(em, model, processor, enc, images, probes, contents, history, texts, rep) -> None:
    """Each (probe, injected edit version) group has one text, equal to a serial run's."""
    rep.distinct_texts = len({t for ts in texts.values() for t in ts})
    bare: dict[int, str] = {}
    with em.disable_edits():
        for p in {p for p, e, _ in texts if e < 0}:
            bare[p] = em.answer([probes[p][0]], [probes[p][1]], max_new_tokens=3)[0]
    question = {eid: q for c in contents for eid, (_, q, _) in c.items()}
    for (p, eid, ver), got in sorted(texts.items(), key=lambda kv: kv[0]):
        if len(got) != 1:
            rep.violations.append(f"probe {p} with edit {eid} v{ver}: several texts {sorted(got)}")
            continue
        text = next(iter(got))
        if eid < 0:
            if text != bare[p]:
                rep.violations.append(f"probe {p} unedited: {text!r} but the bare model says {bare[p]!r}")
            continue
        # serial reference: a memory holding only this edit version, which the probe must route to
        ref = EditedModel.wrap(model, processor, EditMemory(enc, CFG))
        slot = next(i for i, s in enumerate(_SLOTS) if s[2] == question[eid])
        rid = ref.add_edit(images[slot], question[eid], history[(eid, ver)], tune="never")
        if ref.retrieve(images=[probes[p][0]], prompts=[probes[p][1]])[0].edit_id != rid:
            continue  # the probe is only in scope next to other edits: no one-edit reference
        want = ref.answer([probes[p][0]], [probes[p][1]], max_new_tokens=3)[0]
        if text != want:
            rep.violations.append(f"probe {p} with edit {eid} v{ver}: {text!r}, serial run says {want!r}")
