"""`EditService`: the transport-free core of ``esg-memory serve`` (usable in-process, e.g. by benchmarks).

- Writers (add / delete / revise / rollback) are serialised by one mutex; each change of routing
  state is bracketed by `BatchedGenerator.mutating`, so generation running meanwhile reports exactly
  the edit it injected (the consistency model: `esg_memory.serve.generation`).
- Tuning (seconds) runs outside the exclusive lock: it only swaps the adapter of an existing
  (edit, version), which routing does not depend on.
- Durability: a writable service runs the model's memory in durable mode (`EditMemory.open` /
  `EditMemory.make_durable` on ``memory_dir/memory``; see `esg_memory.durable`): every write
  (the edit, its compiled and tuned adapters) is appended to the write-ahead journal and fsynced
  *before* the call returns, so an acknowledged write survives a crash (SIGKILL included).
  A write costs one journal record (O(edits it re-fits), not O(memory)); snapshots are written
  by background compaction when the journal grows past ``ServiceConfig.compact_bytes`` and at
  shutdown, while routing and writes go on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import JournalConfig, ServiceConfig, check_tune_mode
from ..errors import ConfigError, EsgMemoryError, InvalidInputError, StoreUnavailableError
from .generation import BatchedGenerator, GenerateOptions, finite_or_none
from .metrics import Metrics

__all__ = ["EditService", "ReadOnlyError"]

# the flat layout's logger name (esg_memory/serve_core.py): logging configurations keep matching
logger = logging.getLogger("esg_memory.serve_core")


class ReadOnlyError(EsgMemoryError, PermissionError):
    """A write was sent to a service started read-only."""


def _durable_stat(memory: Any, name: str, of_writer: bool = True) -> float:
    d = getattr(memory, "journal", None)  # the memory's esg_memory.persist.Durable, None when not durable
    src = getattr(d, "writer", None) if of_writer else d
    return float(getattr(src, name, 0.0)) if src is not None else 0.0


class EditService:
    """Edits and generation over one `EditedModel`, persisted to ``memory_dir``; see the module docstring."""

    def __init__(self, model: Any, memory_dir: str | Path | None, config: ServiceConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.model = model
        self.config = config or ServiceConfig()
        self.shared = bool(getattr(getattr(model.memory, "journal", None), "shared", False))
        if memory_dir is None and not self.config.read_only and not self.shared:
            raise ConfigError("a writable service needs a memory directory (or a postgresql:// store) "
                              "to persist edits to")
        self.memory_dir = None if memory_dir is None else Path(memory_dir)
        self.metrics = metrics or Metrics()
        self._declare_metrics()
        self._wmutex = threading.Lock()
        self._tuning: dict[int, Future] = {}  # background tuning jobs still running
        self._tuning_lock = threading.Lock()
        self.last_persist_error: str | None = None
        self._store_outage = False  # last_persist_error came from an unreachable shared store
        self._owns_journal = False
        if self.shared:
            self._owns_journal = True  # opened for this service (`serve --store`): closed with it
        elif not self.config.read_only:
            self._make_durable()
        self.started = time.time()
        self._reads = BatchedGenerator(model, self.config, self.metrics)

    def _declare_metrics(self) -> None:
        m = self.metrics
        m.gauge("edits", "Edits currently in the memory.", lambda: float(len(self.model.memory)))
        m.counter("writes_total", "Acknowledged (journaled) writes, by operation.")
        m.histogram("persist_seconds", "Journal append + fsync time of one acknowledged write.")
        m.gauge("journal_bytes", "Bytes in the journal segment in use (reset by each compaction).",
                lambda: _durable_stat(self.model.memory, "bytes_since_rotate"))
        m.gauge("compactions", "Snapshots written by compaction since start.",
                lambda: _durable_stat(self.model.memory, "compactions", of_writer=False))

    # ------------------------------------------------------------------ writes
    def _check_writable(self) -> None:
        if self.config.read_only:
            raise ReadOnlyError("this service is read-only")

    def _make_durable(self) -> None:
        """Journal the model's memory into ``memory_dir/memory`` (resumed if it was loaded from there)."""
        if self.memory_dir is None:  # __init__ refuses a writable service without a directory
            raise ConfigError("a writable service needs a memory directory to persist edits to")
        mem = self.model.memory
        target = (self.memory_dir / "memory").resolve()
        if mem.durable_path is None:
            mem.make_durable(target, JournalConfig(compact_bytes=self.config.compact_bytes))
            self._owns_journal = True
        if mem.durable_path == target:
            self.model.save_meta(self.memory_dir)  # model config + identity beside the memory

    @contextlib.contextmanager
    def _journaled(self, op: str) -> Iterator[dict[str, float]]:
        """Time the journal work of one write (its records are fsynced inside the memory's calls)."""
        out = {"seconds": 0.0}
        j0 = _durable_stat(self.model.memory, "fsync_seconds")
        try:
            yield out
        except OSError as exc:  # the journal could not be written: the write was not applied
            self.last_persist_error = f"{type(exc).__name__}: {exc}"
            # a shared store that is down is watched by the replica's follower: health clears this
            # once the store answers again, instead of waiting for this replica's next write
            self._store_outage = isinstance(exc, StoreUnavailableError)
            raise
        out["seconds"] = _durable_stat(self.model.memory, "fsync_seconds") - j0
        self.last_persist_error = None
        self.metrics.observe("persist_seconds", out["seconds"])
        self.metrics.inc("writes_total", op=op)

    def persist(self) -> float:
        """Write a snapshot now (compaction: the journal already holds every write); returns seconds."""
        t0 = time.perf_counter()
        if self.model.memory.durable_path is not None:
            self.model.memory.compact()
        elif self.memory_dir is not None:
            self.model.save(self.memory_dir)
        return time.perf_counter() - t0

    def _tune_mode(self, tune: str | None) -> str:
        """A request's tune mode (None: the model's default, `EditedModelConfig.tune`); request input: 422."""
        return check_tune_mode(self.model.edit_config.tune if tune is None else tune, error=InvalidInputError)

    def _status(self, eid: int) -> dict[str, Any]:
        """``gives_answer`` and ``tuning`` of the edit's current version (`EditedModel.edit_status`)."""
        try:
            return self.model.edit_status(eid).to_dict()
        except EsgMemoryError:  # deleted meanwhile
            return {"gives_answer": None, "tuning": "none"}

    def _tune(self, eid: int, tune: str) -> dict[str, Any] | None:
        if tune == "never":
            return None
        if tune in ("background", "auto"):  # auto: check the edit's own input, tune only if it fails
            fut = self.model.tune_edit(eid, background=True, if_needed=tune == "auto")
            with self._tuning_lock:
                self._tuning[eid] = fut
            fut.add_done_callback(lambda f, e=eid: self._after_background_tune(e, f))
            return {"mode": tune, "status": "queued"}
        try:
            rep = self.model.tune_edit(eid)
        except EsgMemoryError as exc:  # the edit stays, with its compiled (untuned) adapter
            logger.warning("tuning edit %d failed: %s", eid, exc)
            return {"mode": "sync", "error": f"{type(exc).__name__}: {exc}"}
        return {"mode": "sync", "exact": bool(rep.exact), "steps": int(rep.steps),
                "seconds": round(float(rep.seconds), 3), "loss": finite_or_none(rep.loss)}

    def _after_background_tune(self, eid: int, fut: Future) -> None:
        # the tuned adapter was journaled by the memory's attach before the job ended; a failure was
        # logged and recorded (edit_status: tuning "failed") by the job itself
        try:
            exc = fut.exception()
            if exc is not None:
                logger.debug("background tuning of edit %d failed: %s", eid, exc)
        finally:
            with self._tuning_lock:
                if self._tuning.get(eid) is fut:
                    del self._tuning[eid]

    def add_edit(self, image: Any, question: str, answer: str, positives: Sequence[Any] | None = None,
                 metadata: Mapping[str, Any] | None = None, tune: str | None = None,
                 edit_id: int | None = None, negatives: Sequence[Any] | None = None) -> dict[str, Any]:
        """Add an edit; returns ``{"id", "version", "tune", "persist_seconds", "gives_answer", "tuning"}``
        once it is on disk. ``tune`` (default: the model's, ``"auto"``): see `EditedModel.add_edit`; the
        check and tuning of ``"auto"`` / ``"background"`` run after the reply (`get_edit` tells)."""
        self._check_writable()
        tune = self._tune_mode(tune)
        with self._wmutex, self._journaled("add") as j:
            with self._reads.mutating():
                eid = int(self.model.add_edit(image, question, answer, positives=list(positives or []),
                                              tune="never", metadata=dict(metadata or {}), edit_id=edit_id,
                                              negatives=None if negatives is None else list(negatives)))
            report = self._tune(eid, tune)
        return {"id": eid, "version": self.model.memory.get(eid).version, "tune": report,
                "persist_seconds": round(j["seconds"], 4), **self._status(eid)}

    def add_batch(self, records: Sequence[Any]) -> dict[str, Any]:
        """Add checked `esg_memory.bulk.EditRecord`s at once, all or none, each with its compiled adapter,
        as one journal record; returns ``{"ids", "count", "first_id", "last_id", "adapters",
        "persist_seconds"}`` once they are on disk."""
        from ..bulk import apply_batch

        self._check_writable()
        with self._wmutex, self._journaled("add_batch") as j, self._reads.mutating():
            res = apply_batch(self.model, records)
        return {**res.to_dict(), "persist_seconds": round(j["seconds"], 4)}

    def delete_edit(self, edit_id: int) -> dict[str, Any]:
        self._check_writable()
        with self._wmutex, self._journaled("delete") as j:
            with self._reads.mutating():
                self.model.delete_edit(int(edit_id))
            self._reads.forget(int(edit_id))
        return {"id": int(edit_id), "deleted": True, "persist_seconds": round(j["seconds"], 4)}

    def revise_edit(self, edit_id: int, tune: str | None = None, **changes: Any) -> dict[str, Any]:
        self._check_writable()
        tune = self._tune_mode(tune)
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            raise InvalidInputError("a revision needs at least one of answer, question, image, positives")
        with self._wmutex, self._journaled("revise") as j:
            with self._reads.mutating():
                version = int(self.model.revise_edit(int(edit_id), tune="never", **changes))
            report = self._tune(int(edit_id), tune)
        return {"id": int(edit_id), "version": version, "tune": report,
                "persist_seconds": round(j["seconds"], 4), **self._status(int(edit_id))}

    def rollback(self, edit_id: int, version: int) -> dict[str, Any]:
        self._check_writable()
        with self._wmutex, self._journaled("rollback") as j, self._reads.mutating():
            new = int(self.model.rollback_edit(int(edit_id), version))  # attaches a usable adapter
        return {"id": int(edit_id), "version": new, "rolled_back_to": int(version),
                "persist_seconds": round(j["seconds"], 4)}

    def feedback(self, image: Any, text: str | None, expected_edit_id: int | None) -> dict[str, Any]:
        """`EditMemory.feedback`: the input should route to ``expected_edit_id`` (None: to no edit); scopes
        are re-fitted and the change journaled before this returns."""
        self._check_writable()
        with self._wmutex, self._journaled("feedback") as j, self._reads.mutating():
            out = self.model.memory.feedback(image, text, expected_edit_id)
        return {**out.to_dict(), "persist_seconds": round(j["seconds"], 4)}

    # ------------------------------------------------------------------ reads
    def hits(self, edit_id: int) -> int:
        return self._reads.hits(edit_id)

    def edit_dict(self, edit: Any) -> dict[str, Any]:
        """An edit's fields, its hit count, and its current version's ``gives_answer`` / ``tuning``."""
        d = edit.to_dict()
        d["hits"] = self.hits(edit.id)
        d.update(self._status(edit.id))
        return d

    def list_edits(self, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        if offset < 0 or not 1 <= limit <= 1000:
            raise InvalidInputError("offset must be >= 0 and limit in 1..1000")
        edits = self.model.memory.list()
        return {"total": len(edits), "offset": offset, "limit": limit,
                "edits": [self.edit_dict(e) for e in edits[offset:offset + limit]]}

    def get_edit(self, edit_id: int) -> dict[str, Any]:
        mem = self.model.memory
        d = self.edit_dict(mem.get(int(edit_id)))
        d["history"] = [v.to_dict() for v in mem.history(int(edit_id))]
        rep = getattr(self.model, "tune_reports", {}).get(int(edit_id))
        report = None
        if rep is not None:
            report = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in asdict(rep).items()}
        d["tune_report"] = report  # the latest tuning of this edit in this process (any version)
        return d

    def route(self, rows: Sequence[tuple[Any, str]]) -> list[dict[str, Any]]:
        """Which edit covers each (image, prompt) row, with scores and an explanation."""
        return self._reads.route(rows)

    # ------------------------------------------------------------------ generation
    def submit_generate(self, rows: Sequence[tuple[Any, str]], options: GenerateOptions) -> Future:
        """Queue rows of (PIL image | None, prompt); the future gives one result dict per row."""
        return self._reads.submit(rows, options)

    def generate(self, rows: Sequence[tuple[Any, str]], options: GenerateOptions | None = None,
                 timeout: float | None = None) -> list[dict[str, Any]]:
        fut = self.submit_generate(rows, options or GenerateOptions())
        return fut.result(timeout=self.config.request_timeout_s if timeout is None else timeout)

    def queued(self) -> int:
        return self._reads.queued()

    def health(self) -> dict[str, Any]:
        """Liveness and a summary. A replica of a shared memory adds ``replica`` (`SharedLog.health`):
        ``healthy`` is false when it cannot vouch for having applied every write older than its
        staleness bound (the route answers 503 then, so a load balancer drains it)."""
        replica = self.model.memory.journal.health() if self.shared else None
        if replica is not None and replica["store"] == "ok" and self._store_outage:
            self.last_persist_error, self._store_outage = None, False
        degraded = self.last_persist_error or (replica is not None and replica["store"] != "ok")
        out = {
            "status": "degraded" if degraded else "ok",
            "edits": len(self.model.memory),
            "read_only": self.config.read_only,
            "model_type": getattr(self.model.family, "model_type", None),
            "encoder": getattr(self.model.memory.encoder, "name", None),
            "queued": self.queued(),
            "uptime_s": round(time.time() - self.started, 1),
            "last_persist_error": self.last_persist_error,
        }
        if replica is not None:
            out["replica"] = replica
            if not replica["healthy"]:
                out["status"] = "unhealthy"
        return out

    def close(self) -> None:
        """Finish queued generation and tuning (tuned adapters are journaled), snapshot, then stop."""
        self._reads.close()
        self.model.close()
        mem = self.model.memory
        if self._owns_journal:
            mem.close()  # compaction (JournalConfig.compact_on_close) + the writer lock released
        elif not self.config.read_only and mem.durable_path is not None:
            mem.compact()
