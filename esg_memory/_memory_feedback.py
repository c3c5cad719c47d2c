"""Feedback and per-version attachments of an `EditMemory` (internals, mixed into the class)."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace

import numpy as np

from ._memory_state import EditState
from .errors import InvalidInputError, VersionError
from .images import ImageLike
from .types import FeedbackOutcome, FeedbackProbe
from .validate import check_text

__all__ = ["FeedbackMixin"]

logger = logging.getLogger("esg_memory.memory")

_ATTACH_KINDS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class FeedbackMixin:
    """`feedback`, `attach` and `attachment` of `EditMemory`."""

    def feedback(
        self, image: ImageLike | None, text: str | None, expected_edit_id: int | None
    ) -> FeedbackOutcome:
        """Correct scopes from one observed input: it should route to ``expected_edit_id`` (or nowhere).

        Every other edit whose scope holds the input gets it as a negative (its thresholds tighten);
        if the expected edit misses it, it becomes a positive of that edit, which the re-fit adds as
        a key only when no negative falls inside the new ball.
        """
        with self._wlock:
            self._settle_locked()
            if expected_edit_id is not None:
                self._state(expected_edit_id)
            blobs: dict[str, bytes] = {}
            sha = self._image(image, blobs)
            txt = None if text is None else check_text(text, "text")
            if sha is None and txt is None:
                raise InvalidInputError("feedback needs an image, a text, or both")
            key = self._encode([self._blob(sha, blobs)], [txt])
            before, inside = self._route_keys(key, want_all=True)
            routed_before = int(before.edit_ids[0])
            in_scope = inside[0]
            exp = None if expected_edit_id is None else int(expected_edit_id)
            actions: list[str] = []
            plan = self._plan(blobs)
            affected: set[int] = set()
            now = time.time()
            for eid in sorted(e for e in in_scope if e != exp):
                st = self._edits[eid]
                probe = FeedbackProbe(kind="negative", text=txt, image=sha, created_at=now)
                v = replace(st.current, feedback=[*st.current.feedback, probe])
                new = replace(
                    st, versions=(*st.versions[:-1], v), updated_at=now, vec=self._encode_version(v, blobs)
                )
                affected |= plan.set_vectors(new, self._table.view())
                actions.append(f"edit {eid}: false activation, input added as a negative")
            if exp is not None and exp not in in_scope:
                st = self._edits[exp]
                probe = FeedbackProbe(kind="positive", text=txt, image=sha, created_at=now)
                v = replace(st.current, feedback=[*st.current.feedback, probe])
                new = replace(
                    st, versions=(*st.versions[:-1], v), updated_at=now, vec=self._encode_version(v, blobs)
                )
                affected |= plan.set_vectors(new, self._table.view())
                actions.append(f"edit {exp}: missed input added as a positive")
            if not actions:
                return FeedbackOutcome(routed_before, routed_before, ["already routed as expected"], [], True)
            refit = plan.refit_all(affected)
            op = {"op": "feedback", "time": now, "image": sha, "text": txt, "expected_edit_id": exp}
            self._commit(plan, blobs, op=op)
            after = int(self._route_keys(key)[0].edit_ids[0])
            resolved = after == (-1 if exp is None else exp)
            logger.info("feedback: %s; re-fitted %s; resolved=%s", actions, refit, resolved)
            return FeedbackOutcome(routed_before, after, actions, refit, resolved)

    # ------------------------------------------------------------------ attachments
    def attach(self, edit_id: int, kind: str, data: bytes, version: int | None = None) -> None:
        """Store opaque bytes (e.g. a serialised adapter) for one version of an edit."""
        with self._wlock:
            self._settle_locked()
            st = self._state(edit_id)
            if not isinstance(kind, str) or not 0 < len(kind) <= 64 or not set(kind) <= _ATTACH_KINDS:
                raise InvalidInputError("attachment kind must be 1-64 characters of [A-Za-z0-9_.-]")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidInputError(f"attachment data must be bytes, not {type(data).__name__}")
            ver = self._version_of(st, version)
            data = bytes(data)
            op = {
                "op": "attach",
                "edit_id": st.id,
                "kind": kind,
                "version": ver,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            # journaled (and fsynced) under the writer lock only: routing never waits for the disk
            self._log_write(op, {op["sha256"]: data}, attachment=data)
            with self._lock:
                self._attachments[(st.id, ver, kind)] = data

    def attachment(self, edit_id: int, kind: str, version: int | None = None) -> bytes | None:
        with self._lock:
            st = self._state(edit_id)
            return self._attachments.get((st.id, self._version_of(st, version), kind))

    @staticmethod
    def _version_of(st: EditState, version: int | None) -> int:
        if version is None:
            return st.current.version
        if (
            isinstance(version, bool)
            or not isinstance(version, (int, np.integer))
            or not 1 <= int(version) <= st.current.version
        ):
            raise VersionError(f"edit {st.id} has no version {version!r}")
        return int(version)
