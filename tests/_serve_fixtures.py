"""A real uvicorn server on 127.0.0.1 (ephemeral port) in a thread, stopped when the block exits."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 with an ephemeral port, in a thread; stopped when the block exits."""
    from esg_memory.serve import running_server

    with running_server(app, "127.0.0.1", 0) as url:
        yield url


def png_bytes(color: tuple[int, int, int], kind: str = "circle", size: int = 64) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    if kind == "circle":
        d.ellipse([size * 0.2, size * 0.2, size * 0.8, size * 0.8], fill=color)
    else:
        d.rectangle([size * 0.15, size * 0.3, size * 0.85, size * 0.7], fill=color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


Q = "what color is the shape?"
PURPLE = png_bytes((160, 32, 200), "circle")
GREEN = png_bytes((20, 180, 40), "rect")
