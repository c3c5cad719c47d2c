"""`apply_batch`: checked `EditRecord`s added to a memory as one atomic write (one journal record).

All or nothing. Everything is checked before the first write — the records themselves when they were
read (`esg_memory.bulk.formats`), then against the target: ids already in the memory, and with a model
each statement's tokenisation. The edits then go in through one `EditMemory.add_many`: one planned
write, one `Op`, one record of a durable memory's journal (fsynced once), installed at once — a
concurrent reader sees none of the batch or all of it, and a crash leaves none or all of it.

Given an `EditedModel`, each edit's compiled adapter (what `EditedModel.add_edit` attaches) is made as
its id is assigned and stored by the same write, so a batch of N costs one journal record, not N + 1.
Given a bare `EditMemory`, no adapter is stored (as ``esg-memory add`` without a model): a model
wrapping the memory later compiles them (`EditedModel.wrap`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DuplicateEditError, EsgMemoryError
from .formats import BulkRecordError, EditRecord

__all__ = ["BatchResult", "apply_batch"]

logger = logging.getLogger("esg_memory.bulk")


@dataclass(frozen=True)
class BatchResult:
    """What one applied batch added."""

    ids: list[int]
    adapters: bool
    """Compiled adapters were stored with the edits."""

    @property
    def count(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first_id": self.ids[0] if self.ids else None,
            "last_id": self.ids[-1] if self.ids else None,
            "ids": list(self.ids),
            "adapters": self.adapters,
        }


def _is_model(target: Any) -> bool:
    return hasattr(target, "memory") and hasattr(target, "runtime")


def apply_batch(target: Any, records: Sequence[EditRecord], *, progress: bool = False) -> BatchResult:
    """Add ``records`` to ``target`` (an `EditMemory`, or an `EditedModel`: adapters too) atomically.

    Raises `BulkRecordError` (naming the record) or the memory's typed error, with nothing written.
    ``progress``: a tqdm bar over the edits as they are encoded.
    """
    records = list(records)
    if not records:
        return BatchResult([], False)
    model = target if _is_model(target) else None
    memory = target.memory if model is not None else target
    for r in records:
        if r.edit_id is not None and r.edit_id in memory:
            raise DuplicateEditError(f"{r.where}: edit id {r.edit_id} already exists", edit_id=r.edit_id)
    attachments = None
    if model is not None:
        from ..model import ADAPTER_KIND

        runtime = model.runtime
        for r in records:  # the tokenizer's refusals, before anything is written
            try:
                runtime.statement_ids(r.question, r.answer)
            except EsgMemoryError as e:
                raise BulkRecordError(r.where, str(e)) from None

        def attachments(edit_id: int, question: str, answer: str) -> dict[str, bytes]:
            return {ADAPTER_KIND: runtime.compile(edit_id, 1, question, answer).to_bytes()}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc="adding edits", unit="edit")
    try:
        ids = memory.add_many(
            [r.spec() for r in records],
            attachments=attachments,
            progress=None if bar is None else (lambda: bar.update(1)),
        )
    except DuplicateEditError as e:  # e.g. the id of a deleted edit (ids are never reused)
        where = next((r.where for r in records if e.edit_id is not None and r.edit_id == e.edit_id), None)
        raise DuplicateEditError(f"{where}: {e}" if where else str(e), edit_id=e.edit_id) from None
    finally:
        if bar is not None:
            bar.close()
    logger.info("added %d edits in one write (ids %d..%d)", len(ids), ids[0], ids[-1])
    return BatchResult([int(i) for i in ids], model is not None)
