"""The text-side key encoder: a real text tower plus an oracle image tower keyed by the picture's pixels.

Used where benchmark images are unavailable (text-side mode, see :mod:`.data`): the placeholder
picture of a subject maps to a seeded random unit vector, so pictures of one subject share a vector
and different subjects are unrelated; the text tower (MiniLM by default) carries all the difficulty.
Keys fuse both as the normalised weighted sum of unit vectors. Spec in the harness:
``"subject-id+<text encoder spec>"`` (default ``"subject-id+minilm"``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..images import keyed_image

__all__ = ["TEXT_SIDE_PREFIX", "SubjectTextEncoder"]

#: ``--clip`` prefix selecting this encoder in the harness.
TEXT_SIDE_PREFIX = "subject-id+"


class SubjectTextEncoder:
    """KeyEncoder: ``text_encoder``'s text keys + seeded pixel-hash image vectors (module docstring)."""

    def __init__(self, text_encoder: Any, image_weight: float = 0.5) -> None:
        self.text = text_encoder
        self.dim = int(text_encoder.dim)
        self.image_weight = image_weight
        self.name = f"bench-subject-id+{text_encoder.name}:iw={image_weight}"
        self._img: dict[str, np.ndarray] = {}
        self._txt: dict[str, np.ndarray] = {}

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._txt})
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            for t, v in zip(chunk, self.text.encode_texts(chunk), strict=True):
                self._txt[t] = v
        return np.stack([self._txt[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def load_cache(self, path: Path) -> None:
        """Reuse text embeddings of an earlier run (same text encoder only): MiniLM on 2 cores is slow."""
        if not path.exists():
            return
        with np.load(path, allow_pickle=False) as z:
            if str(z["name"]) != self.text.name:
                return
            for t, v in zip(z["texts"].tolist(), z["vecs"], strict=True):
                self._txt[t] = v

    def save_cache(self, path: Path) -> None:
        texts = sorted(self._txt)
        np.savez(
            path,
            name=np.asarray(self.text.name),
            texts=np.asarray(texts),
            vecs=np.stack([self._txt[t] for t in texts]),
        )

    def _image_vec(self, image: Any) -> np.ndarray:
        k = keyed_image(image)  # keyed without re-encoding; decoded only the first time
        v = self._img.get(k.key)
        if v is None:
            px = np.asarray(k.rgb(), dtype=np.uint8).tobytes()
            seed = int.from_bytes(hashlib.sha256(px).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            v = (v / np.linalg.norm(v)).astype(np.float32)
            self._img[k.key] = v
        return v

    def encode(self, images: Any, texts: Any) -> np.ndarray:
        images, texts = list(images), list(texts)
        tmask = [t is not None for t in texts]
        tv = self.text_vectors([t for t in texts if t is not None]) if any(tmask) else None
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        j = 0
        for i, (im, t) in enumerate(zip(images, texts, strict=True)):
            v = np.zeros(self.dim, dtype=np.float64)
            if t is not None:
                v += (1 - self.image_weight if im is not None else 1.0) * tv[j]
                j += 1
            if im is not None:
                v += (self.image_weight if t is not None else 1.0) * self._image_vec(im)
            out[i] = v / np.linalg.norm(v)
        return out

    def encode_images(self, images: Any) -> np.ndarray:
        return self.encode(images, [None] * len(images))

    def encode_texts(self, texts: Any) -> np.ndarray:
        return self.encode([None] * len(texts), texts)
