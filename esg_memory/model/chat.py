"""Multi-turn conversations (``EditedModel.generate(messages=...)``): the model's chat template applied to
each conversation, and the (image, text) row it is routed by.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str | [item, ...]}`` turns, in
transformers' chat format; an item is ``{"type": "text", "text": ...}`` or ``{"type": "image"}``, whose image
is the item's own ``"image"`` (a PIL image, path or encoded bytes) or else the next one of ``images=``. A
conversation must end with a user turn. ``messages`` is one conversation or a list of them (a batch; then
``images=`` holds one list per conversation).

Routing: a conversation is routed by its last user turn's text and the last image of the whole
conversation, so a follow-up question about a picture shown earlier still reaches an edit about that
picture. The prompt text is the processor's ``apply_chat_template(..., add_generation_prompt=True)``;
processors without a chat template take a single user turn only (the family's plain template, as
``prompts=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..errors import InvalidInputError
from ..validate import check_text, normalize_image_arg
from .families import Family

__all__ = ["ROLES", "Conversation", "conversation_inputs", "route_rows"]

ROLES = ("system", "user", "assistant")
Conversation = list[dict[str, Any]]


def conversation_inputs(
    processor: Any, family: Family, model: Any, messages: Any, images: Any = None
) -> tuple[dict[str, Any], list[str | None], list[Any]]:
    """``(processor outputs on the model's device/dtype, route texts, route images)`` for a conversation or a
    batch of them (left-padded, as ``prompts=``)."""
    convs, per_conv = _batch(messages, images)
    texts: list[str] = []
    flat: list[Any] = []
    route_texts: list[str | None] = []
    route_images: list[Any] = []
    for c, (conv, imgs) in enumerate(zip(convs, per_conv, strict=True)):
        where = f"messages[{c}]" if len(convs) > 1 else "messages"
        turns, conv_images, last_text = _normalise(conv, imgs, where)
        texts.append(_template(processor, family, turns, len(conv_images)))
        flat += conv_images
        route_texts.append(last_text)
        route_images.append(conv_images[-1] if conv_images else None)
    common = {"return_tensors": "pt", "padding": True, "padding_side": "left"}
    enc = processor(images=flat, text=texts, **common) if flat else processor(text=texts, **common)
    dev, dt = model.device, model.dtype
    inputs = {
        k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) if isinstance(v, torch.Tensor) else v
        for k, v in enc.items()
    }
    return inputs, route_texts, route_images


def _batch(messages: Any, images: Any) -> tuple[list[Conversation], list[list[Any]]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError("messages must be a non-empty list of turns (or a list of conversations)")
    if all(isinstance(m, dict) for m in messages):  # one conversation
        one = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        return [list(messages)], [one]
    if not all(isinstance(m, (list, tuple)) for m in messages):
        raise InvalidInputError("messages must be a list of turn dicts, or a list of such lists")
    if images is None:
        return [list(m) for m in messages], [[] for _ in messages]
    if not isinstance(images, (list, tuple)) or len(images) != len(messages):
        raise InvalidInputError(f"images= needs one list per conversation ({len(messages)})")
    per = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    return [list(m) for m in messages], per


def _normalise(
    conv: Conversation, images: list[Any], where: str
) -> tuple[Conversation, list[Any], str | None]:
    """Turns with plain items (payloads stripped), the conversation's images in order, the last user text."""
    pending = list(images)
    out: Conversation = []
    found: list[Any] = []
    last_text: str | None = None
    if not conv:
        raise InvalidInputError(f"{where} is empty")
    for t, turn in enumerate(conv):
        at = f"{where}[{t}]"
        if not isinstance(turn, dict):
            raise InvalidInputError(f"{at}: a turn is a {{'role': ..., 'content': ...}} dict")
        role = turn.get("role")
        if role not in ROLES:
            raise InvalidInputError(f"{at}: role must be one of {', '.join(ROLES)}, not {role!r}")
        content = turn.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, (list, tuple)) or not items:
            raise InvalidInputError(f"{at}: content must be a string or a non-empty list of items")
        clean, turn_texts = [], []
        for i, item in enumerate(items):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                turn_texts.append(check_text(item.get("text"), f"{at}.content[{i}].text"))
                clean.append({"type": "text", "text": item["text"]})
            elif kind == "image":
                payload = item.get("image", item.get("path"))
                if payload is None:
                    if not pending:
                        raise InvalidInputError(f"{at}.content[{i}]: image item without an image (images=)")
                    payload = pending.pop(0)
                found.append(_pil(payload))
                clean.append({"type": "image"})
            else:
                raise InvalidInputError(f"{at}.content[{i}]: items are {{'type': 'text'|'image', ...}} dicts")
        if role == "user":
            last_text = " ".join(s.strip() for s in turn_texts) or None
        out.append({"role": role, "content": clean})
    if pending:
        raise InvalidInputError(f"{where}: {len(pending)} more images= than image items")
    if out[-1]["role"] != "user":
        raise InvalidInputError(f"{where} must end with a user turn")
    return out, found, last_text


def _template(processor: Any, family: Family, turns: Conversation, n_images: int) -> str:
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    user = [t for t in turns if t["role"] != "system"]
    if len(user) != 1 or n_images > 1:
        raise InvalidInputError(
            "this processor has no chat template: messages= takes a single user turn with at most one image"
        )
    text = " ".join(i["text"] for i in user[0]["content"] if i["type"] == "text")
    if not text.strip():
        raise InvalidInputError("without a chat template the user turn needs a text")
    return family.format_prompt(processor, text, n_images == 1)


def _pil(image: Any) -> Image.Image:
    from ..images import load_image

    if isinstance(image, Image.Image):
        return normalize_image_arg(image).convert("RGB")  # size limits, as load_image applies them
    return load_image(image).image


def route_rows(values: Sequence[Any]) -> list[Any] | None:
    """A routing column, or None when no row has a value (the memory then routes by the other one)."""
    return list(values) if any(v is not None for v in values) else None
