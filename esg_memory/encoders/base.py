"""Key encoder basics: the protocol, the embedding cache and the fusion rules.

Key encoders turn (image, question) inputs into the unit vectors edits are routed by.

Every encoder follows :class:`KeyEncoder`: ``encode(images, texts)`` takes two equal-length
sequences whose row ``i`` has an image, a text, or both, and returns ``(n, dim)`` float32
rows of unit norm. Tower embeddings are cached by content key (`esg_memory.images.keyed_image`:
encoded bytes hashed as they are, a PIL image's RGB pixels hashed raw, never re-encoded; the text's
SHA-256), so an image or question is never run through a model twice, and a cache hit decodes nothing.

`CachedTowers` is the machinery the built-in encoders share (validation, cache, batching, fusion);
the checks and helpers below without a leading underscore are shared with the sibling modules.

Fusion of an image and a text embedding into one key (``fuse=``):

- ``"sum"`` (default): ``normalize(w * img + (1 - w) * txt)``. An image-only row is the image
  embedding and a text-only row the text embedding, *in the same space*: with a CLIP-style
  model whose towers share an embedding space, a text-only query still lands near an
  image+text edit about the same subject, and an image-only query likewise.
- ``"concat"``: ``[sqrt(w) * img, sqrt(1 - w) * txt]`` (already unit norm; ``dim`` doubles
  for CLIP). A single-modality row fills the other half with zeros, so its cosine to a
  fused key is at most ``sqrt(w)`` (image-only) or ``sqrt(1 - w)`` (text-only) and CLIP's
  cross-modal similarity is thrown away. It is the only rule that needs no shared space.
- ``"product"``: ``normalize(img * txt)`` (elementwise; ``image_weight`` has no effect).
  Single-modality rows are the plain embedding, which lives in a different space from fused
  keys: mixing both kinds of rows in one index is unreliable under this rule.

Why ``"sum"`` is `ClipKeyEncoder`'s default (``benchmarks/bench_fusion.py``, 600 easy-vqa
edits, tiny CLIP briefly aligned on held-out easy-vqa images; random weights show nothing):

- fused (image+text) probes: sum and concat tie (positive/negative AUC 0.747 vs 0.752,
  w=0.5); both beat a text-only key (0.496) and an image-only key (0.620);
- cross-modal reach: a caption of an edit's image ("a red circle") finds that edit only
  under sum (AUC 0.815 at w=0.5, 0.965 at w=0.7; concat 0.504, product 0.195);
- the price: single-modality probes of the same kind as one half (another photo alone)
  rank better under concat (AUC 0.980 vs 0.867), since sum adds the image-vs-question
  cross term; and concat doubles the key size;
- product is worst for every single-modality probe (AUC 0.20-0.51).

Towers that do not share a space (`CompositeKeyEncoder`) default to concat instead.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import ConfigError, InvalidInputError
from ..images import ImageLike, KeyedImage, keyed_image

__all__ = [
    "FUSE_RULES",
    "CacheInfo",
    "CachedTowers",
    "KeyEncoder",
    "as_rows",
    "check_fuse",
    "check_rows",
    "fuse_embeddings",
    "sha256_file",
]

logger = logging.getLogger(__name__)

FUSE_RULES = ("sum", "concat", "product")


@runtime_checkable
class KeyEncoder(Protocol):
    """What the edit memory needs from an encoder.

    ``name`` identifies the encoder *and its weights* (a saved memory refuses an encoder
    with another name); ``dim`` is the key size. All three methods return ``(n, dim)``
    float32 rows of unit L2 norm.
    """

    name: str
    dim: int

    def encode(self, images: Sequence[ImageLike | None], texts: Sequence[str | None]) -> np.ndarray: ...

    def encode_images(self, images: Sequence[ImageLike]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class CacheInfo:
    """Embedding-cache counters: lookups served from the cache, lookups that ran a model."""

    hits: int
    misses: int
    size: int
    maxsize: int


class _LRU:
    """Thread-safe LRU of read-only float32 vectors keyed by content hash."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: str, value: np.ndarray) -> None:
        if self.maxsize <= 0:
            return
        value = np.array(value, dtype=np.float32, copy=True)
        value.setflags(write=False)
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def count_hit(self) -> None:
        with self._lock:
            self.hits += 1

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.misses, len(self._d), self.maxsize)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.hits = self.misses = 0


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 1e-12, n, 1.0)).astype(np.float32)


