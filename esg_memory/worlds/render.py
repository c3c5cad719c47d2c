"""Drawing a scene with numpy alone: shapes, patterns and nuisance factors, deterministic from a seed.

No font, no PIL drawing call and no version-dependent resampling: every pixel is a function of the
scene, the nuisance values and `RENDER_VERSION`, so a seed gives the same bytes on every machine and
library version this project supports. A subject's identity (its objects' shape, colour, pattern,
size and order) is what an answer may depend on; everything in `Nuisance` is what a rendering may
vary without changing any answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["COLOURS", "PATTERNS", "RENDER_VERSION", "SHAPES", "SIZES", "Nuisance", "SceneObject", "render"]

#: Bump when any pixel of any rendering may change (saved worlds record it).
RENDER_VERSION = 3
#: Side of a rendering, pixels.
SIDE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "semicircle", "cross", "ring", "star", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 190),
    "orange": (255, 127, 14),
    "pink": (240, 110, 190),
    "brown": (140, 86, 55),
    "gray": (120, 120, 120),
    "teal": (20, 170, 170),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
SIZES: dict[str, float] = {"small": 0.5, "large": 0.85}


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: what answers are about."""

    shape: str
    colour: str
    pattern: str
    size: str


@dataclass(frozen=True)
class Nuisance:
    """What a rendering varies without changing any answer (see `esg_memory.worlds.scenes` for the
    training and held-out ranges)."""

    rotation: float = 0.0  # degrees, every object
    scale: float = 1.0  # multiplies the objects' size
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the side, the whole layout
    blur: int = 0  # box-blur radius, pixels
    noise: float = 0.0  # std of additive Gaussian noise, 0-255 units
    background: str = "plain"  # plain | gradient | grid | dots | checks | noise | stripes
    tint: tuple[int, int, int] = (250, 250, 250)  # background colour
    light: float = 1.0  # brightness factor of the whole picture


def _mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points of the unit shape in object coordinates (radius 1)."""
    r = np.hypot(x, y)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8
    if shape == "triangle":  # equilateral, apex up (y grows downwards): (0, -1), (+-0.87, 0.5)
        return (y <= 0.5) & (y >= -1.0 + 1.724 * np.abs(x))
    if shape == "semicircle":  # flat side down; unlike a diamond, no rotation turns it into another shape
        return (np.hypot(x, y - 0.45) <= 1.1) & (y <= 0.45)
    if shape == "cross":
        box = np.maximum(np.abs(x), np.abs(y)) <= 0.9
        return box & ((np.abs(x) <= 0.3) | (np.abs(y) <= 0.3))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "star":
        t = np.arctan2(y, x)
        return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * t)) ** 1.5
    if shape == "hexagon":
        ax, ay = np.abs(x), np.abs(y)
        return (ay <= 0.85) & (0.5 * ay + 0.866 * ax <= 0.85)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where a patterned object takes its second (darker) tone; ``u, v`` in pixels along the object's
    own axes, so a pattern turns with its object and keeps its period whatever the object's size."""
    if pattern == "solid":
        return np.zeros_like(u, dtype=bool)
    if pattern == "striped":
        return (u % 7.0) < 3.0
    if pattern == "dotted":
        return np.hypot(u % 7.0 - 3.5, v % 7.0 - 3.5) < 1.8
    if pattern == "checkered":
        return (np.floor(u / 4.0) + np.floor(v / 4.0)) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}")


def _background(n: Nuisance, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    tint = np.asarray(n.tint, dtype=np.float64)
    img = np.broadcast_to(tint, (SIDE, SIDE, 3)).copy()
    if n.background == "gradient":
        img *= (0.8 + 0.2 * (xx / SIDE))[..., None]
    elif n.background == "grid":
        img[((xx.astype(int) % 8) == 0) | ((yy.astype(int) % 8) == 0)] *= 0.85
    elif n.background == "noise":
        img *= rng.uniform(0.85, 1.0, size=(SIDE, SIDE, 1))
    elif n.background == "dots":
        img[np.hypot(xx % 6.0 - 3.0, yy % 6.0 - 3.0) < 1.2] *= 0.85
    elif n.background == "checks":
        img[((xx // 8) + (yy // 8)) % 2 == 0] *= 0.9
    elif n.background == "stripes":
        img *= (0.85 + 0.15 * (np.sin((xx + yy) * 0.6) > 0))[..., None]
    elif n.background != "plain":
        raise ValueError(f"unknown background {n.background!r}")
    return img


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return img
    k = 2 * radius + 1
    pad = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    c = np.cumsum(np.cumsum(pad, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0), (0, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def render(objects: tuple[SceneObject, ...], nuisance: Nuisance, seed: int) -> np.ndarray:
    """(SIDE, SIDE, 3) uint8 picture of ``objects`` (left to right) under ``nuisance``.

    ``seed`` drives only the pixel noise of the rendering (background texture, additive noise);
    the same arguments always give the same array.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    img = _background(nuisance, rng, yy, xx)
    n = len(objects)
    cell = SIDE / n
    th = np.deg2rad(nuisance.rotation)
    cos, sin = np.cos(th), np.sin(th)
    for j, ob in enumerate(objects):
        cx = cell * (j + 0.5) + nuisance.shift[0] * SIDE
        cy = SIDE / 2 + nuisance.shift[1] * SIDE
        radius = 0.5 * min(cell, SIDE) * SIZES[ob.size] * nuisance.scale
        dx, dy = (xx + 0.5 - cx) / radius, (yy + 0.5 - cy) / radius
        x, y = cos * dx + sin * dy, -sin * dx + cos * dy  # object coordinates: the shape turns
        inside = _mask(ob.shape, x, y)
        base = np.asarray(COLOURS[ob.colour], dtype=np.float64)
        second = _pattern(ob.pattern, x * radius, y * radius) & inside
        img[inside] = base
        img[second] = base * 0.55
    img = _box_blur(img, nuisance.blur) * nuisance.light
    if nuisance.noise > 0:
        img = img + rng.normal(0.0, nuisance.noise, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
