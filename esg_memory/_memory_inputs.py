"""Validating user arguments of `EditMemory` writes (internals)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ._memory_state import EditState
from .errors import DuplicateEditError, ImageError, InvalidInputError, UnknownEditError
from .images import LoadedImage, load_image
from .types import Positive
from .validate import check_text, normalize_image_arg

__all__ = ["MAX_ID", "MAX_METADATA_CHARS", "InputsMixin"]

MAX_ID = 2**63 - 2
#: Largest edit metadata accepted, as JSON text: it is stored in memory.json and every journal record.
MAX_METADATA_CHARS = 1 << 20


class InputsMixin:
    """Argument checks shared by the writes of `EditMemory` (uses ``_edits``, ``_blobs``, ``_retired``)."""

    def _state(self, eid: Any) -> EditState:
        if isinstance(eid, bool) or not isinstance(eid, (int, np.integer)):
            raise InvalidInputError(f"an edit id must be an int, not {type(eid).__name__}")
        st = self._edits.get(int(eid))
        if st is None:
            raise UnknownEditError(f"no edit with id {int(eid)}")
        return st

    def _positives(self, positives: Any, blobs: dict[str, bytes]) -> list[Positive]:
        if positives is None:
            return []
        if isinstance(positives, (str, bytes, Mapping)) or not isinstance(positives, Iterable):
            raise InvalidInputError("positives must be a list of texts or (image, text|None) pairs")
        out = []
        for j, p in enumerate(positives):
            if isinstance(p, str):
                out.append(Positive(text=check_text(p, f"positives[{j}]")))
            elif isinstance(p, Positive):
                if p.image is not None and p.image not in self._blobs and p.image not in blobs:
                    raise ImageError(f"positives[{j}] names an image sha256 not stored in this memory")
                text = None if p.text is None else check_text(p.text, f"positives[{j}].text")
                if text is None and p.image is None:
                    raise InvalidInputError(f"positives[{j}] has neither image nor text")
                out.append(Positive(text=text, image=p.image))
            elif isinstance(p, (tuple, list)) and len(p) == 2:
                img, txt = p
                txt = None if txt is None else check_text(txt, f"positives[{j}] text")
                sha = None
                if img is not None:
                    li = load_image(normalize_image_arg(img))
                    blobs[li.sha256] = li.data
                    sha = li.sha256
                if sha is None and txt is None:
                    raise InvalidInputError(f"positives[{j}] has neither image nor text")
                out.append(Positive(text=txt, image=sha))
            else:
                raise InvalidInputError(f"positives[{j}] must be a text or an (image, text|None) pair")
        return out

    def _image(self, image: Any, blobs: dict[str, bytes]) -> str | None:
        if image is None:
            return None
        li: LoadedImage = load_image(normalize_image_arg(image))
        blobs[li.sha256] = li.data
        return li.sha256

    def _new_id(self, edit_id: Any, taken: set[int]) -> int:
        if edit_id is None:
            eid = self._next_id
            while eid in self._edits or eid in self._retired or eid in taken:
                eid += 1
            return eid
        if isinstance(edit_id, bool) or not isinstance(edit_id, (int, np.integer)):
            raise InvalidInputError(f"edit_id must be an int, not {type(edit_id).__name__}")
        eid = int(edit_id)
        if not 0 <= eid <= MAX_ID:
            raise InvalidInputError(f"edit_id must be in [0, {MAX_ID}], got {eid}")
        if eid in self._edits or eid in taken:
            raise DuplicateEditError(f"edit id {eid} already exists")
        if eid in self._retired:
            raise DuplicateEditError(f"edit id {eid} belonged to a deleted edit; ids are never reused")
        return eid

    @staticmethod
    def _metadata(metadata: Any) -> dict[str, Any]:
        if metadata is None:
            return {}
        if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
            raise InvalidInputError("metadata must be a dict with string keys")
        try:
            text = json.dumps(dict(metadata), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"metadata must be JSON-serialisable: {e}") from None
        except RecursionError:
            raise InvalidInputError("metadata is nested too deeply") from None
        if len(text) > MAX_METADATA_CHARS:
            raise InvalidInputError(
                f"metadata is {len(text)} characters as JSON; the limit is {MAX_METADATA_CHARS}"
            )
        try:
            return json.loads(text)
        except RecursionError:  # dumps can go deeper than loads
            raise InvalidInputError("metadata is nested too deeply") from None