def check_fuse(fuse: str, image_weight: float) -> float:
    """``image_weight`` as a float in [0, 1] for a known ``fuse`` rule, or `ConfigError`."""
    if fuse not in FUSE_RULES:
        raise ConfigError(f"fuse must be one of {FUSE_RULES}, got {fuse!r}")
    if isinstance(image_weight, bool) or not isinstance(image_weight, (int, float)):
        raise ConfigError(f"image_weight must be a number in [0, 1], got {image_weight!r}")
    w = float(image_weight)
    if not (0.0 <= w <= 1.0):
        raise ConfigError(f"image_weight must be in [0, 1], got {image_weight!r}")
    return w


def fuse_embeddings(
    img: np.ndarray, txt: np.ndarray, has_img: np.ndarray, has_txt: np.ndarray, fuse: str, image_weight: float
) -> np.ndarray:
    """Fuse per-row unit tower embeddings into unit keys (see the module docstring).

    ``img`` is ``(n, di)``, ``txt`` ``(n, dt)``; rows without that modality are ignored via the
    boolean masks. ``"sum"`` and ``"product"`` need ``di == dt``; ``"concat"`` returns
    ``di + dt`` columns.
    """
    w = check_fuse(fuse, image_weight)
    n = len(has_img)
    img = np.asarray(img, dtype=np.float64).reshape(n, -1)
    txt = np.asarray(txt, dtype=np.float64).reshape(n, -1)
    hi = np.asarray(has_img, dtype=bool)[:, None]
    ht = np.asarray(has_txt, dtype=bool)[:, None]
    if fuse == "concat":
        out = np.concatenate([math.sqrt(w) * img * hi, math.sqrt(1.0 - w) * txt * ht], axis=1)
        # single-modality rows: renormalise so the present half is the unit embedding
        return _l2n(out)
    if img.shape[1] != txt.shape[1]:
        raise ConfigError(f"fuse={fuse!r} needs equal image/text dims, got {img.shape[1]} and {txt.shape[1]}")
    both = hi & ht
    fused = w * img + (1.0 - w) * txt if fuse == "sum" else img * txt
    # a fused vector can vanish (img == -txt at w=0.5): fall back to the image embedding then
    degenerate = np.linalg.norm(fused, axis=1, keepdims=True) < 1e-9
    fused = np.where(degenerate, img, fused)
    out = np.where(both, fused, np.where(hi, img, txt))
    return _l2n(out)


def sha256_file(path: Path) -> str:
    """SHA-256 of a (weights) file, read in blocks: the weights part of an encoder's name."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _text_key(text: str) -> str:
    return "t:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def as_rows(x: Any, what: str) -> list:
    """``x`` as a list of rows (``None`` is no rows); a bare string, bytes or image is refused."""
    if x is None:
        return []
    if isinstance(x, (str, bytes, bytearray, memoryview, Image.Image)) or not isinstance(x, Sequence):
        raise InvalidInputError(f"{what} must be a sequence (list/tuple) of items, got {type(x).__name__}")
    return list(x)


def _check_text(t: Any, i: int) -> str:
    if not isinstance(t, str):
        raise InvalidInputError(f"texts[{i}] must be a string or None, got {type(t).__name__}")
    if not t.strip():
        raise InvalidInputError(f"texts[{i}] is empty; pass None for a row without text")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be hashed for the cache or tokenized
        raise InvalidInputError(f"texts[{i}] is not valid Unicode (lone surrogate)") from None
    return t


def check_rows(images: Any, texts: Any) -> tuple[list, list]:
    """Validate ``encode``'s arguments; ``None`` for a whole argument means "no such modality"."""
    ims, txs = as_rows(images, "images"), as_rows(texts, "texts")
    if images is None:
        ims = [None] * len(txs)
    if texts is None:
        txs = [None] * len(ims)
    if len(ims) != len(txs):
        raise InvalidInputError(f"images and texts must have equal lengths, got {len(ims)} and {len(txs)}")
    for i, (im, tx) in enumerate(zip(ims, txs, strict=True)):
        if im is None and tx is None:
            raise InvalidInputError(f"row {i} has neither an image nor a text")
        if tx is not None:
            _check_text(tx, i)
    return ims, txs


