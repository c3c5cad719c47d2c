"""Generated positives for scope fitting: image augmentations and question paraphrases.

An edit's scope is fitted from inputs that *must* route to it. Users rarely give many, so
these helpers manufacture plausible ones:

- :func:`augment_image` makes views a camera or a user could plausibly produce of the same
  picture (slightly tighter crop, mirror image, small lighting change). The bounds are
  deliberately conservative: a crop never drops more than ~10 % of a side, and the colour
  jitter leaves hue alone, because for VQA-style edits ("what colour is the shape?") a
  view that changes the subject's colour is a *different* input and must not become a
  positive.
- :func:`question_templates` rewrites a question with rule-based templates (embedded
  questions, polite wrappers, casing and punctuation variants) that keep its meaning.

Both are deterministic: the same arguments give the same outputs in every process, so a
memory rebuilt from its journal gets the same generated positives.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .errors import InvalidInputError
from .images import ImageLike, load_image

__all__ = ["AugmentBounds", "augment_image", "question_templates"]


class AugmentBounds:
    """The ranges :func:`augment_image` samples from (class attributes, documented here).

    - ``min_area`` / ``max_area``: fraction of the image area a crop keeps. 0.8 keeps the
      subject of a centred photo; lower values start cutting objects near the border.
    - ``max_aspect_change``: crops' aspect ratio is the original's times a factor in
      ``[1/x, x]``.
    - ``brightness`` / ``contrast`` / ``saturation``: multiplicative factors sampled in
      ``[1 - x, 1 + x]``. 0.1 is below what turns "red" into "brown" for saturated colours.
    - ``flip_p``: probability of a horizontal mirror. Vertical flips are not used: they
      change the meaning of scenes (sky below ground) and of text in images.
    """

    min_area = 0.80
    max_area = 1.0
    max_aspect_change = 1.15
    brightness = 0.10
    contrast = 0.10
    saturation = 0.10
    flip_p = 0.5


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return load_image(image).image


def _crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    b = AugmentBounds
    # torchvision's RandomResizedCrop recipe, with bounds that keep the subject
    for _ in range(10):
        area = rng.uniform(b.min_area, b.max_area) * w * h
        log_r = rng.uniform(-np.log(b.max_aspect_change), np.log(b.max_aspect_change))
        ratio = float(np.exp(log_r)) * (w / h)
        cw = round(np.sqrt(area * ratio))
        ch = round(np.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    return 0, 0, w, h


def augment_image(image: ImageLike, n: int, seed: int = 0) -> list[Image.Image]:
    """Return ``n`` augmented RGB views of ``image``, each the original's size.

    Each view is a random resized crop (``AugmentBounds.min_area`` of the area or more),
    a horizontal flip with probability ``flip_p``, and a small brightness / contrast /
    saturation change. Deterministic in ``(image pixels, n, seed)``; view ``i`` does not
    depend on ``n`` (asking for more views extends the list).

    Raises:
        InvalidInputError: ``n`` is negative or not an int; ``seed`` is not an int.
        ImageError: the image cannot be loaded.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidInputError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidInputError(f"seed must be an int, got {seed!r}")
    base = _to_pil(image)
    w, h = base.size
    out: list[Image.Image] = []
    for i in range(int(n)):
        # one independent stream per view, so view i is stable whatever n is
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i])
        box = _crop_box(w, h, rng)
        view = base.crop(box).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < AugmentBounds.flip_p:
            view = ImageOps.mirror(view)
        b = AugmentBounds
        view = ImageEnhance.Brightness(view).enhance(rng.uniform(1 - b.brightness, 1 + b.brightness))
        view = ImageEnhance.Contrast(view).enhance(rng.uniform(1 - b.contrast, 1 + b.contrast))
        view = ImageEnhance.Color(view).enhance(rng.uniform(1 - b.saturation, 1 + b.saturation))
        out.append(view)
    return out


_WH = r"(?:what|which|who|whom|whose|where|when|why|how)"
_BE = r"(?:is|are|was|were)"
# "what color is the shape" -> wh-phrase "what color", verb "is", rest "the shape"
_WH_BE = re.compile(rf"^(?P<wh>{_WH}(?:\s+\w+)?)\s+(?P<be>{_BE})\s+(?P<rest>.+)$", re.IGNORECASE)
# "is there a circle" / "are the dogs brown"
_YESNO_BE = re.compile(rf"^(?P<be>{_BE})\s+(?P<subj>there|it|this|that|\w+\s+\w+|\w+)\s+(?P<rest>.+)$", re.I)


def _strip_q(q: str) -> str:
    return q.rstrip(" ?.!").strip()


_KEEP_ORDER = re.compile(
    r"^(?:in|on|at|inside|under|above|below|behind|near|there|here|present|shown|visible|missing|\w+ed)\b",
    re.IGNORECASE,
)


def _embedded(q: str) -> str | None:
    """'What color is the shape?' -> 'what color the shape is'; None when no rule fits."""
    core = _strip_q(q)
    m = _WH_BE.match(core)
    if m:
        wh, be, rest = m.group("wh"), m.group("be"), m.group("rest")
        wh = wh[0].lower() + wh[1:]
        if _KEEP_ORDER.match(rest):
            # the wh-phrase is the subject ("what shape is in the image"): no inversion to undo
            return f"{wh} {be.lower()} {rest}"
        return f"{wh} {rest} {be.lower()}"
    m = _YESNO_BE.match(core)
    if m and m.group("subj").lower() in ("there", "it", "this", "that"):
        return f"whether {m.group('subj').lower()} {m.group('be').lower()} {m.group('rest')}"
    return None


def question_templates(question: str, n: int | None = None) -> list[str]:
    """Meaning-preserving rewrites of ``question``, most natural first, without duplicates.

    Rules: embedded questions ("What is X?" -> "Can you tell me what X is?"), polite and
    imperative wrappers ("Tell me: ...", "Please answer: ..."), casing and punctuation
    variants. The original question (after whitespace normalisation) is never returned.
    ``n`` truncates the list; ``None`` returns all.

    Raises:
        InvalidInputError: ``question`` is not a non-empty string or ``n`` is negative.
    """
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError(f"question must be a non-empty string, got {question!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise InvalidInputError(f"n must be None or a non-negative int, got {n!r}")
    q = " ".join(question.split())
    core = _strip_q(q) or q
    lower_core = core[0].lower() + core[1:]
    cap_core = core[0].upper() + core[1:]
    cands: list[str] = []
    emb = _embedded(q)
    if emb is not None:
        cands += [
            f"Can you tell me {emb}?",
            f"Could you say {emb}?",
            f"I would like to know {emb}.",
            f"Do you know {emb}?",
        ]
    cands += [
        f"Tell me: {lower_core}?",
        f"Please answer: {lower_core}?",
        f"Question: {cap_core}?",
        f"{cap_core}? Answer briefly.",
        f"{lower_core}?",
        f"{cap_core}?",
        f"{cap_core}",
        f"{core.upper()}?",
    ]
    seen = {q}
    out: list[str] = []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out if n is None else out[:n]
