"""Turning whatever a user calls "an image" into pixels plus a stable content hash.

Edits store images by the SHA-256 of their encoded bytes, so the same picture given as a
path, as bytes or as a PIL image is one blob, and keys can be cached by that hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ImageError

__all__ = [
    "IMAGE_FORMATS",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "ImageLike",
    "LoadedImage",
    "image_from_bytes",
    "load_image",
]

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

#: Refuse images with more pixels than this (pillow's decompression-bomb guard, made an error).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
#: Refuse encoded image files larger than this many bytes.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Raster formats pillow may decode. Others are refused: some plugins hand the bytes to external
#: programs (EPS runs Ghostscript), and none is needed for photos. (JPEG also opens MPO files.)
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


@dataclass(frozen=True)
class LoadedImage:
    """Decoded RGB pixels, the canonical bytes they were decoded from, and those bytes' hash."""

    image: Image.Image
    data: bytes
    sha256: str


def _decode(data: bytes, what: str) -> Image.Image:
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{what}: {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
    if not data:
        raise ImageError(f"{what}: empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"{what}: {img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit"
                )
            img.load()
            rgb = img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what}: refused as a decompression bomb ({e})") from None
    except Exception as e:  # pillow raises many types for bad bytes; all mean the same to a caller
        raise ImageError(f"{what}: not a decodable image ({type(e).__name__}: {e})") from None
    return rgb


def image_from_bytes(data: bytes, what: str = "image") -> LoadedImage:
    """Decode encoded image bytes (PNG, JPEG, ...), checking size limits."""
    data = bytes(data)
    return LoadedImage(_decode(data, what), data, hashlib.sha256(data).hexdigest())


def _resolve(path: Path, allowed_root: str | os.PathLike | None) -> Path:
    if "\x00" in str(path):
        # the OS cannot name such a file; pathlib would raise a bare ValueError
        raise ImageError(f"image path {str(path)!r} contains a NUL character")
    if allowed_root is None:
        return path
    try:
        root = Path(allowed_root).resolve()
        full = (root / path).resolve() if not path.is_absolute() else path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, bad root
        raise ImageError(f"image path {str(path)!r} cannot be resolved ({e})") from None
    if full != root and root not in full.parents:
        raise ImageError(f"image path {str(path)!r} resolves outside the allowed root {str(root)!r}")
    return full


def load_image(image: ImageLike, allowed_root: str | os.PathLike | None = None) -> LoadedImage:
    """Load a path, encoded bytes or a PIL image.

    A PIL image is re-encoded as PNG so its hash is a function of its pixels. With
    ``allowed_root`` a path must resolve (symlinks and ``..`` followed) inside that root.
    """
    if isinstance(image, Image.Image):
        # Checked before converting: an RGB copy of a huge image would be allocated first.
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageError(
                f"PIL image: {image.width}x{image.height} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit"
            )
        buf = io.BytesIO()
        try:
            image.convert("RGB").save(buf, format="PNG")
        except Exception as e:
            raise ImageError(f"PIL image could not be encoded ({type(e).__name__}: {e})") from None
        return image_from_bytes(buf.getvalue(), "PIL image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image_from_bytes(bytes(image), "image bytes")
    if isinstance(image, (str, os.PathLike)):
        try:
            path = Path(image)
        except TypeError as e:  # an os.PathLike whose __fspath__ returns neither str nor bytes
            raise ImageError(f"not a usable image path ({e})") from None
        path = _resolve(path, allowed_root)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageError(f"image file not found: {str(path)!r}") from None
        except OSError as e:
            raise ImageError(f"image file unreadable: {str(path)!r} ({e.strerror})") from None
        if not path.is_file():
            raise ImageError(f"not a regular file: {str(path)!r}")
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"{str(path)!r}: {size} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)  # a file grown since stat is still refused by size
        except OSError as e:  # permissions, or the file vanished after stat
            raise ImageError(f"image file unreadable: {str(path)!r} ({e.strerror})") from None
        return image_from_bytes(data, repr(str(path)))
    raise ImageError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")
