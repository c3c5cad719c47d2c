"""`EditJobs`: checking an edit's own input and tuning its adapter, in the caller's thread or on one
background thread, with each edit version's `EditStatus`.

One job is ``check? -> tune -> check``:

- **check** (`EditJobs.check`): the edited model's greedy answer to the edit's own (image, question), through
  the real read path (routing, then the injected adapter), compared with the edit's answer;
- **tune** (`EditJobs.tune`): `AdapterRuntime.tune` from the version's current adapter; the result is attached
  only if the edit did not move on meanwhile;
- an ``if_needed`` job (``tune="auto"``) checks first and tunes only when the check fails; every job that
  tunes checks again after, so ``gives_answer`` is what the model now does.

A failed job is logged and recorded (``tuning="failed"``, with its error) and its exception re-raised to
whoever waits on it (`EditJobs.wait` re-raises the first). A job whose edit version was deleted or revised
before it ran ends quietly: that version no longer exists to be tuned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from ..errors import UnknownEditError
from .adapters import ADAPTER_KIND
from .runtime import AdapterRuntime
from .status import EditStatus, StatusBook, derived_status
from .tuning import TuneReport, tuning_examples

__all__ = ["EditJobs"]

logger = logging.getLogger("esg_memory.model")  # the wrapper's logger: these messages came from it


class _Owner(Protocol):
    """What the jobs need of `EditedModel` (declared here: no import of the wrapper, no cycle)."""

    memory: Any
    runtime: AdapterRuntime
    edit_config: Any
    family: Any
    processor: Any

    def adapter(self, edit_id: int, version: int | None = None) -> Any: ...


class EditJobs:
    """The check and tuning jobs of one wrapper, and the statuses they record; see the module docstring.

    ``answer(image, question, max_new_tokens) -> str``: the wrapper's edited answer to one row.
    """

    def __init__(self, owner: _Owner, answer: Callable[[Any, str, int], str]) -> None:
        self.owner = owner
        self._answer = answer
        self.lock = threading.RLock()
        """Held while a tuned adapter is swapped in (and by the wrapper around its job bookkeeping)."""
        self._executor: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future] = {}
        self.reports: dict[int, TuneReport] = {}
        """The latest tuning report per edit."""
        self.book = StatusBook()

    # ---- status ----------------------------------------------------------------------------------
    def status(self, edit_id: int) -> EditStatus:
        """The current version's status: recorded here, else read off its stored adapter."""
        memory = self.owner.memory
        edit = memory.get(edit_id)  # UnknownEditError for an unknown or deleted edit
        st = self.book.get(edit.id, edit.version)
        if st is not None:
            return st
        stored = memory.attachment(edit.id, ADAPTER_KIND, version=edit.version)
        return derived_status(edit.id, edit.version, stored)

    def forget(self, edit_id: int) -> None:
        self.book.forget(edit_id)

    # ---- jobs ------------------------------------------------------------------------------------
    def start(
        self, edit_id: int, *, background: bool, if_needed: bool, kind: str | None = None, check: bool = True
    ) -> TuneReport | Future | None:
        """Queue (``background``) or run a job for the edit's current version; its status is "pending"
        from now until the job ends. ``check=False``: no check after tuning (``gives_answer`` unknown)."""
        edit = self.owner.memory.get(edit_id)
        prior = self.status(edit.id)
        self.book.update(edit.id, edit.version, base=prior, tuning="pending", error=None)
        args = (edit.id, edit.version, kind, if_needed, check, prior.tuning)
        if not background:
            return self._job(*args)
        with self.lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esg-tune")
            fut = self._executor.submit(self._job, *args)
            self._futures[edit.id] = fut
        return fut

    def _job(
        self, edit_id: int, version: int, kind: str | None, if_needed: bool, check: bool, prior: str
    ) -> TuneReport | None:
        try:
            if if_needed and self.check(edit_id, version):
                # nothing to tune: the adapter it has (compiled, or tuned before) gives the answer
                self._record(edit_id, version, tuning="done" if prior == "done" else "none")
                return None
            report = self.tune(edit_id, version, kind)
            if check:
                self.check(edit_id, version)
            else:
                self._record(edit_id, version, gives_answer=None)
            self._record(edit_id, version, tuning="done")
            return report
        except Exception as exc:
            if not self._current(edit_id, version):
                logger.info("edit %d v%d was revised or deleted before its job ended (%s)",
                            edit_id, version, exc)
                return None
            self._record(edit_id, version, tuning="failed", error=f"{type(exc).__name__}: {exc}")
            logger.warning("edit %d v%d: tuning failed (%s: %s); it keeps its compiled adapter",
                           edit_id, version, type(exc).__name__, exc)
            raise

    def check(self, edit_id: int, version: int | None = None) -> bool | None:
        """Whether the edited model now answers the edit's own input with its answer (recorded); None when
        ``version`` is no longer the current one."""
        memory = self.owner.memory
        edit = memory.get(edit_id)
        if version is not None and edit.version != int(version):
            return None
        image = memory.open_image(edit.image) if edit.image else None
        target = edit.answer.strip()
        # the answer's tokens, its EOS, and one more: an answer that runs on does not match
        n = len(self.owner.family.target_ids(self.owner.processor, target)) + 1
        ok = self._answer(image, edit.question, n) == target
        self._record(edit.id, edit.version, gives_answer=ok)
        if not ok:
            logger.info("edit %d v%d: its own input does not get its answer", edit.id, edit.version)
        return ok

    def tune(self, edit_id: int, version: int, kind: str | None) -> TuneReport:
        """Tune the version's adapter; attached only if the edit is still at ``version`` when it ends."""
        o = self.owner
        edit = o.memory.get(edit_id)
        if edit.version != version:
            raise UnknownEditError(
                f"edit {edit_id} moved to v{edit.version} before tuning v{version} started"
            )
        base = o.adapter(edit_id, version)
        cfg = o.edit_config
        examples = tuning_examples(o.memory, edit, cfg.n_paraphrases, cfg.n_augmented_images,
                                   cfg.adapters.max_examples, n_unrelated=cfg.n_unrelated_questions)
        tuned, report = o.runtime.tune(base, examples, edit.answer, kind=kind)
        with self.lock:
            if not self._current(edit_id, version):
                logger.info("edit %d changed during tuning; tuned v%d discarded", edit_id, version)
            else:
                if not report.exact:  # still kept: it is the best-margin point, never worse than compiled
                    logger.warning("edit %d v%d: tuning stopped short of an exact match (margin %.3f)",
                                   edit_id, version, report.min_margin)
                o.memory.attach(edit_id, ADAPTER_KIND, tuned.to_bytes(), version=version)
            self.reports[edit_id] = report
        return report

    def wait(self, timeout: float | None = None) -> list[TuneReport]:
        """Block until the queued jobs end; the reports of those that tuned. Re-raises the first job error."""
        with self.lock:
            futs = list(self._futures.items())
        out = [f.result(timeout=timeout) for _, f in futs]
        with self.lock:
            for eid, f in futs:
                if self._futures.get(eid) is f:
                    del self._futures[eid]
        return [r for r in out if r is not None]

    def close(self) -> None:
        """Let the queued jobs finish; a later job starts a new thread."""
        with self.lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True)

    # ---- helpers ---------------------------------------------------------------------------------
    def _current(self, edit_id: int, version: int) -> bool:
        memory = self.owner.memory
        if edit_id not in memory:
            return False
        try:
            return memory.get(edit_id).version == version
        except UnknownEditError:
            return False

    def _record(self, edit_id: int, version: int, **changes: Any) -> None:
        # only for a version that still exists: a deleted edit's job must not leave an entry behind
        if self._current(edit_id, version):
            self.book.update(edit_id, version, **changes)