class CachedTowers:
    """Shared machinery of the built-in encoders: validation, cache lookups, batching, fusion.

    A subclass sets ``name``, ``dim``, ``embed_dim``, calls `_init_cache` and runs its towers in
    `_forward_images` / `_forward_texts`.
    """

    name: str
    dim: int
    embed_dim: int
    fuse: str = "sum"
    image_weight: float = 0.5
    batch_size: int = 64
    has_image_tower: bool = True
    has_text_tower: bool = True

    def _init_cache(self, cache_size: int, batch_size: int) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ConfigError(f"cache_size must be an int >= 0, got {cache_size!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self._cache = _LRU(cache_size)
        self.batch_size = batch_size

    # subclasses run their towers on a batch (already deduplicated, uncached)
    def _forward_images(self, images: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def _forward_texts(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def to(self, device: Any) -> CachedTowers:
        """Run the towers on ``device`` from now on; returns this encoder. Only the device changes: the
        towers keep their own dtype (float32), so keys stay the ones the memory's thresholds were fitted
        on (`EditedModel.to` moves the encoder this way and never casts it). Cached embeddings are kept
        (they are content-keyed float32 vectors on the CPU)."""
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"bad device {device!r}: {e}") from None
        model = getattr(self, "model", None)
        if model is not None:
            model.to(device=dev)
        self.device = dev
        return self

    def cache_info(self) -> CacheInfo:
        """Hits and misses of the embedding cache (one lookup per image or text in a call)."""
        return self._cache.info()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _lookup(
        self,
        keys: list[str],
        payloads: list[Any],
        forward: Callable[[list], np.ndarray],
        prepare: Callable[[list], list] | None = None,
    ) -> np.ndarray:
        """Cached embeddings for ``keys``; the misses' payloads go through ``prepare`` (all of them,
        before any forward pass, so bad input fails the call with the cache untouched), then
        ``forward`` in batches."""
        out: list[np.ndarray | None] = [None] * len(keys)
        todo: dict[str, list[int]] = {}
        todo_payload: dict[str, Any] = {}
        for i, k in enumerate(keys):
            if k in todo:  # repeated within this call: computed once
                todo[k].append(i)
                self._cache.count_hit()
                continue
            v = self._cache.get(k)
            if v is None:
                todo[k] = [i]
                todo_payload[k] = payloads[i]
            else:
                out[i] = v
        order = list(todo)
        ready = [todo_payload[k] for k in order]
        if prepare is not None and ready:
            ready = prepare(ready)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            emb = _l2n(forward(ready[s : s + self.batch_size]))
            for k, e in zip(chunk, emb, strict=True):
                self._cache.put(k, e)
                for i in todo[k]:
                    out[i] = e
        if not keys:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.stack(out).astype(np.float32)  # type: ignore[arg-type]

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Raw unit image-tower embeddings, ``(n, embed_dim)`` (no fusion, no zero padding).

        Images are keyed without encoding (`keyed_image`) and decoded only when the cache misses.
        """
        rows = as_rows(images, "images")
        if not self.has_image_tower and rows:
            raise InvalidInputError(
                f"{type(self).__name__} encodes text only; combine it with an image "
                "encoder in CompositeKeyEncoder to key images"
            )
        keyed: list[KeyedImage] = []
        for i, im in enumerate(rows):
            if im is None:
                raise InvalidInputError(f"images[{i}] is None; use encode() for rows without an image")
            keyed.append(keyed_image(im))
        return self._lookup(
            ["i:" + k.key for k in keyed],
            keyed,
            self._forward_images,
            prepare=lambda misses: [k.rgb() for k in misses],
        )

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Raw unit text-tower embeddings, ``(n, embed_dim)``."""
        rows = [_check_text(t, i) for i, t in enumerate(as_rows(texts, "texts"))]
        if not self.has_text_tower and rows:
            raise InvalidInputError(f"{type(self).__name__} has no text tower")
        return self._lookup([_text_key(t) for t in rows], rows, self._forward_texts)

    def encode(self, images: Sequence[ImageLike | None], texts: Sequence[str | None]) -> np.ndarray:
        """Keys for rows with an image, a text or both: ``(n, dim)`` float32, unit rows."""
        return self._encode_rows(*check_rows(images, texts))

    def _encode_rows(self, ims: list, txs: list) -> np.ndarray:
        n = len(ims)
        has_i = np.array([im is not None for im in ims], dtype=bool)
        has_t = np.array([tx is not None for tx in txs], dtype=bool)
        img = np.zeros((n, self.embed_dim), dtype=np.float32)
        txt = np.zeros((n, self.embed_dim), dtype=np.float32)
        if has_i.any():
            img[has_i] = self.embed_images([im for im in ims if im is not None])
        if has_t.any():
            txt[has_t] = self.embed_texts([tx for tx in txs if tx is not None])
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return fuse_embeddings(img, txt, has_i, has_t, self.fuse, self.image_weight)

    def encode_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Image-only keys, ``(n, dim)``."""
        rows = as_rows(images, "images")
        return self.encode(rows, [None] * len(rows))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text-only keys, ``(n, dim)``."""
        rows = as_rows(texts, "texts")
        return self.encode([None] * len(rows), rows)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"
