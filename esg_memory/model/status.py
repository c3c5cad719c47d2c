"""What is known of one edit version's adapter: does the model give the edit's answer, and is it tuned.

`EditStatus` is what `EditedModel.edit_status` returns and what the service's replies carry
(``"gives_answer"``, ``"tuning"``). It is kept per (edit id, version) in this process (`StatusBook`): a
revision starts a new version with nothing known, a delete forgets the edit. Nothing of it is stored
in the memory; after a reload (or in another process) the status of a version with no entry here is
read off its stored adapter's header (`derived_status`): a tuned adapter is ``tuning="done"``, and
``gives_answer=True`` when its tuning reached an exact match (every tuning example, the edit's own
input first, greedily yields the answer with `AdapterConfig.margin` to spare), else None (unknown
until `EditedModel.check_edit` runs).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from ..errors import FormatError
from .adapters import read_metadata

__all__ = ["TUNING_STATES", "EditStatus", "StatusBook", "TuningState", "derived_status"]

TuningState = Literal["none", "pending", "done", "failed"]
"""``none``: the version's adapter is the compiled one and no tuning is queued; ``pending``: a check or
tuning job for it is queued or running; ``done``: it was tuned; ``failed``: its tuning raised (logged;
the edit keeps its compiled adapter)."""
TUNING_STATES: tuple[str, ...] = get_args(TuningState)


@dataclass(frozen=True)
class EditStatus:
    """One edit version's status (see the module docstring)."""

    edit_id: int
    version: int
    gives_answer: bool | None = None
    """The edited model's greedy answer to the edit's own (image, question) is the edit's answer; None:
    not checked (``tune="never"``), or the check is still pending."""
    tuning: TuningState = "none"
    error: str | None = None
    """Why tuning failed (``tuning == "failed"``)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields the service's replies and ``esg-memory add/show`` carry."""
        out: dict[str, Any] = {"gives_answer": self.gives_answer, "tuning": self.tuning}
        if self.error is not None:
            out["tuning_error"] = self.error
        return out


def derived_status(edit_id: int, version: int, adapter_bytes: bytes | None) -> EditStatus:
    """The status a version's stored adapter tells (its header only: cheap at any memory size)."""
    if adapter_bytes is None:
        return EditStatus(int(edit_id), int(version))
    try:
        meta = read_metadata(adapter_bytes)
    except FormatError:
        return EditStatus(int(edit_id), int(version))
    if meta.get("kind") in (None, "compiled"):
        return EditStatus(int(edit_id), int(version))
    return EditStatus(int(edit_id), int(version), True if meta.get("exact") == "1" else None, "done")


class StatusBook:
    """Thread-safe `EditStatus` per edit, for its latest recorded version."""

    def __init__(self) -> None:
        self._d: dict[int, EditStatus] = {}
        self._lock = threading.Lock()

    def get(self, edit_id: int, version: int) -> EditStatus | None:
        with self._lock:
            st = self._d.get(int(edit_id))
        return st if st is not None and st.version == int(version) else None

    def update(
        self, edit_id: int, version: int, base: EditStatus | None = None, **changes: Any
    ) -> EditStatus:
        """Set fields of the version's status (started from ``base``, else the recorded one, else empty);
        an entry for an older version is replaced."""
        key, version = int(edit_id), int(version)
        with self._lock:
            st = self._d.get(key)
            if st is None or st.version != version:
                st = base if base is not None else EditStatus(key, version)
            st = replace(st, **changes)
            self._d[key] = st
        return st

    def forget(self, edit_id: int) -> None:
        with self._lock:
            self._d.pop(int(edit_id), None)
