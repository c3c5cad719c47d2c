"""Prior methods' scope rules, run on the same keys, the same edits and the same adapters as ours.

Only the *routing rule* differs between methods: every method picks, per probe, one edit (or none),
and the answer is then generated with that edit's stored adapter injected by the same
:class:`~esg_memory.model.EditedModel` (through :class:`RoutedMemory`). So a difference in the
tables is a difference in scope, nothing else.

- ``bare``: no edits (the unedited model run post-stream: locality 1 by construction of the wrapper);
- ``ours``: the memory's learned per-edit scope (``EditMemory.route``);
- ``global_threshold`` (WISE / LTE-style): nearest edit key if its cosine clears one threshold,
  calibrated as the lowest value letting at most ``budget`` (1%) of the locality pool in, plus the
  memory's margin — the same pool our scopes learn from;
- ``grace``: GRACE's deferral radii: each key starts at the global radius, a new key inside an
  existing key's radius grows it when the answers agree and halves both to the gap when they conflict;
- ``text_only`` / ``image_only``: the global rule on text-only (RECIPE-style) or image-only keys, each
  calibrated on its own view of the pool; rows without an image never route under ``image_only``;
- ``always_nearest``: the nearest edit, always (no scope at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "METHODS",
    "KeyViews",
    "RoutedMemory",
    "baseline_route",
    "calibrate_global",
    "grace_radii",
    "nearest_rule",
]

#: Every method the harness runs, in table order.
METHODS = ("bare", "ours", "global_threshold", "grace", "text_only", "image_only", "always_nearest")


def nearest_rule(anchors: np.ndarray, q: np.ndarray, thr: np.ndarray | float | None) -> np.ndarray:
    """Index of the best-margin anchor per query, -1 when out of every scope (thr None: always nearest)."""
    if anchors.shape[0] == 0:
        return np.full(q.shape[0], -1)
    s = q @ anchors.T
    if thr is None:
        return np.argmax(s, axis=1)
    m = s - np.broadcast_to(np.asarray(thr, dtype=np.float32), (anchors.shape[0],))[None, :]
    j = np.argmax(m, axis=1)
    return np.where(m[np.arange(q.shape[0]), j] >= 0, j, -1)


def calibrate_global(anchors: np.ndarray, pool: np.ndarray, margin: float, budget: float = 0.0) -> float:
    """One threshold from the locality pool: the lowest value under which at most ``budget`` of the pool
    routes anywhere (``budget=0``: none; 0.01: the 1% leak target), plus ``margin``."""
    if pool.shape[0] == 0 or anchors.shape[0] == 0:
        raise InvalidInputError("calibrating a global threshold needs edits and a non-empty pool")
    best = (pool @ anchors.T).max(axis=1)
    return float(np.quantile(best, 1.0 - budget, method="higher")) + margin


def grace_radii(anchors: np.ndarray, answers: Sequence[str], eps0: float) -> np.ndarray:
    """GRACE's deferral radii (cosine distance), in stream order, returned as cosine thresholds."""
    eps = np.zeros(anchors.shape[0])
    for i in range(anchors.shape[0]):
        eps[i] = eps0
        if i == 0:
            continue
        d = 1.0 - anchors[:i] @ anchors[i]
        j = int(np.argmin(d))
        if d[j] < eps[j] + eps[i]:
            if answers[j] == answers[i]:
                eps[j] = max(eps[j], float(d[j]))
            else:
                eps[j] = eps[i] = float(d[j]) / 2
    return 1.0 - eps


