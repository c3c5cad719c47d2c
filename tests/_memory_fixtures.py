"""A small deterministic KeyEncoder for edit-memory tests, and image helpers.

`HashKeyEncoder` implements the `KeyEncoder` protocol without any model: texts become hashed
bag-of-words vectors, images a fixed random projection of their downsampled pixels, and an
image+text row the normalised sum of both. Each row is computed on its own, so results do not
depend on batch composition (exactly what the exact-deletion replay test needs), and words shared
between questions really do make their keys similar.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from esg_memory.errors import InvalidInputError
from esg_memory.images import load_image

__all__ = ["HashKeyEncoder", "png_bytes", "shape_image"]

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "the",
        "a",
        "an",
        "is",
        "are",
        "of",
        "in",
        "on",
        "this",
        "that",
        "what",
        "which",
        "to",
        "be",
        "do",
        "does",
        "please",
        "tell",
        "me",
        "can",
        "you",
    ]
)


def _seeded_unit(token: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(token.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


class HashKeyEncoder:
    """Hashed bag-of-words text vectors + random-projection image vectors, fused by normalised sum."""

    def __init__(self, dim: int = 64, image_weight: float = 1.0, name: str | None = None) -> None:
        self.dim = dim
        self.image_weight = image_weight
        self.name = name or f"test-hash:dim={dim}:iw={image_weight}"
        self._proj = np.random.default_rng(1234).standard_normal((8 * 8 * 3, dim))
        self.calls = 0

    def _text(self, text: str) -> np.ndarray:
        words = [w for w in _WORD.findall(text.lower()) if w not in _STOP] or ["<empty>"]
        v = np.zeros(self.dim)
        for w in words:
            v += _seeded_unit(w, self.dim)
        return v / max(np.linalg.norm(v), 1e-12)

    def _image(self, image) -> np.ndarray:
        img = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image).image
        px = np.asarray(img.resize((8, 8), Image.BILINEAR), dtype=np.float64).reshape(-1) / 255.0
        v = (px - 0.5) @ self._proj
        return v / max(np.linalg.norm(v), 1e-12)

    def encode(self, images: Sequence, texts: Sequence[str | None]) -> np.ndarray:
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise InvalidInputError("images and texts differ in length")
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, (im, t) in enumerate(zip(images, texts, strict=True)):
            if im is None and t is None:
                raise InvalidInputError(f"row {i} has neither image nor text")
            v = np.zeros(self.dim)
            if im is not None:
                v += self.image_weight * self._image(im)
            if t is not None:
                v += self._text(t)
            out[i] = v / np.linalg.norm(v)
        return out

    def encode_images(self, images: Sequence) -> np.ndarray:
        return self.encode(list(images), [None] * len(images))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode([None] * len(texts), list(texts))


_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 30),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}


def shape_image(
    color: str, shape: str = "circle", bg: str = "white", size: int = 32, shift: int = 0
) -> Image.Image:
    """A flat-coloured shape on a background (deterministic)."""
    img = Image.new("RGB", (size, size), _COLORS[bg])
    d = ImageDraw.Draw(img)
    box = (6 + shift, 6 + shift, size - 6 + shift, size - 6 + shift)
    if shape == "circle":
        d.ellipse(box, fill=_COLORS[color])
    elif shape == "triangle":
        d.polygon(
            [(size // 2 + shift, 4), (4 + shift, size - 4), (size - 4 + shift, size - 4)], fill=_COLORS[color]
        )
    else:
        d.rectangle(box, fill=_COLORS[color])
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
