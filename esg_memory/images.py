"""Turning whatever a user calls "an image" into RGB pixels plus a stable content hash.

Two hashes, for two duties:

- `load_image` (writes): the picture's *blob id*, the SHA-256 of its encoded bytes (file bytes for
  a path or bytes; lossless PNG for a PIL image), so the same picture given as a path, as bytes or
  as a PIL image is one stored blob. Blob ids are part of the on-disk format.
- `keyed_image` (reads, the encoders' embedding cache): a content key computed without encoding
  anything: bytes are hashed as they are (the key is then the blob id itself), a PIL image from
  the size and raw bytes of the RGB pixels an encoder sees. Pixels are decoded only when the
  cache misses.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from .errors import ImageError

__all__ = [
    "IMAGE_FORMATS",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "ImageLike",
    "KeyedImage",
    "LoadedImage",
    "decode_image",
    "image_from_bytes",
    "keyed_image",
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
            # a camera's EXIF orientation is how the picture is meant to be seen (and what a model
            # should see); the stored bytes, and so the blob id, stay as given
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what}: refused as a decompression bomb ({e})") from None
    except Exception as e:  # pillow raises many types for bad bytes; all mean the same to a caller
        raise ImageError(f"{what}: not a decodable image ({type(e).__name__}: {e})") from None
    return rgb


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """RGB pixels of encoded image bytes: size limits, decodable formats only, EXIF orientation applied."""
    return _decode(bytes(data), what)


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


def _check_pil(image: Image.Image) -> None:
    # Checked before converting: an RGB copy of a huge image would be allocated first.
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"PIL image: {image.width}x{image.height} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit"
        )


def _read_path(image: str | os.PathLike, allowed_root: str | os.PathLike | None) -> tuple[bytes, str]:
    """The bytes of an image file (size-limited) and how to name it in errors."""
    try:
        path = Path(image)
    except TypeError as e:  # an os.PathLike whose __fspath__ returns neither str nor bytes
        raise ImageError(f"not a usable image path ({e})") from None
    path = _resolve(path, allowed_root)
    try:
        # O_NONBLOCK: a FIFO planted where a picture should be must not hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {str(path)!r}") from None
    except OSError as e:
        raise ImageError(f"image file unreadable: {str(path)!r} ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"not a regular file: {str(path)!r}")
        if st.st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"{str(path)!r}: {st.st_size} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
        if allowed_root is not None:
            # check what was opened, not what the path named a moment earlier: a symlink swapped in
            # between the resolve above and the open would otherwise escape the root
            _check_opened(fd, st, path, Path(allowed_root).resolve())
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)  # a file grown since fstat is still refused by size
    except OSError as e:  # permissions, or the file vanished
        raise ImageError(f"image file unreadable: {str(path)!r} ({e.strerror})") from None
    finally:
        os.close(fd)
    return data, repr(str(path))


def _check_opened(fd: int, st: os.stat_result, path: Path, root: Path) -> None:
    """`ImageError` unless the file open as ``fd`` lies inside ``root``."""
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))  # Linux: the path of what is open
    except OSError:  # no /proc: the opened file must be the one the checked path names now
        try:
            now = os.stat(path)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise ImageError(f"image path {str(path)!r} changed while it was opened") from None
        return
    if real != root and root not in real.parents:
        raise ImageError(f"image path {str(path)!r} resolves outside the allowed root {str(root)!r}")


def _not_an_image(image: object) -> ImageError:
    return ImageError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")


def load_image(image: ImageLike, allowed_root: str | os.PathLike | None = None) -> LoadedImage:
    """Load a path, encoded bytes or a PIL image, with the bytes a memory stores it as.

    A PIL image is encoded as PNG (lossless), so its blob id is a function of its pixels; its
    ``image`` is the RGB conversion the PNG was made from (no decode round trip). With
    ``allowed_root`` a path must resolve (symlinks and ``..`` followed) inside that root.
    """
    if isinstance(image, Image.Image):
        _check_pil(image)
        buf = io.BytesIO()
        try:
            rgb = image.convert("RGB")
            rgb.save(buf, format="PNG")
        except Exception as e:
            raise ImageError(f"PIL image could not be encoded ({type(e).__name__}: {e})") from None
        data = buf.getvalue()
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"PIL image: {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
        return LoadedImage(rgb, data, hashlib.sha256(data).hexdigest())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image_from_bytes(bytes(image), "image bytes")
    if isinstance(image, (str, os.PathLike)):
        data, what = _read_path(image, allowed_root)
        return image_from_bytes(data, what)
    raise _not_an_image(image)


class KeyedImage:
    """An image argument with its content key (see the module docstring); decoded on first `rgb()`.

    One per image per call, never shared between threads.
    """

    __slots__ = ("_data", "_rgb", "key", "what")

    def __init__(self, key: str, what: str, data: bytes | None = None, rgb: Image.Image | None = None):
        self.key = key
        self.what = what
        self._data = data
        self._rgb = rgb

    def rgb(self) -> Image.Image:
        """The RGB pixels (decoded now if the image came as bytes; `ImageError` if they do not decode)."""
        if self._rgb is None:
            self._rgb = _decode(self._data or b"", self.what)
        return self._rgb


def pixel_key(rgb: Image.Image) -> str:
    """The content key of RGB pixels: SHA-256 over their size and raw bytes, nothing encoded."""
    h = hashlib.sha256(b"RGB %d %d\n" % rgb.size)
    h.update(rgb.tobytes())
    return "px:" + h.hexdigest()


def keyed_image(image: ImageLike, allowed_root: str | os.PathLike | None = None) -> KeyedImage:
    """``image`` with its content key, computed without encoding (the embedding cache's hot path).

    Bytes and files are hashed as they are (the key is their blob id) and decoded only if
    `KeyedImage.rgb` is called. A PIL image is keyed by the RGB pixels an encoder sees, so images
    that convert to the same RGB pixels (an ``"L"`` image and its RGB copy) share a key, while a
    palette or mode that changes the colours changes it. Size limits are those of `load_image`.
    """
    if isinstance(image, Image.Image):
        _check_pil(image)
        if image.width * image.height == 0:
            raise ImageError(f"PIL image: {image.width}x{image.height} has no pixels")
        try:
            # already-RGB pixels are hashed in place: the common case pays no conversion
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            key = pixel_key(rgb)
        except Exception as e:  # a lazily opened image whose file is truncated or gone
            raise ImageError(f"PIL image could not be read ({type(e).__name__}: {e})") from None
        return KeyedImage(key, "PIL image", rgb=rgb)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data, what = bytes(image), "image bytes"
    elif isinstance(image, (str, os.PathLike)):
        data, what = _read_path(image, allowed_root)
    else:
        raise _not_an_image(image)
    # the checks _decode would make first, made here so a refused input is never hashed
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{what}: {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
    if not data:
        raise ImageError(f"{what}: empty image data")
    return KeyedImage(hashlib.sha256(data).hexdigest(), what, data=data)