@dataclass(frozen=True)
class KeyViews:
    """Joint, text-only and image-only keys of a set of inputs (rows without an image: zero image key)."""

    joint: np.ndarray
    text: np.ndarray
    image: np.ndarray
    has_image: np.ndarray

    def take(self, idx: np.ndarray) -> KeyViews:
        return KeyViews(self.joint[idx], self.text[idx], self.image[idx], self.has_image[idx])

    @classmethod
    def encode(cls, encoder: Any, images: Sequence[Any], texts: Sequence[str]) -> KeyViews:
        has = np.asarray([im is not None for im in images], dtype=bool)
        n = len(texts)
        joint = encoder.encode(list(images), list(texts)) if n else np.zeros((0, encoder.dim), np.float32)
        text = encoder.encode_texts(list(texts)) if n else np.zeros((0, encoder.dim), np.float32)
        image = np.zeros((n, encoder.dim), dtype=np.float32)
        if has.any():
            image[has] = encoder.encode_images([im for im in images if im is not None])
        return cls(joint, text, image, has)


def baseline_route(
    method: str,
    anchors: KeyViews,
    answers: Sequence[str],
    queries: KeyViews,
    pool: KeyViews,
    margin: float,
    budget: float,
    fallback: float,
) -> np.ndarray:
    """Per query, the index of the live edit a baseline rule picks (-1: none).

    ``fallback`` is the threshold used when the pool has no rows of a view (e.g. no pictures).
    """
    n = queries.joint.shape[0]
    if method == "bare" or anchors.joint.shape[0] == 0:
        return np.full(n, -1)

    def tau(a: np.ndarray, p: np.ndarray) -> float:
        return calibrate_global(a, p, margin, budget) if p.shape[0] else fallback

    if method == "always_nearest":
        return nearest_rule(anchors.joint, queries.joint, None)
    if method == "global_threshold":
        return nearest_rule(anchors.joint, queries.joint, tau(anchors.joint, pool.joint))
    if method == "grace":
        t = tau(anchors.joint, pool.joint)
        return nearest_rule(anchors.joint, queries.joint, grace_radii(anchors.joint, answers, 1.0 - t))
    if method == "text_only":
        return nearest_rule(anchors.text, queries.text, tau(anchors.text, pool.text))
    if method == "image_only":
        if not anchors.has_image.any():
            return np.full(n, -1)
        live = np.flatnonzero(anchors.has_image)
        t = tau(anchors.image[live], pool.image[pool.has_image])
        j = nearest_rule(anchors.image[live], queries.image, t)
        j = np.where(j >= 0, live[np.maximum(j, 0)], -1)
        return np.where(queries.has_image, j, -1)
    raise InvalidInputError(f"unknown baseline {method!r}; one of {', '.join(METHODS)}")


class RoutedMemory:
    """Memory stand-in for :class:`EditedModel`: the next call's rows route as a baseline rule decided.

    Everything but ``route`` is the real memory's (edits, stored adapters), so a baseline's answers are
    generated with exactly the adapter of the edit its rule picked, injected the same way as ours.
    """

    def __init__(self, memory: Any, edit_ids: Sequence[int]):
        self._memory = memory
        self._ids = np.asarray(edit_ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._memory

    def __getattr__(self, name: str) -> Any:
        # any other routing entry point must fail loudly, never fall through to the real scopes
        if name.startswith("route") or name.startswith("_route"):
            raise AttributeError(f"RoutedMemory does not implement {name!r}")
        return getattr(self._memory, name)

    def _check(self, images: Any, texts: Any, keys: Any) -> None:
        n = len(texts) if texts is not None else (len(keys) if keys is not None else len(images))
        if n != len(self._ids):
            raise InvalidInputError(f"fixed routing holds {len(self._ids)} rows, the batch has {n}")

    def route(self, images: Any = None, texts: Any = None, *, keys: Any = None) -> _Routed:
        self._check(images, texts, keys)
        return _Routed(self._ids)

    def route_ids(self, images: Any = None, texts: Any = None, *, keys: Any = None) -> np.ndarray:
        """Edit id per row (the wrapper's id-only routing call)."""
        self._check(images, texts, keys)
        return self._ids.copy()


class _Routed:
    """The part of a ``RouteResult`` that ``EditedModel`` reads when injecting."""

    def __init__(self, ids: np.ndarray):
        self.edit_ids = ids

    def __len__(self) -> int:
        return int(self.edit_ids.shape[0])
