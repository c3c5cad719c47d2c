"""Routing and generation over a memory that writes change concurrently: micro-batched, and every row
reports exactly the edit that was injected into it.

Consistency model: writers (the service's add / delete / revise / rollback, serialised by its write
mutex) bracket each change of routing state with `BatchedGenerator.mutating`, which counts it. A
generate batch routes its rows once, generates with exactly those keys, and keeps the result only if
no write could have committed in between in a way that changes its routing
(`BatchedGenerator._consistent`); otherwise it re-runs, the third time under the shared side of an RW
lock that mutations exclude. So generation is not blocked by a write that is still planning, the edit
reported for a row is the edit injected, and an edit whose delete was acknowledged before a request
was queued never fires.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from index import RWLock  # the index's writer-preferring lock serves the service too

from ..config import ServiceConfig
from ..errors import InvalidInputError, UnknownEditError
from .batch import MicroBatcher
from .metrics import Metrics

__all__ = ["BatchedGenerator", "GenerateOptions", "finite_or_none", "token_counts"]


def finite_or_none(x: float) -> float | None:
    """``x`` as a float, or None when it is NaN or infinite (JSON has no such numbers)."""
    x = float(x)
    return x if math.isfinite(x) else None


def token_counts(model: Any, inputs: Mapping[str, Any], sequences: Any) -> list[dict[str, Any]]:
    """Per generated row: ``prompt_tokens`` (the prompt's real tokens, image tokens included, padding
    not), ``completion_tokens`` (new tokens up to and including the first end-of-sequence token) and
    ``finish_reason``: ``"stop"`` when the model ended the answer, ``"length"`` when max_new_tokens did."""
    eos: set[int] = set()
    for src in (getattr(getattr(model, "base_model", model), "generation_config", None),
                getattr(getattr(model, "processor", None), "tokenizer", None)):
        ids = getattr(src, "eos_token_id", None)
        eos.update(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]) if i is not None)
    prompt_len = int(inputs["input_ids"].shape[1])
    mask = inputs.get("attention_mask")
    out = []
    for i, row in enumerate(sequences[:, prompt_len:].tolist()):
        ends = [j for j, t in enumerate(row) if t in eos]
        out.append({"prompt_tokens": int(mask[i].sum()) if mask is not None else prompt_len,
                    "completion_tokens": ends[0] + 1 if ends else len(row),
                    "finish_reason": "stop" if ends else "length"})
    return out


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


class BatchedGenerator:
    """Routes and generates for one `EditedModel` while writers change its memory; see the module docstring.

    Also counts, per edit, the generated rows it was injected into (``hits``).
    """

    def __init__(self, model: Any, config: ServiceConfig, metrics: Metrics) -> None:
        self.model = model
        self.config = config
        self.metrics = metrics
        self._rw = RWLock()
        self._w_started = 0  # routing-state mutations begun / finished (writers are serialised by the caller)
        self._w_done = 0
        self._hits: dict[int, int] = {}
        self._hits_lock = threading.Lock()
        m = metrics
        m.gauge("generate_queue", "Generate requests waiting for the batcher.", lambda: float(self.queued()))
        m.counter("edit_hits_total", "Generated rows that an edit was injected into.")
        m.counter("generate_rows_total", "Generated rows.")
        m.counter("generate_retries_total", "Batches re-run because a write committed while they ran.")
        m.histogram("batch_rows", "Rows per model call.", (1, 2, 4, 8, 16, 32, 64))
        self._batcher = MicroBatcher(
            self._run_batch,
            max_rows=config.max_batch_rows,
            wait_s=config.batch_wait_ms / 1000.0,
            max_queue=config.max_queue,
            on_batch=self._on_batch,
        )

    # ------------------------------------------------------------------ for writers
    @contextlib.contextmanager
    def mutating(self) -> Iterator[None]:
        """Bracket one change of routing state (counted for `_consistent`; excludes locked readers)."""
        with self._rw.write():
            self._w_started += 1
            try:
                yield
            finally:
                self._w_done += 1

    def hits(self, edit_id: int) -> int:
        """Generated rows edit ``edit_id`` was injected into since start."""
        with self._hits_lock:
            return self._hits.get(int(edit_id), 0)

    def forget(self, edit_id: int) -> None:
        """Drop a deleted edit's hit count."""
        with self._hits_lock:
            self._hits.pop(int(edit_id), None)

    # ------------------------------------------------------------------ reads
    def check_rows(self, rows: Sequence[tuple[Any, str]]) -> bool:
        """Refuse malformed (image, prompt) rows; True when every row has an image."""
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
        has_image = self.check_rows(rows)
        ims, texts = ([im for im, _ in rows] if has_image else None), [t for _, t in rows]
        try:
            got = self.model.retrieve(images=ims, prompts=texts)
        except UnknownEditError:  # deleted between routing and reading its answer: retry, excluding writes
            with self._rw.read():
                got = self.model.retrieve(images=ims, prompts=texts)
        return [{"edit_id": r.edit_id if r.edit_id >= 0 else None,
                 "edit_version": r.version if r.edit_id >= 0 else None,
                 "score": finite_or_none(r.score), "threshold": finite_or_none(r.threshold),
                 "margin": finite_or_none(r.margin), "answer": r.answer, "explanation": r.explanation}
                for r in got]

    def submit(self, rows: Sequence[tuple[Any, str]], options: GenerateOptions) -> Future:
        """Queue rows of (PIL image | None, prompt); the future gives one result dict per row."""
        has_image = self.check_rows(rows)
        options.check(self.config.max_new_tokens_limit)
        unique = object() if options.do_sample and options.seed is not None else None
        return self._batcher.submit(_BatchKey(options, has_image, unique), list(rows), rows=len(rows))

    def queued(self) -> int:
        return self._batcher.queued()

    def close(self) -> None:
        """Finish the queued generation, then stop the batcher."""
        self._batcher.close()

    # ------------------------------------------------------------------ the batch
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
        counts = token_counts(self.model, inputs, seq)
        results = []
        hits: dict[int, int] = {}
        for i, text in enumerate(texts):
            eid = int(res.edit_ids[i])
            row: dict[str, Any] = {"text": text, "edit_id": None, "edit_version": None, "edit_answer": None,
                                   "score": finite_or_none(res.scores[i]),
                                   "margin": finite_or_none(res.margins[i]), **counts[i]}
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
