"""Shared, cached tiny models and synthetic images for the wrapper tests (offline, seeded).

Models are built once per test session and never mutated by the code under test (tests check that),
so sharing them between test modules is safe.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from PIL import Image, ImageDraw

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
CORE_FAMILIES = ("llava", "qwen2_vl")


@functools.cache
def tiny(model_type: str) -> tuple[Any, Any]:
    from esg_memory.tiny import build_tiny

    torch.manual_seed(0)
    return build_tiny(model_type, seed=0)


def shape_image(color: tuple[int, int, int], kind: str = "circle", bg: tuple[int, int, int] = (255, 255, 255),
                size: int = 64) -> Image.Image:
    """A flat shape on a plain background (easy-vqa style)."""
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    s = size
    if kind == "circle":
        d.ellipse([s * 0.2, s * 0.2, s * 0.8, s * 0.8], fill=color)
    elif kind == "rect":
        d.rectangle([s * 0.15, s * 0.3, s * 0.85, s * 0.7], fill=color)
    else:
        d.polygon([(s * 0.5, s * 0.1), (s * 0.9, s * 0.85), (s * 0.1, s * 0.85)], fill=color)
    return im


def state_snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: Any, snap: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[k], snap[k]) for k in snap)


def prepend_inputs(inputs: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
    """``inputs`` with text token ids prepended to a single row (the reference a prefix must match)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([ids.view(1, -1), inputs["input_ids"]], dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([torch.zeros((1, ids.numel()), dtype=mm.dtype), mm], dim=1)
    return out


def trim_eos(tokens: torch.Tensor, eos: int, pad: int) -> list[int]:
    """Tokens up to and including the first EOS (what a lone row generates before stopping)."""
    out = []
    for t in tokens.tolist():
        out.append(t)
        if t == eos:
            break
    while out and out[-1] == pad and pad != eos:
        out.pop()
    return out


@functools.cache
def tiny_encoder() -> Any:
    from esg_memory.encoders import ClipKeyEncoder

    return ClipKeyEncoder("esg-tiny-clip")


def bare_generate(model: Any, processor: Any, images: list, prompts: list, **kw: Any) -> Any:
    from esg_memory.model import get_family

    inputs = get_family(model).build_inputs(processor, images, prompts)
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return inputs, model.generate(**inputs, **kw)


def bare_answers(model: Any, processor: Any, images: list, prompts: list, max_new_tokens: int = 8) -> list:
    from esg_memory.model import get_family

    inputs, out = bare_generate(model, processor, images, prompts, max_new_tokens=max_new_tokens)
    return get_family(model).decode_answers(processor, out, inputs["input_ids"].shape[1])


def one_thread() -> Any:
    """Generator body for a fixture: torch on one thread for the block (restored after).

    The tiny models are far too small to gain from intra-op threads, and on a shared 2-core machine
    two spinning threads per process slow tuning down several-fold.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
