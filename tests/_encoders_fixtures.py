"""Small synthetic images for encoder and augmentation tests (easy-vqa-like coloured shapes)."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 215, 30)}


def shape_image(color: str = "red", shape: str = "circle", size: int = 64, offset: int = 0) -> Image.Image:
    """A white canvas with one filled shape covering roughly the middle half."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    lo, hi = size // 4 + offset, 3 * size // 4 + offset
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([lo, lo, hi, hi], fill=fill)
    elif shape == "rectangle":
        d.rectangle([lo, lo, hi, hi], fill=fill)
    else:
        d.polygon([(size // 2 + offset, lo), (lo, hi), (hi, hi)], fill=fill)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
