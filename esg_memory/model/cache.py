"""`AdapterCache`: which adapter each edit version injects in this process, and the one place that decides it.

An edit version's adapter is the one stored in the memory (attachment `ADAPTER_KIND`) when that one is
usable here — readable, made for this model's architecture, for this edit and, for the current
version, for its current statement (a rollback copies the old version's adapter, so the content is
what is checked, not the version number) — and otherwise the compiled one. Decoding and checking run
once per distinct stored bytes; the result is kept in a bounded LRU keyed by (edit, version) and
re-checked against the memory's bytes on every use, so an adapter swapped in through the memory (a
tuned one, a rollback) is seen by the very next call.

Reads and writes are separate entry points, because a read must never write:

* `get` (``generate``, ``forward``, through `EditedModel.adapter`): a missing or unusable stored adapter is
  compiled into this process's cache only — never `memory.attach`-ed, never journaled — so a memory
  opened read-only, or one added to without a model, serves its edits without a write.
* `attach` (`EditedModel.add_edit`, ``revise_edit``, ``rollback_edit``) and `attach_if_missing` (the
  load of a memory into a wrapper): compile and attach the adapter with the write, so readers then
  find it stored.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FormatError, UnknownEditError
from .adapters import ADAPTER_KIND, Adapter, read_metadata
from .runtime import AdapterRuntime

__all__ = ["AdapterCache"]

logger = logging.getLogger("esg_memory.model")  # these messages came from the wrapper before the split


@dataclass(frozen=True)
class _Entry:
    data: bytes | None
    """The memory's stored bytes this entry was made from (None: nothing was stored)."""
    stored: bool
    """``adapter`` is the stored one; False: compiled here (the stored bytes, if any, were unusable)."""
    statement: tuple[str, str] | None
    """(question, answer) a compiled-here adapter states: a re-added edit of the same id must not hit it."""
    adapter: Adapter


class AdapterCache:
    """Adapters by (edit, version) for one `AdapterRuntime`; see the module docstring. Thread-safe."""

    def __init__(self, runtime: AdapterRuntime, size: int):
        self.runtime = runtime
        self.size = int(size)
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    # ---- reads -------------------------------------------------------------------------------------
    def get(self, memory: Any, edit_id: int, version: int | None = None) -> Adapter:
        """The adapter injected for an edit version (default: current). Never writes to the memory.

        `UnknownEditError` for an unknown edit, or for an older version with no usable stored adapter
        (only the current version's statement is known, so only it can be compiled).
        """
        return self._resolve(memory, edit_id, version)[0]

    # ---- writes ------------------------------------------------------------------------------------
    def attach(self, memory: Any, edit_id: int, version: int | None = None) -> Adapter:
        """For a writer: make sure the memory stores a usable adapter for the edit version, compiling
        and attaching one when it does not; returns it. Raises what ``memory.attach`` raises
        (`ConfigError` for a memory opened read-only)."""
        adapter, stored = self._resolve(memory, edit_id, version)
        if not stored:
            data = adapter.to_bytes()
            memory.attach(edit_id, ADAPTER_KIND, data, version=adapter.version)
            self._put((int(edit_id), adapter.version), _Entry(data, True, None, adapter))
        return adapter

    def attach_if_missing(self, memory: Any, edit: Any) -> bool:
        """For loading a memory into a wrapper that can write: `attach` the edit's current version
        when the memory stores no adapter for it, or one whose header names another model or edit.
        Only the header is read (a load of 10k edits stays cheap); what it cannot tell (damaged
        tensors, another statement) is found when the adapter is first read, and compiled then into
        this process's cache. Returns whether it attached."""
        data = memory.attachment(edit.id, ADAPTER_KIND, version=edit.version)
        if data is not None:
            try:
                meta = read_metadata(data)
            except FormatError:
                meta = {}
            if meta.get("model") == self.runtime.fingerprint and meta.get("edit_id") == str(edit.id):
                return False
        self.attach(memory, edit.id, edit.version)
        return True

    def forget(self, edit_id: int) -> None:
        """Drop every cached version of an edit (it was deleted)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == edit_id]:
                del self._entries[key]

    # ---- resolution --------------------------------------------------------------------------------
    def _resolve(self, memory: Any, edit_id: int, version: int | None) -> tuple[Adapter, bool]:
        edit = memory.get(edit_id)
        version = edit.version if version is None else int(version)
        data = memory.attachment(edit_id, ADAPTER_KIND, version=version)
        key = (edit.id, version)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and (hit.data is data or hit.data == data) and (
                hit.stored or hit.statement == (edit.question, edit.answer)
            ):
                self._entries.move_to_end(key)
                return hit.adapter, hit.stored
        adapter = None if data is None else self._decode(data, edit, version)
        stored = adapter is not None
        if adapter is None:
            if version != edit.version:
                raise UnknownEditError(f"edit {edit_id} v{version} is not current and has no usable adapter")
            adapter = self.runtime.compile(edit.id, version, edit.question, edit.answer)
        statement = None if stored else (edit.question, edit.answer)
        self._put(key, _Entry(data, stored, statement, adapter))
        return adapter, stored

    def _decode(self, data: bytes, edit: Any, version: int) -> Adapter | None:
        """The stored adapter if it is usable for this model and edit version, else None (logged)."""
        try:
            adapter = Adapter.from_bytes(data)
        except FormatError as exc:
            logger.warning("edit %d v%d: unreadable adapter (%s); recompiling", edit.id, version, exc)
            return None
        if not self.runtime.compatible(adapter) or adapter.edit_id != edit.id:
            usable = False
        elif version != edit.version:
            usable = adapter.version == version
        else:  # content rather than version equality: a rollback copies the old version's adapter
            usable = torch.equal(adapter.token_ids, self.runtime.statement_ids(edit.question, edit.answer))
        if not usable:
            logger.warning("edit %d v%d: stored adapter is for another model or content; recompiling",
                           edit.id, version)
            return None
        return adapter

    def _put(self, key: tuple[int, int], entry: _Entry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
