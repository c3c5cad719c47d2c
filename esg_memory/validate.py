"""Validation of what users hand the library: texts, image arguments, key arrays, encoders, routed rows.

One module so that every entry point (memory writes, routing, the wrapper, the service) refuses bad
input with the same typed error (`InvalidInputError`, `ImageError`, `ConfigError`) and the same words,
and so that the hot path validates a batch of keys once: `check_keys` returns rows every later stage
may trust as they are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from index import UnitRows

from .errors import ConfigError, ImageError, InvalidInputError
from .images import MAX_IMAGE_PIXELS

__all__ = [
    "MAX_TEXT_CHARS",
    "check_encoder",
    "check_keys",
    "check_text",
    "normalize_image_arg",
    "route_rows",
    "unit_keys",
]

#: Longest question / answer / positive text accepted (characters).
MAX_TEXT_CHARS = 8192


def check_text(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise InvalidInputError(f"{what} must be a string, not {type(x).__name__}")
    if not x.strip():
        raise InvalidInputError(f"{what} must not be empty")
    if len(x) > MAX_TEXT_CHARS:
        raise InvalidInputError(f"{what} is {len(x)} characters; the limit is {MAX_TEXT_CHARS}")
    if "\x00" in x:
        raise InvalidInputError(f"{what} contains a NUL character")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: every encoder and file format would choke later
        raise InvalidInputError(f"{what} is not valid Unicode (lone surrogate)") from None
    return x


def check_keys(x: Any, n: int | None, dim: int, what: str) -> np.ndarray:
    """A (n, dim) float32 array of unit rows, or a typed error.

    Every routed call runs this, and right after a model's forward pass each distinct numpy
    operation costs tens of microseconds in cache misses, so the accepting path is a handful of
    them; the detailed diagnosis runs only for input it refuses.
    """
    try:
        raw = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{what}: not a numeric array ({e})") from None
    # strings would be parsed and complex parts silently dropped by a float cast; refuse both
    if raw.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what}: must be real numbers, got dtype {raw.dtype}")
    if raw.ndim == 1 and n is None and raw.shape[0] == dim:
        raw = raw[None, :]
    if raw.ndim != 2 or raw.shape[1] != dim or (n is not None and raw.shape[0] != n):
        raise InvalidInputError(f"{what}: shape {raw.shape}, expected ({'n' if n is None else n}, {dim})")
    with np.errstate(over="ignore", invalid="ignore"):
        # via float32: a value beyond its range is refused (inf) rather than normalised away
        a = raw.astype(np.float32).astype(np.float64)
    sq = np.einsum("ij,ij->i", a, a)
    # NaN/inf anywhere in a row make its squared norm NaN/inf, which fails this test too
    if not all(1e-24 <= v < math.inf for v in sq.tolist()):
        if not np.isfinite(a).all():
            raise InvalidInputError(f"{what}: contains NaN or inf")
        raise InvalidInputError(f"{what}: contains a zero vector")
    return (a / np.sqrt(sq)[:, None]).astype(np.float32)


def unit_keys(x: Any, n: int | None, dim: int, what: str) -> UnitRows:
    """`check_keys` as the index's proof type: later stages (the index among them) trust it as it is."""
    return UnitRows.trusted(check_keys(x, n, dim, what))


def check_encoder(encoder: Any) -> None:
    name = getattr(encoder, "name", None)
    dim = getattr(encoder, "dim", None)
    if not isinstance(name, str) or not name:
        raise ConfigError("encoder must have a non-empty string `name`")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 1:
        raise ConfigError("encoder must have a positive integer `dim`")
    for m in ("encode", "encode_texts", "encode_images"):
        if not callable(getattr(encoder, m, None)):
            raise ConfigError(f"encoder must have a callable `{m}`")


def normalize_image_arg(image: Any) -> Any:
    if isinstance(image, Image.Image):
        # Encoders may take PIL images as they are (no load_image): apply its size limits here.
        n = image.width * image.height
        if not 0 < n <= MAX_IMAGE_PIXELS:
            raise ImageError(f"PIL image of {image.width}x{image.height} pixels (limit {MAX_IMAGE_PIXELS})")
        return image
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return image
    raise ImageError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")


def _rows(x: Any, what: str) -> list:
    if isinstance(x, (str, bytes, bytearray, memoryview, Mapping)) or not isinstance(x, Iterable):
        raise InvalidInputError(f"{what} must be a list with one entry per row, not {type(x).__name__}")
    return list(x)


def route_rows(images: Any, texts: Any) -> tuple[list[Any], list[str | None]]:
    """Checked (images, texts) rows for `EditMemory.route`; every row has an image, a text or both."""
    if images is None and texts is None:
        raise InvalidInputError("route needs images, texts or keys")
    ims = None if images is None else _rows(images, "images")
    txs = None if texts is None else _rows(texts, "texts")
    n = len(txs) if txs is not None else len(ims)  # type: ignore[arg-type]
    ims = [None] * n if ims is None else ims
    txs = [None] * n if txs is None else txs
    if len(ims) != len(txs):
        raise InvalidInputError(f"{len(ims)} images but {len(txs)} texts")
    for j, (im, t) in enumerate(zip(ims, txs, strict=True)):
        if t is not None:
            check_text(t, f"texts[{j}]")
        if t is None and im is None:
            raise InvalidInputError(f"row {j} has neither image nor text")
    return [None if im is None else normalize_image_arg(im) for im in ims], txs
