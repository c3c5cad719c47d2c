"""`EditService`: the transport-free core of ``esg-memory serve`` (usable in-process, e.g. by benchmarks).

Consistency model:

- Writers (add / delete / revise / rollback) are serialised by one mutex; each change of routing
  state is bracketed by counters (`EditService._mutating`). A generate batch routes its rows once,
  generates with exactly those keys, and keeps the result only if no write could have committed
  in between in a way that changes its routing (`EditService._consistent`); otherwise it re-runs,
  the third time under the shared side of an RW lock that mutations exclude. So generation is
  not blocked by a write that is still planning, the edit reported for a row is the edit
  injected, and an edit whose delete was acknowledged before a request was queued never fires.
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
import math
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, EsgMemoryError, InvalidInputError, UnknownEditError
from .serve_batch import MicroBatcher, RWLock
from .serve_metrics import Metrics

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MIN_TOKEN_CHARS",
    "TOKEN_ENV",
    "EditService",
    "GenerateOptions",
    "ReadOnlyError",
    "ServiceConfig",
]

logger = logging.getLogger(__name__)

#: Environment variable the bearer token is read from (unless a token file is given).
TOKEN_ENV = "ESG_MEMORY_TOKEN"
#: Request bodies above this are refused with 413 before they are read.
DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024
#: Shorter tokens are refused at start: a guessable token is no protection.
MIN_TOKEN_CHARS = 16

TUNE_MODES = ("never", "sync", "background")


class ReadOnlyError(EsgMemoryError, PermissionError):
    """A write was sent to a service started read-only."""


@dataclass
class ServiceConfig:
    """Limits and batching of the service."""

    max_batch_rows: int = 16
    """At most this many rows (prompts) decoded in one model call."""
    batch_wait_ms: float = 3.0
    """How long the first request of a batch waits for others with the same options."""
    max_queue: int = 256
    """Queued generate requests beyond this are refused (HTTP 503) instead of growing latency."""
    max_rows_per_request: int = 16
    """Prompts one /generate or /route request may carry."""
    max_new_tokens_limit: int = 256
    """Upper bound a client may ask for."""
    max_prompt_chars: int = 4000
    """Longest prompt accepted."""
    request_timeout_s: float = 300.0
    """A generate request waiting longer than this fails with HTTP 504."""
    read_only: bool = False
    """Refuse every write (no token needed, nothing persisted)."""
    compact_bytes: int = 64 * 2**20
    """Journal size that triggers a background snapshot (compaction); 0 = only at shutdown."""

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1 or self.max_queue < 1 or self.max_rows_per_request < 1:
            raise ConfigError("max_batch_rows, max_queue and max_rows_per_request must be >= 1")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0 or self.max_new_tokens_limit < 1:
            raise ConfigError("batch_wait_ms >= 0, request_timeout_s > 0, max_new_tokens_limit >= 1 required")


@dataclass(frozen=True)
class GenerateOptions:
    """Decoding options of one request; requests with equal options can share a batch."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def check(self, limit: int) -> GenerateOptions:
        if isinstance(self.max_new_tokens, bool) or not 1 <= int(self.max_new_tokens) <= limit:
            raise InvalidInputError(f"max_new_tokens must be in 1..{limit}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InvalidInputError("temperature must be a finite number > 0")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidInputError("top_p must be in (0, 1]")
        if self.seed is not None and not 0 <= int(self.seed) < 2**63:
            raise InvalidInputError("seed must be in 0..2**63-1")
        return self

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens), "do_sample": bool(self.do_sample)}
        if self.do_sample:  # greedy decoding ignores them and transformers warns when they are passed
            out.update(temperature=float(self.temperature), top_p=float(self.top_p))
        return out


