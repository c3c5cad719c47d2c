"""What the edit debugger (``/ui``) shows beyond the native replies, from `EditMemory`'s public reads.

- `KeyTable`: every edit's fitted keys, thresholds and key origins, read once (`EditMemory.list`,
  `EditMemory.keys_of`); an edit deleted while the table is read is left out.
- `candidates`: the top-k edits for a query key, each scored on its best-margin key (margin = cosine score -
  threshold, the quantity routing maximises among in-scope edits), with a "why not" sentence per loser.
- `neighbours`: the edits nearest an edit's own anchor key (its own input routed through every other scope).
- `scope_map`: a deterministic 2-D projection (PCA by SVD, sign-fixed) of every key and of probed inputs.
  A key with cosine threshold ``t`` holds the unit vectors within chord distance ``sqrt(2 (1 - t))`` of it;
  that chord is drawn as the radius. The projection shortens distances, so a probe drawn inside a circle may
  be outside the scope: the picture is a map, the margins are the truth.
- `image_media_type`: the content type of stored image bytes (sniffed by pillow, raster formats only).

No FastAPI here: the routes (`esg_memory.serve.ui.routes`) call these in a worker thread.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import UnknownEditError
from ...images import IMAGE_FORMATS

__all__ = ["KeyTable", "candidates", "image_media_type", "key_table", "neighbours", "scope_map"]


@dataclass(frozen=True)
class KeyTable:
    """Every key of every edit: ``keys`` (n, dim) unit rows, ``thresholds`` (n,), ``owners`` (n,) edit ids,
    ``origins`` (n,) key origins (``anchor``, ``positive:...``, ``feedback:...``), ``answers`` by edit id."""

    keys: np.ndarray
    thresholds: np.ndarray
    owners: np.ndarray
    origins: list[str]
    answers: dict[int, str]
    questions: dict[int, str]

    def __len__(self) -> int:
        return int(self.owners.shape[0])


def key_table(memory: Any) -> KeyTable:
    """The `KeyTable` of ``memory`` now (edits deleted while it is read are left out)."""
    dim = int(memory.encoder.dim)
    keys, thr, owners, origins = [], [], [], []
    answers: dict[int, str] = {}
    questions: dict[int, str] = {}
    for edit in memory.list():
        try:
            k, t = memory.keys_of(edit.id)
        except UnknownEditError:  # deleted meanwhile
            continue
        labels = [s.origin for s in edit.scope]
        if len(labels) != len(t):  # revised meanwhile: the keys are the truth, name them by position
            labels = [f"key {j}" for j in range(len(t))]
        keys.append(np.asarray(k, dtype=np.float32).reshape(-1, dim))
        thr.append(np.asarray(t, dtype=np.float32).reshape(-1))
        owners.append(np.full(len(t), int(edit.id), dtype=np.int64))
        origins.extend(labels)
        answers[int(edit.id)] = edit.answer
        questions[int(edit.id)] = edit.question
    if not keys:
        return KeyTable(np.zeros((0, dim), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [],
                        answers, questions)
    return KeyTable(np.concatenate(keys), np.concatenate(thr), np.concatenate(owners), origins, answers,
                    questions)


def _per_edit(table: KeyTable, q: np.ndarray, exclude: int | None = None) -> list[dict[str, Any]]:
    """Each edit's best-margin key for the unit query ``q`` (dim,), by margin (then score), best first."""
    if not len(table):
        return []
    scores = table.keys @ q.astype(np.float32)
    margins = scores - table.thresholds
    best: dict[int, int] = {}
    for j, (owner, m) in enumerate(zip(table.owners.tolist(), margins.tolist(), strict=True)):
        if owner == exclude:
            continue
        if owner not in best or m > margins[best[owner]]:
            best[owner] = j
    rows = [{"edit_id": eid, "answer": table.answers.get(eid), "question": table.questions.get(eid),
             "key": table.origins[j], "score": float(scores[j]), "threshold": float(table.thresholds[j]),
             "margin": float(margins[j]), "in_scope": bool(margins[j] >= 0)} for eid, j in best.items()]
    rows.sort(key=lambda r: (-r["margin"], -r["score"], r["edit_id"]))
    return rows


