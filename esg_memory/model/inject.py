"""Injection: a wrapped call routed row by row, in-scope rows given their edit's prefix, then the base call.

`Injector.call` is the whole read path of ``EditedModel.generate`` / ``forward`` in one function, from
the caller's arguments to ``base.generate(**kwargs)``: build inputs (when given images and prompts),
route the rows with ``memory.route_ids``, and either hand the caller's own arguments to the base model
untouched (no row in scope: the out-of-scope path, bit-identical to the bare model) or add each
in-scope row's K/V prefix (`esg_memory.model.families`) and call it with those. It reads the memory
and never writes it: the prefixes come from `EditedModel.adapter`, which compiles a missing adapter
into the process's cache only (`esg_memory.model.cache`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import InvalidInputError
from ..validate import check_text, normalize_image_arg
from .families import Family, PrefixKV

__all__ = ["Injector"]


class Injector:
    """The read path of one wrapped model: inputs, routing, per-row prefixes, the base call."""

    def __init__(self, base_model: Any, processor: Any, family: Family,
                 prefix: Callable[[int], PrefixKV | None]):
        self.base_model = base_model
        self.processor = processor
        self.family = family
        self.prefix = prefix
        """K/V injected for a routed edit (its current adapter's); None once the edit is deleted."""

    def build_inputs(self, images: Sequence[Any] | None, prompts: Sequence[str]) -> dict[str, Any]:
        """Processor outputs for (image, prompt) rows, left-padded, on the model's device and dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidInputError(f"prompts must be a string or a list, not {type(prompts).__name__}")
        for j, p in enumerate(prompts):
            if isinstance(p, str) and not p.isascii():
                check_text(p, f"prompts[{j}]")  # lone surrogates would reach the tokenizer as a TypeError
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        pil = None if images is None else [None if im is None else _pil(im) for im in images]
        enc = self.family.build_inputs(self.processor, pil, prompts)
        dev, dt = self.base_model.device, self.base_model.dtype
        return {
            k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) if isinstance(v, torch.Tensor) else v
            for k, v in enc.items()
        }

    def call(self, memory: Any, generate: bool, images: Any, prompts: Any, route_images: Any,
             route_texts: Any, route_keys: Any, kwargs: dict[str, Any], disabled: bool) -> Any:
        """``base.generate(**kwargs)`` (``generate``) or ``base(**kwargs)`` with each in-scope row's edit.

        ``memory`` is read at every call (a caller may swap it); ``disabled``: `disable_edits` is on.
        """
        base = self.base_model.generate if generate else self.base_model
        if prompts is not None:  # the wrapper builds the inputs, so it routes by what it built them from
            if "input_ids" in kwargs or "inputs_embeds" in kwargs:
                raise InvalidInputError("pass either prompts= (and images=) or processor outputs, not both")
            kwargs = {**self.build_inputs(images, prompts), **kwargs}
            if route_images is None and route_texts is None and route_keys is None:
                route_texts = [prompts] if isinstance(prompts, str) else prompts
                if images is not None:
                    route_images = images if isinstance(images, (list, tuple)) else [images]
        elif images is not None:
            raise InvalidInputError("images= needs prompts=")
        if disabled or len(memory) == 0:
            return base(**kwargs)  # nothing can be injected: the base model handles (or rejects) the call
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise InvalidInputError("edited calls need input_ids of shape (batch, length)")
        n = int(ids.shape[0])
        # ids only (no explanations): `route_ids` rules out, with one scan of key margins, every row no
        # scope can hold before any candidate search, so an unedited input costs about one key scan.
        # The memory validates the rows' content once; only their count is the wrapper's to check.
        if route_keys is not None:
            routed = memory.route_ids(keys=route_keys)
            if len(routed) != n:
                raise InvalidInputError(f"routing gave {len(routed)} rows for a batch of {n}")
        elif route_images is not None or route_texts is not None:
            imgs = None if route_images is None else list(route_images)
            txts = None if route_texts is None else list(route_texts)
            if (imgs is not None and len(imgs) != n) or (txts is not None and len(txts) != n):
                raise InvalidInputError(f"route_images/route_texts must have one entry per row ({n})")
            routed = memory.route_ids(images=imgs, texts=txts)
        else:
            raise InvalidInputError(
                "cannot route this call: use generate(images=..., prompts=...) or pass route_texts="
                " (and route_images=) or route_keys= with processor outputs;"
                " disable_edits() runs the bare model"
            )
        if not (routed >= 0).any():
            return base(**kwargs)  # the common case: the caller's own arguments, the very same objects
        # each routed edit's prefix at the version current now (a revision since routing is not
        # injected stale; an edit deleted since routing gives none)
        plan = [None if e < 0 else self.prefix(e) for e in routed.tolist()]
        if all(p is None for p in plan):
            return base(**kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise InvalidInputError("edited calls need input_ids (inputs_embeds are not supported)")
        if "cache" in kwargs or "past_key_values" in kwargs:
            raise InvalidInputError("a caller-supplied cache cannot be combined with an edit prefix")
        repeat = 1
        if generate:  # generate expands every tensor input per beam / returned sequence, not a cache
            gc = kwargs.get("generation_config") or self.base_model.generation_config
            beams = int(kwargs.get("num_beams") or gc.num_beams or 1)
            repeat = max(beams, int(kwargs.get("num_return_sequences") or gc.num_return_sequences or 1))
        edited = self.family.prefix_kwargs(self.base_model, kwargs, plan, cache_repeat=repeat)
        edited.pop("past_key_values", None)
        return base(**edited)


def _pil(image: Any) -> Any:
    from PIL import Image

    from ..images import load_image

    if isinstance(image, Image.Image):
        return normalize_image_arg(image).convert("RGB")  # size limits, as load_image applies them
    return load_image(image).image
