"""`Writer`: the write path of one memory: plan, one `Op` + `Change`, hook and journal, install.

Every write holds the writer lock from planning to installation (writers are serialised; readers
never wait for planning, only for the short installation under the state lock). A write first
settles pending deletes, so it plans on the settled state. Planning happens on a copy-on-write
`Plan`; nothing is visible until `commit` installed the whole `Change`, and if the commit hook or
the journal refuses, nothing was installed at all. A change journaled but not installed (the
installation raised) is voided in the journal, so replay never resurrects a write the caller saw
fail.

On a shared store (`esg_memory.replicas`) the journal may refuse a write with `StaleStateError`:
another replica appended at the position this one planned on. The write is then planned again on
the caught-up state (`replanned`), so a plan — and its neighbours' re-fits — never rests on stale
state; `sync` is that catch-up, also called by the replica's follower thread.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from index import UnitRows

from ..errors import InvalidInputError, StaleStateError
from ..types import EditVersion, FeedbackOutcome
from ..validate import check_text
from .committed import Committed
from .encode import EditEncoder
from .feedback import plan_feedback
from .inputs import additions, attachment_arg, image_arg, lookup, version_of
from .ops import AddEdits, Attach, Change, Delete, Feedback, NewEdit, NewVersion, Op, Settle, effects_of
from .plan import Plan
from .router import Router
from .settle import GaveWay, Settler, WriterMutex
from .state import EditState, EditVectors

__all__ = ["Writer"]

logger = logging.getLogger("esg_memory.memory")

CommitHook = Callable[[dict[str, Any], Mapping[str, bytes]], None]


def replanned(write: Callable[..., Any]) -> Callable[..., Any]:
    """Run a `Writer` write again on the caught-up state while a shared log refuses it as stale."""

    @functools.wraps(write)
    def run(self: Writer, *args: Any, **kwargs: Any) -> Any:
        for attempt in itertools.count(1):
            try:
                return write(self, *args, **kwargs)
            except StaleStateError:
                if attempt >= getattr(self.log, "max_replans", 1):
                    raise
                self.sync()
        raise AssertionError("unreachable")  # itertools.count never ends

    return run


class Writer:
    """Plans and commits every write of one memory (see the module docstring).

    ``owner`` is the memory the journal's compaction snapshots (`EditMemory.snapshot`).
    ``log``: the durable journal (`esg_memory.persist.Durable`) or None; ``hook``: the user's commit
    hook or None; ``origin``: the durable position the state equals, cleared by every write.
    """

    def __init__(
        self,
        state: Committed,
        lock: threading.RLock,
        encoding: EditEncoder,
        router: Router,
        owner: Any,
    ) -> None:
        self.state = state
        self.lock = lock
        self.encoding = encoding
        self.router = router
        self.owner = owner
        self.wlock = WriterMutex()  # serialises writers (planning + commit); reentrant
        self.settler = Settler(self.wlock, self._settle_replanned, lambda: bool(state.pending))
        self.hook: CommitHook | None = None
        self.log: Any = None
        self.origin: tuple[str, str, int] | None = None

    # ------------------------------------------------------------------ planning / commit
    def plan(self, blobs: dict[str, bytes] | None = None) -> Plan:
        st = self.state
        return Plan(
            st.edits,
            st.pool.keys,
            st.config,
            lambda lo, hi, extra: self.encoding.cross(lo, hi, self.blob_lookup(extra)),
            st.crosses,
            {} if blobs is None else blobs,
            st.table.view(),
            st.derived(),
        )

    def blob_lookup(self, extra: Mapping[str, bytes]) -> Callable[[str], bytes]:
        """sha256 -> image bytes: this write's new images first, then the committed store."""
        stored = self.state.blobs
        return lambda sha: extra[sha] if sha in extra else stored[sha]

    def encode_version(self, v: EditVersion, blobs: Mapping[str, bytes]) -> EditVectors:
        return self.encoding.version(v, self.blob_lookup(blobs), self.state.pool)

    def commit(
        self,
        op: Op,
        plan: Plan | None = None,
        blobs: Mapping[str, bytes] | None = None,
        attachment: bytes | Mapping[str, bytes] | None = None,
        *,
        states: Mapping[int, EditState | None] | None = None,
    ) -> None:
        """Journal, then install, one write (caller holds the writer lock); raising abandons it.

        The `Change` is the plan's overlay (or ``states`` for a write planned without one) with the
        bookkeeping the op implies. ``attachment``: an `Attach`'s bytes, or the attachments an
        `AddEdits` stores with its edits (bytes by sha256; the hook sees them among the blobs).
        """
        blobs = {} if blobs is None else dict(blobs)
        fx = effects_of(op, attachment)
        change = plan.change(fx, blobs) if plan is not None else Change(states=dict(states or {}), effects=fx)
        if self.log is not None:
            self.log.check_writable()  # closed or read-only: refuse before the hook sees anything
        if self.hook is not None:
            if isinstance(op, Attach):
                self.hook(op.to_dict(), {op.sha256: attachment})
            else:
                self.hook(op.to_dict(), {**blobs, **(attachment if isinstance(attachment, Mapping) else {})})
        self.origin = None  # this state no longer equals the directory it was loaded from
        lsn = None if self.log is None else self.log.log(op, change, attachment, self.state.blobs)
        try:
            with self.lock:
                self.state.install(change)
        except BaseException:
            if lsn is not None:
                self.log.abort(lsn)  # journaled but not applied: void the record
            raise
        if lsn is not None:
            self.log.after_write(self.owner)

    # ------------------------------------------------------------------ writes
    def add_many(
        self,
        edits: Any,
        attachments: Callable[[int, str, str], Mapping[str, bytes]] | None = None,
        progress: Callable[[], None] | None = None,
    ) -> list[int]:
        if attachments is not None and not callable(attachments):
            raise InvalidInputError("attachments must be a callable (edit_id, question, answer) -> dict")
        if progress is not None and not callable(progress):
            raise InvalidInputError("progress must be a callable or None")
        if isinstance(edits, Iterable) and not isinstance(edits, (str, bytes, Mapping, list, tuple)):
            edits = list(edits)  # a generator must survive being planned twice (`replanned`)
        return self._add_many(edits, attachments, progress)

    @replanned
    def _add_many(
        self,
        edits: Any,
        attachments: Callable[[int, str, str], Mapping[str, bytes]] | None,
        progress: Callable[[], None] | None,
    ) -> list[int]:
        with self.wlock:
            self.settle_locked()
            blobs: dict[str, bytes] = {}
            now = time.time()
            new = additions(edits, blobs, self.state, now)
            att_bytes: dict[str, bytes] = {}
            if attachments is not None:
                new = [(self._with_attachments(ne, attachments, att_bytes), v) for ne, v in new]
            plan = self.plan(blobs)
            affected: set[int] = set()
            # encoded together, a chunk of edits per few encoder calls (`EditEncoder.versions`)
            vecs = self.encoding.versions([v for _, v in new], self.blob_lookup(blobs), self.state.pool)
            for (ne, v), vec in zip(new, vecs, strict=True):
                st = EditState(
                    id=ne.edit_id,
                    created_at=now,
                    updated_at=now,
                    metadata=dict(ne.metadata),
                    versions=(v,),
                    vec=vec,
                    fit=None,
                )
                affected |= plan.set_vectors(st, self.state.table.view())
                if progress is not None:
                    progress()
            plan.refit_all(affected)
            ids = [ne.edit_id for ne, _ in new]
            self.commit(AddEdits(time=now, edits=tuple(ne for ne, _ in new)), plan, blobs, att_bytes or None)
            logger.info("added edits %s; re-fitted neighbours %s", ids, sorted(affected - set(ids)))
            return ids

    @staticmethod
    def _with_attachments(
        ne: NewEdit, make: Callable[[int, str, str], Mapping[str, bytes]], out: dict[str, bytes]
    ) -> NewEdit:
        """``ne`` naming the attachments ``make`` gives for it (their bytes added to ``out`` by sha256)."""
        got = make(ne.edit_id, ne.question, ne.answer)
        if not isinstance(got, Mapping):
            raise InvalidInputError(f"attachments of edit {ne.edit_id} must be a dict of kind -> bytes")
        shas = {}
        for kind, data in got.items():
            data = attachment_arg(kind, data)
            sha = hashlib.sha256(data).hexdigest()
            out[sha] = data
            shas[kind] = sha
        return replace(ne, attachments=shas)

    @replanned
    def new_version(
        self, eid: Any, make: Callable[[EditState, dict[str, bytes]], tuple[EditVersion, int | None]]
    ) -> int:
        """A new current version of ``eid`` made by ``make(state, blobs) -> (version, attachments_from)``."""
        with self.wlock:
            self.settle_locked()
            st = lookup(self.state.edits, eid)
            blobs: dict[str, bytes] = {}
            v, attach_from = make(st, blobs)
            plan = self.plan(blobs)
            new = replace(
                st, versions=(*st.versions, v), updated_at=time.time(), vec=self.encode_version(v, blobs)
            )
            plan.refit_all(plan.set_vectors(new, self.state.table.view()))
            self.commit(NewVersion(st.id, v.to_dict(), attach_from), plan, blobs)
            return v.version

    @replanned
    def delete(self, edit_id: Any) -> None:
        with self.wlock:
            st = lookup(self.state.edits, edit_id)
            settle = self.state.config.settle
            if settle != "sync":
                # phase one: the edit leaves; its holders are re-fitted when settled
                holders = self.state.derived().holders.get(st.id)
                op = Delete(st.id, deferred=True, answer=st.current.answer) if holders else Delete(st.id)
                self.commit(op, states={st.id: None})
                logger.info(
                    "deleted edit %d; holders %s re-fitted when settled", st.id, sorted(holders or ())
                )
                if holders and settle == "background":
                    self.settler.wake()
                return
            self.settle_locked()
            plan = self.plan()
            affected = plan.remove(st.id)
            plan.refit_all(affected)
            self.commit(Delete(st.id), plan)
            logger.info("deleted edit %d; re-fitted neighbours %s", st.id, sorted(affected))

    @replanned
    def feedback(self, image: Any, text: Any, expected_edit_id: Any) -> FeedbackOutcome:
        with self.wlock:
            self.settle_locked()
            if expected_edit_id is not None:
                lookup(self.state.edits, expected_edit_id)
            blobs: dict[str, bytes] = {}
            sha = image_arg(image, blobs)
            txt = None if text is None else check_text(text, "text")
            if sha is None and txt is None:
                raise InvalidInputError("feedback needs an image, a text, or both")
            img = None if sha is None else self.blob_lookup(blobs)(sha)
            key = UnitRows.trusted(self.encoding.keys([img], [txt]))
            before, inside = self.router.route(key, want_all=True)
            routed_before = int(before.edit_ids[0])
            exp = None if expected_edit_id is None else int(expected_edit_id)
            now = time.time()
            plan = self.plan(blobs)
            actions, affected = plan_feedback(
                plan,
                self.state.table.view(),
                inside[0],
                exp,
                sha,
                txt,
                now,
                lambda v: self.encode_version(v, blobs),
            )
            if not actions:
                return FeedbackOutcome(routed_before, routed_before, ["already routed as expected"], [], True)
            refit = plan.refit_all(affected)
            self.commit(Feedback(now, sha, txt, exp), plan, blobs)
            after = int(self.router.route(key)[0].edit_ids[0])
            resolved = after == (-1 if exp is None else exp)
            logger.info("feedback: %s; re-fitted %s; resolved=%s", actions, refit, resolved)
            return FeedbackOutcome(routed_before, after, actions, refit, resolved)

    @replanned
    def attach(self, edit_id: Any, kind: Any, data: Any, version: Any) -> None:
        with self.wlock:
            self.settle_locked()
            st = lookup(self.state.edits, edit_id)
            data = attachment_arg(kind, data)
            self.commit(
                Attach(st.id, kind, version_of(st, version), hashlib.sha256(data).hexdigest()),
                attachment=data,
            )

    # ------------------------------------------------------------------ following a shared log
    def sync(self) -> int:
        """Install what a shared log holds beyond this state (the records other replicas appended).

        Returns the number of records applied (0 without a shared log or at its head). Decoded and
        replayed exactly like a journal at open (`esg_memory.persist.replay`), under the writer lock.
        """
        pull = getattr(self.log, "pull", None)
        if pull is None:
            return 0
        with self.wlock:
            got = pull(self.state.edits, self.state.dim)
            if got is None:
                return 0
            change, count = got
            with self.lock:
                self.state.install(change)
            return count

    def when_settled(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` under the writer lock with no delete pending (settled first, through `settle`).

        On a shared log a follower may bring a new deferred delete between the settle and the lock;
        then it is settled again (a settle is re-planned like any write).
        """
        for _ in range(getattr(self.log, "max_replans", 1) + 1):
            self.settle()
            with self.wlock:
                if not self.state.pending:
                    return fn()
        raise StaleStateError("deletes kept arriving while this memory tried to settle them")

    @replanned
    def _settle_replanned(self, give_way: bool = False) -> None:
        self.settle_locked(give_way)

    # ------------------------------------------------------------------ two-phase delete
    @replanned
    def settle(self) -> None:
        if not self.state.pending:
            return
        with self.wlock:
            self.settle_locked()

    def settle_locked(self, give_way: bool = False) -> None:
        """Re-fit the holders of every pending delete (caller holds the writer lock).

        ``give_way`` (the background settler): raise `GaveWay` between two re-fits when another
        writer waits for the lock; the plan is dropped and the deletions stay pending.
        """
        pend = dict(self.state.pending)
        if not pend:
            return

        def check() -> None:
            if give_way and self.wlock.contended:
                raise GaveWay

        plan = self.plan()
        affected: set[int] = set()
        for eid in sorted(pend):
            check()
            affected |= plan.release(eid, pend[eid])
        plan.refit_all(affected, before_each=check)
        self.commit(Settle(tuple(sorted(pend))), plan)
        logger.info("settled deletes %s; re-fitted neighbours %s", sorted(pend), sorted(affected))
