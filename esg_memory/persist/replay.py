"""Replay: journal records (decoded, aborts removed) turned into the one `Change` they made together.

Records are *physical redo* records (`esg_memory.persist.journal`): each holds the new states of
the edits its write created or re-fitted. A run of writes re-fits the same neighbours again and
again, so replay keeps each edit's *last* recorded state only and decodes it once. The bookkeeping
that depends on order (next id, retired ids, attachments set / copied to a new version / dropped
with their edit, deferred deletes and their settling) is derived record by record from each
record's `Op` with `esg_memory.memory.ops.effects_of` — the same function a live write uses — and
composed in order. The result is installed by `EditMemory.from_snapshot` exactly like a live write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import FormatError
from ..memory.ops import Attach, Change, Effects, effects_of, op_from_dict
from ..memory.state import EditState
from .snapshot import checked_bytes, edit_from_doc, tensor_reader

__all__ = ["replay"]

Record = tuple[int, dict[str, Any], dict[str, np.ndarray]]


def replay(base: Mapping[int, EditState], dim: int, records: list[Record]) -> Change:
    """The change ``records`` (in lsn order) make to a memory holding ``base`` (its snapshot's states).

    `FormatError` for records that do not fit together or with ``base``.
    """
    try:
        return _replay(base, dim, records)
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        lsn = records[-1][0] if records else 0
        raise FormatError(f"journal records up to {lsn} are inconsistent: {type(e).__name__}: {e}") from None


def _replay(base: Mapping[int, EditState], dim: int, records: list[Record]) -> Change:
    final: dict[int, tuple[int, dict, dict] | None] = {}
    with_vec: dict[int, tuple[int, dict, dict]] = {}  # last recorded vectors per edit
    versions: dict[int, int | None] = {}  # current version per edit as of the record being replayed
    blobs: dict[str, bytes] = {}
    effects = Effects()

    def version_of(eid: int) -> int | None:
        if eid in versions:
            return versions[eid]
        st = base.get(eid)
        return None if st is None else st.current.version

    for lsn, doc, tensors in records:
        op = op_from_dict(doc["op"], f"journal record {lsn}")
        if doc["kind"] == "attach":
            if not isinstance(op, Attach):
                raise FormatError(f"journal record {lsn}: an attach record holds a {type(op).__name__}")
            cur = version_of(op.edit_id)
            if cur is None or not 1 <= op.version <= cur:
                raise FormatError(
                    f"journal record {lsn}: attachment for unknown edit/version {op.edit_id}/{op.version}"
                )
            data = tensors["attachment"].tobytes()
            if hashlib.sha256(data).hexdigest() != op.sha256:
                raise FormatError(f"journal record {lsn}: attachment fails its checksum")
            effects = effects.then(effects_of(op, data))
            continue
        if isinstance(op, Attach):
            raise FormatError(f"journal record {lsn}: unknown operation 'attach' in a commit record")
        for e in doc["states"]:
            eid = int(e["id"])
            final[eid] = (lsn, e, tensors)
            if "cand_labels" in e:
                with_vec[eid] = (lsn, e, tensors)
            elif version_of(eid) is None:
                raise FormatError(f"journal record {lsn}: re-fits edit {eid}, which does not exist")
            versions[eid] = len(e["versions"])
        for eid in (int(x) for x in doc["deleted"]):
            if version_of(eid) is None:
                raise FormatError(f"journal record {lsn}: deletes unknown edit {eid}")
            final[eid] = None
            with_vec.pop(eid, None)
            versions[eid] = None
        blobs.update(_blobs_of(lsn, doc, tensors))
        effects = effects.then(effects_of(op, _attachments_of(lsn, doc, tensors)))

    states: dict[int, EditState | None] = {}
    changed: set[int] = set()
    for eid, got in final.items():
        if got is None:
            if eid in base:
                states[eid] = None
            continue
        lsn, e, tensors = got
        vec = None
        if eid in with_vec and "cand_labels" not in e:
            vlsn, ve, vt = with_vec[eid]
            vec = edit_from_doc(ve, tensor_reader(vt, dim, f"journal record {vlsn}")).vec
        elif "cand_labels" not in e:
            vec = base[eid].vec
        states[eid] = edit_from_doc(e, tensor_reader(tensors, dim, f"journal record {lsn}"), vec)
        if eid in with_vec:
            changed.add(eid)
    return Change(states=states, changed_vec=frozenset(changed), blobs=blobs, effects=effects)


def _blobs_of(lsn: int, doc: dict, tensors: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The image blobs a commit record carries (by sha256), checked."""
    return checked_bytes(doc.get("blobs", []), tensors, "blob", "image blob", f"journal record {lsn}")


def _attachments_of(lsn: int, doc: dict, tensors: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The attachment bytes an add's commit record carries (by sha256), checked."""
    where = f"journal record {lsn}"
    return checked_bytes(doc.get("attachments", []), tensors, "attachment", "attachment", where)