@dataclass(frozen=True)
class _BatchKey:
    options: GenerateOptions
    has_image: bool
    unique: object | None = None  # seeded sampling runs alone: its output must not depend on neighbours


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class EditService:
    """Edits and generation over one `EditedModel`, persisted to ``memory_dir``; see the module docstring."""

    def __init__(self, model: Any, memory_dir: str | Path | None, config: ServiceConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.model = model
        self.config = config or ServiceConfig()
        if memory_dir is None and not self.config.read_only:
            raise ConfigError("a writable service needs a memory directory to persist edits to")
        self.memory_dir = None if memory_dir is None else Path(memory_dir)
        self.metrics = metrics or Metrics()
        self._declare_metrics()
        self._wmutex = threading.Lock()
        self._rw = RWLock()
        self._w_started = 0  # routing-state mutations begun / finished (writers hold _wmutex)
        self._w_done = 0
        self._hits: dict[int, int] = {}
        self._hits_lock = threading.Lock()
        self._tuning: dict[int, Future] = {}  # background tuning jobs still running
        self.last_persist_error: str | None = None
        self._owns_journal = False
        if not self.config.read_only:
            self._make_durable()
        self.started = time.time()
        self._batcher = MicroBatcher(
            self._run_batch,
            max_rows=self.config.max_batch_rows,
            wait_s=self.config.batch_wait_ms / 1000.0,
            max_queue=self.config.max_queue,
            on_batch=self._on_batch,
        )

    def _declare_metrics(self) -> None:
        m = self.metrics
        m.gauge("edits", "Edits currently in the memory.", lambda: float(len(self.model.memory)))
        m.gauge("generate_queue", "Generate requests waiting for the batcher.", lambda: float(self.queued()))
        m.counter("edit_hits_total", "Generated rows that an edit was injected into.")
        m.counter("generate_rows_total", "Generated rows.")
        m.counter("writes_total", "Acknowledged (journaled) writes, by operation.")
        m.counter("generate_retries_total", "Batches re-run because a write committed while they ran.")
        m.histogram("batch_rows", "Rows per model call.", (1, 2, 4, 8, 16, 32, 64))
        m.histogram("persist_seconds", "Journal append + fsync time of one acknowledged write.")
        m.gauge("journal_bytes", "Bytes in the journal segment in use (reset by each compaction).",
                lambda: float(self._journal_stat("bytes_since_rotate")))
        m.gauge("compactions", "Snapshots written by compaction since start.",
                lambda: float(getattr(self.model.memory._durable, "compactions", 0)))

    # ------------------------------------------------------------------ writes
    def _check_writable(self) -> None:
        if self.config.read_only:
            raise ReadOnlyError("this service is read-only")

    def _make_durable(self) -> None:
        """Journal the model's memory into ``memory_dir/memory`` (resumed if it was loaded from there)."""
        from .config import JournalConfig

        assert self.memory_dir is not None
        mem = self.model.memory
        target = (self.memory_dir / "memory").resolve()
        if mem.durable_path is None:
            mem.make_durable(target, JournalConfig(compact_bytes=self.config.compact_bytes))
            self._owns_journal = True
        if mem.durable_path == target:
            self.model._save_meta(self.memory_dir)  # model config + identity beside the memory

    def _journal_stat(self, name: str) -> float:
        d = getattr(self.model.memory, "_durable", None)
        w = getattr(d, "writer", None)
        return float(getattr(w, name, 0.0)) if w is not None else 0.0

    @contextlib.contextmanager
    def _journaled(self, op: str) -> Iterator[dict[str, float]]:
        """Time the journal work of one write (its records are fsynced inside the memory's calls)."""
        out = {"seconds": 0.0}
        j0 = self._journal_stat("fsync_seconds")
        try:
            yield out
        except OSError as exc:  # the journal could not be written: the write was not applied
            self.last_persist_error = f"{type(exc).__name__}: {exc}"
            raise
        out["seconds"] = self._journal_stat("fsync_seconds") - j0
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

    def _tune(self, eid: int, tune: str) -> dict[str, Any] | None:
        if tune == "never":
            return None
        if tune == "background":
            fut = self.model.tune_edit(eid, background=True)
            with self._hits_lock:
                self._tuning[eid] = fut
            fut.add_done_callback(lambda f, e=eid: self._after_background_tune(e, f))
            return {"mode": "background", "status": "queued"}
        try:
            rep = self.model.tune_edit(eid)
        except EsgMemoryError as exc:  # the edit stays, with its compiled (untuned) adapter
            logger.warning("tuning edit %d failed: %s", eid, exc)
            return {"mode": "sync", "error": f"{type(exc).__name__}: {exc}"}
        return {"mode": "sync", "exact": bool(rep.exact), "steps": int(rep.steps),
                "seconds": round(float(rep.seconds), 3), "loss": _finite(rep.loss)}

    def _after_background_tune(self, eid: int, fut: Future) -> None:
        # the tuned adapter was journaled by the memory's attach before the job ended
        try:
            exc = fut.exception()
            if exc is not None:
                logger.warning("background tuning of edit %d failed: %s", eid, exc)
        finally:
            with self._hits_lock:
                if self._tuning.get(eid) is fut:
                    del self._tuning[eid]

    def add_edit(self, image: Any, question: str, answer: str, positives: Sequence[Any] | None = None,
                 metadata: Mapping[str, Any] | None = None, tune: str = "never",
                 edit_id: int | None = None) -> dict[str, Any]:
        """Add an edit; returns ``{"id", "version", "tune", "persist_seconds"}`` once it is on disk."""
        self._check_writable()
        if tune not in TUNE_MODES:
            raise InvalidInputError(f"tune must be one of {', '.join(TUNE_MODES)}, not {tune!r}")
        with self._wmutex, self._journaled("add") as j:
            with self._mutating():
                eid = int(self.model.add_edit(image, question, answer, positives=list(positives or []),
                                              tune="never", metadata=dict(metadata or {}), edit_id=edit_id))
            report = self._tune(eid, tune)
        return {"id": eid, "version": self.model.memory.get(eid).version, "tune": report,
                "persist_seconds": round(j["seconds"], 4)}

    def delete_edit(self, edit_id: int) -> dict[str, Any]:
        self._check_writable()
        with self._wmutex, self._journaled("delete") as j:
            with self._mutating():
                self.model.delete_edit(int(edit_id))
            with self._hits_lock:
                self._hits.pop(int(edit_id), None)
        return {"id": int(edit_id), "deleted": True, "persist_seconds": round(j["seconds"], 4)}

    def revise_edit(self, edit_id: int, tune: str = "never", **changes: Any) -> dict[str, Any]:
        self._check_writable()
        if tune not in TUNE_MODES:
            raise InvalidInputError(f"tune must be one of {', '.join(TUNE_MODES)}, not {tune!r}")
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            raise InvalidInputError("a revision needs at least one of answer, question, image, positives")
        with self._wmutex, self._journaled("revise") as j:
            with self._mutating():
                version = int(self.model.revise_edit(int(edit_id), tune="never", **changes))
            report = self._tune(int(edit_id), tune)
        return {"id": int(edit_id), "version": version, "tune": report,
                "persist_seconds": round(j["seconds"], 4)}

    def rollback(self, edit_id: int, version: int) -> dict[str, Any]:
        self._check_writable()
        with self._wmutex, self._journaled("rollback") as j, self._mutating():
            new = int(self.model.memory.rollback(int(edit_id), version))
            self.model.adapter(int(edit_id))  # warm (and validate) the restored adapter now
        return {"id": int(edit_id), "version": new, "rolled_back_to": int(version),
                "persist_seconds": round(j["seconds"], 4)}

    # ------------------------------------------------------------------ reads
    def hits(self, edit_id: int) -> int:
        with self._hits_lock:
            return self._hits.get(int(edit_id), 0)

    def edit_dict(self, edit: Any) -> dict[str, Any]:
        d = edit.to_dict()
        d["hits"] = self.hits(edit.id)
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
        with self._hits_lock:
            pending = int(edit_id) in self._tuning
        rep = getattr(self.model, "tune_reports", {}).get(int(edit_id))
        report = None
        if rep is not None:
            report = {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(rep).items()}
        d["tuning"] = {"pending": pending, "report": report}
        return d

    def _check_rows(self, rows: Sequence[tuple[Any, str]]) -> bool:
        if not rows:
            raise InvalidInputError("at least one prompt is needed")
        if len(rows) > self.config.max_rows_per_request:
            raise InvalidInputError(f"at most {self.config.max_rows_per_request} prompts per request")
        for i, (_, text) in enumerate(rows):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"prompt {i} must be a non-empty string")
            if len(text) > self.config.max_prompt_chars:
                raise InvalidInputError(f"prompt {i} is over {self.config.max_prompt_chars} characters")
        with_image = [im is not None for im, _ in rows]
        if any(with_image) and not all(with_image):
            raise InvalidInputError("either every prompt has an image or none has")
        return all(with_image)

    def route(self, rows: Sequence[tuple[Any, str]]) -> list[dict[str, Any]]:
        """Which edit covers each (image, prompt) row, with scores and an explanation."""
        has_image = self._check_rows(rows)
        ims, texts = ([im for im, _ in rows] if has_image else None), [t for _, t in rows]
        try:
            got = self.model.retrieve(images=ims, prompts=texts)
        except UnknownEditError:  # deleted between routing and reading its answer: retry, excluding writes
            with self._rw.read():
                got = self.model.retrieve(images=ims, prompts=texts)
        return [{"edit_id": r.edit_id if r.edit_id >= 0 else None,
                 "edit_version": r.version if r.edit_id >= 0 else None,
                 "score": _finite(r.score), "threshold": _finite(r.threshold), "margin": _finite(r.margin),
                 "answer": r.answer, "explanation": r.explanation} for r in got]

    # ------------------------------------------------------------------ generation
    def submit_generate(self, rows: Sequence[tuple[Any, str]], options: GenerateOptions) -> Future:
        """Queue rows of (PIL image | None, prompt); the future gives one result dict per row."""
        has_image = self._check_rows(rows)
        options.check(self.config.max_new_tokens_limit)
        unique = object() if options.do_sample and options.seed is not None else None
        return self._batcher.submit(_BatchKey(options, has_image, unique), list(rows), rows=len(rows))

    def generate(self, rows: Sequence[tuple[Any, str]], options: GenerateOptions | None = None,
                 timeout: float | None = None) -> list[dict[str, Any]]:
        fut = self.submit_generate(rows, options or GenerateOptions())
        return fut.result(timeout=self.config.request_timeout_s if timeout is None else timeout)

    def queued(self) -> int:
        return self._batcher.queued()

    def _on_batch(self, jobs: int, rows: int) -> None:
        self.metrics.observe("batch_rows", rows)

    def _run_batch(self, key: Hashable, payloads: Sequence[list[tuple[Any, str]]]) -> list[list[dict]]:
        if not isinstance(key, _BatchKey):
            raise TypeError(f"unexpected batch key {key!r}")
        rows = [r for p in payloads for r in p]
        images = [im for im, _ in rows] if key.has_image else None
        prompts = [t for _, t in rows]
        inputs = self.model.build_inputs(images, prompts)
        # Optimistic first: no lock, so generation goes on while a write plans and commits; the
        # attempt counts only if it provably saw one consistent state (see `_consistent`). The
        # last attempt holds the shared lock, which writers' commits exclude: progress is certain.
        for attempt in range(3):
            locked = attempt == 2
            with self._rw.read() if locked else contextlib.nullcontext():
                done_before = self._w_done
                got = self._generate_once(key, images, prompts, inputs)
                if got is not None and (locked or self._consistent(done_before, got[0])):
                    break
            self.metrics.inc("generate_retries_total")
        if got is None:  # only possible if the memory broke its own invariants
            raise RuntimeError("routing and generation disagreed under the shared lock")
        res, info, out = got
        seq = out.sequences if hasattr(out, "sequences") else out
        texts = self.model.family.decode_answers(self.model.processor, seq, inputs["input_ids"].shape[1])
        results = []
        hits: dict[int, int] = {}
        for i, text in enumerate(texts):
            eid = int(res.edit_ids[i])
            row: dict[str, Any] = {"text": text, "edit_id": None, "edit_version": None, "edit_answer": None,
                                   "score": _finite(res.scores[i]), "margin": _finite(res.margins[i])}
            if eid >= 0:
                row.update(edit_id=eid, edit_version=info[eid][0], edit_answer=info[eid][1])
                hits[eid] = hits.get(eid, 0) + 1
            results.append(row)
        self.metrics.inc("generate_rows_total", len(rows))
        if hits:
            self.metrics.inc("edit_hits_total", sum(hits.values()))
            with self._hits_lock:
                for eid, n in hits.items():
                    self._hits[eid] = self._hits.get(eid, 0) + n
        out_rows, start = [], 0
        for p in payloads:
            out_rows.append(results[start:start + len(p)])
            start += len(p)
        return out_rows

    def _generate_once(self, key: _BatchKey, images: Any, prompts: list[str],
                       inputs: dict[str, Any]) -> tuple[Any, dict[int, tuple[int, str]], Any] | None:
        """Route once, then generate with exactly those keys; None if an edit vanished meanwhile."""
        import torch

        mem = self.model.memory
        res = mem.route(images=images, texts=prompts)
        info: dict[int, tuple[int, str]] = {}
        try:
            for i in range(len(res)):
                eid = int(res.edit_ids[i])
                if eid >= 0 and eid not in info:
                    version = int(res.versions[i])
                    hist = [v for v in mem.history(eid) if v.version == version]
                    if not hist:
                        return None
                    info[eid] = (version, hist[0].answer)
        except UnknownEditError:
            return None
        if key.options.seed is not None:
            torch.manual_seed(int(key.options.seed))
        with torch.no_grad():
            out = self.model.generate(**inputs, route_keys=res.keys, **key.options.kwargs())
        return res, info, out

    def _consistent(self, done_before: int, res: Any) -> bool:
        """Whether the routing reported (``res``) is the one the model injected.

        ``generate`` re-routes the same keys internally, between our routing and this check. With
        no write overlapping that window, both saw the same state. With exactly one (one commit),
        each of the three routings saw the state before or after it, in time order; if ours
        equals a fresh one taken now, the one in between equals them too. Otherwise: retry.
        """
        overlapping = self._w_started - done_before
        if overlapping == 0:
            return True
        if overlapping > 1:
            return False
        now = self.model.memory.route(keys=res.keys)
        return bool((now.edit_ids == res.edit_ids).all() and (now.versions == res.versions).all())

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Bracket one change of routing state (counted for `_consistent`; excludes locked readers)."""
        with self._rw.write():
            self._w_started += 1
            try:
                yield
            finally:
                self._w_done += 1

    def health(self) -> dict[str, Any]:
        return {
            "status": "degraded" if self.last_persist_error else "ok",
            "edits": len(self.model.memory),
            "read_only": self.config.read_only,
            "model_type": getattr(self.model.family, "model_type", None),
            "encoder": getattr(self.model.memory.encoder, "name", None),
            "queued": self.queued(),
            "uptime_s": round(time.time() - self.started, 1),
            "last_persist_error": self.last_persist_error,
        }

    def close(self) -> None:
        """Finish queued generation and tuning (tuned adapters are journaled), snapshot, then stop."""
        self._batcher.close()
        self.model.close()
        mem = self.model.memory
        if self._owns_journal:
            mem.close()  # compaction (JournalConfig.compact_on_close) + the writer lock released
        elif not self.config.read_only and mem.durable_path is not None:
            mem.compact()