def candidates(table: KeyTable, query: np.ndarray, k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` edits with the largest margins for the unit query key (dim,), each with ``why``: why it
    wins or, for the others, why routing did not pick it."""
    rows = _per_edit(table, np.asarray(query, dtype=np.float32).reshape(-1))[: max(1, int(k))]
    winner = rows[0] if rows and rows[0]["in_scope"] else None
    for r in rows:
        if r is winner:
            r["why"] = "routed here: in scope with the largest margin"
        elif not r["in_scope"]:
            r["why"] = (f"out of scope: score {r['score']:.4f} < threshold {r['threshold']:.4f} of its best "
                        f"key '{r['key']}' (margin {r['margin']:+.4f})")
        else:
            r["why"] = (f"in scope, but edit {winner['edit_id']} has the larger margin "
                        f"({winner['margin']:+.4f} vs {r['margin']:+.4f})")
    return rows


def neighbours(memory: Any, table: KeyTable, edit_id: int, k: int = 5) -> dict[str, Any]:
    """The ``k`` edits nearest edit ``edit_id``'s anchor key (by cosine score of their best-margin key), with
    the memory's own neighbour relations: ``constrained_by`` (edits shaping this edit's scope) and
    ``holders`` (edits whose scope this one constrains)."""
    edit = memory.get(int(edit_id))  # UnknownEditError: 404
    own, _ = memory.keys_of(edit.id)
    origins = [s.origin for s in edit.scope]
    row = origins.index("anchor") if "anchor" in origins and len(origins) == len(own) else 0
    near = _per_edit(table, np.asarray(own[row], dtype=np.float32), exclude=edit.id)
    near.sort(key=lambda r: (-r["score"], r["edit_id"]))
    return {"id": edit.id, "key": origins[row] if row < len(origins) else "key 0",
            "neighbours": near[: max(1, int(k))], "constrained_by": [int(i) for i in edit.constrained_by],
            "holders": [int(i) for i in memory.holders(edit.id)]}


def _basis(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(mean (dim,), components (2, dim), explained variance ratios) of rows ``x``: SVD of the centred
    rows, each component's sign fixed so its largest-magnitude entry is positive (deterministic)."""
    dim = x.shape[1]
    mean = x.mean(axis=0) if len(x) else np.zeros(dim)
    comps = np.zeros((2, dim))
    ratios = [0.0, 0.0]
    if len(x) > 1:
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        total = float((s**2).sum())
        for i in range(min(2, len(s))):
            if s[i] <= 1e-9:
                continue
            v = vt[i]
            comps[i] = v if v[int(np.argmax(np.abs(v)))] >= 0 else -v
            ratios[i] = float(s[i] ** 2 / total) if total > 0 else 0.0
    return mean, comps, ratios


def scope_map(table: KeyTable, probes: np.ndarray | None = None) -> dict[str, Any]:
    """Every key as a point ``{edit_id, key, x, y, threshold, radius}`` of a 2-D PCA of the keys, and the
    probed inputs' unit keys (m, dim) projected alike (``probes``: ``{x, y}``); see the module docstring."""
    x = table.keys.astype(np.float64)
    mean, comps, ratios = _basis(x)
    xy = (x - mean) @ comps.T if len(x) else np.zeros((0, 2))
    points = [{"edit_id": int(e), "key": table.origins[j], "answer": table.answers.get(int(e)),
               "x": float(xy[j, 0]), "y": float(xy[j, 1]), "threshold": float(table.thresholds[j]),
               "radius": math.sqrt(max(0.0, 2.0 * (1.0 - float(table.thresholds[j]))))}
              for j, e in enumerate(table.owners.tolist())]
    out_probes = []
    if probes is not None and len(probes):
        pxy = (np.asarray(probes, dtype=np.float64) - mean) @ comps.T
        out_probes = [{"x": float(a), "y": float(b)} for a, b in pxy.tolist()]
    return {"points": points, "probes": out_probes, "explained_variance": ratios,
            "method": "PCA (SVD of the centred key matrix, sign-fixed); radius = sqrt(2 (1 - threshold)), "
                      "the chord of the cosine threshold, shown approximately in the projection"}


def image_media_type(data: bytes) -> str:
    """The MIME type of stored image bytes (``application/octet-stream`` when pillow cannot tell)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, ValueError):
        return "application/octet-stream"
    return Image.MIME.get(str(fmt), "application/octet-stream")
