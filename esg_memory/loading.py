"""Resolve the model and encoder names users type (CLI, service, eval, demo) into objects.

Model specs, open_clip-style (a registered name, or anything transformers' ``from_pretrained``
takes):

- ``"tiny-llava"`` / ``"esg-easyvqa-llava"``: the embedded default, a small LLaVA trained on
  easy-vqa and shipped inside the package;
- ``"esg-scenes-llava"``: a small LLaVA trained on the scenes world (`esg_memory.worlds`), shipped too;
- ``"tiny-random-llava"``, ``"tiny-random-llava_next"``, ``"tiny-random-qwen2_vl"``,
  ``"tiny-random-qwen2_5_vl"``: seeded random tiny models built from configs (mechanics only);
- an HF model id or a local directory.

The names live in ``MODEL_SPECS``, one `esg_memory.registry.Registry` like every name table of the
library; encoder specs are `esg_memory.encoders.create_encoder`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .registry import Registry

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_MODEL",
    "MODEL_SPECS",
    "list_model_specs",
    "load_base_model",
    "load_encoder",
    "new_memory",
    "register_model_spec",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny-llava"
DEFAULT_ENCODER = "esg-easyvqa-clip"

#: Named base models: ``factory() -> (model, processor)`` (the shipped ones are registered below).
MODEL_SPECS: Registry[Callable[[], tuple[Any, Any]]] = Registry("model spec")


def register_model_spec(name: str, factory: Callable[[], tuple[Any, Any]]) -> None:
    """Make ``name`` loadable by :func:`load_base_model`; ``factory()`` returns ``(model, processor)``.

    A name registered again is pointed at the new factory (so a user can put their own loader behind
    a shipped name), as it always has been.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("a model spec name must be a non-empty string")
    MODEL_SPECS.register(name, factory, overwrite=True)


def _shipped(name: str) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:
        from .pretrained import load_shipped_llava

        return load_shipped_llava(name)

    return load


def _random(model_type: str) -> Callable[[], tuple[Any, Any]]:
    def build() -> tuple[Any, Any]:
        from .tiny import build_tiny

        return build_tiny(model_type)

    return build


register_model_spec("tiny-llava", _shipped("esg-easyvqa-llava"))
register_model_spec("esg-easyvqa-llava", _shipped("esg-easyvqa-llava"))
register_model_spec("esg-scenes-llava", _shipped("esg-scenes-llava"))
for _mt in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"):
    register_model_spec(f"tiny-random-{_mt}", _random(_mt))


def list_model_specs() -> list[str]:
    """Every registered model spec name, sorted."""
    return MODEL_SPECS.names()


def load_base_model(spec: str | Path, **hf_kwargs: Any) -> tuple[Any, Any]:
    """``(model, processor)`` for a registered name, a local directory or an HF id (eval mode)."""
    key = str(spec)
    if key in MODEL_SPECS:
        model, processor = MODEL_SPECS.get(key)()
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .model import get_family

        try:
            from transformers import AutoConfig

            get_family(AutoConfig.from_pretrained(key).model_type)
            model = AutoModelForImageTextToText.from_pretrained(key, **hf_kwargs)
            processor = AutoProcessor.from_pretrained(key)
        except OSError as e:
            raise ConfigError(
                f"cannot load model {key!r}: not a registered name ({', '.join(list_model_specs())}), "
                f"not a local model directory, and not reachable on the hub ({e})"
            ) from None
    return model.eval(), processor


def load_encoder(spec: str | None = None) -> Any:
    """A key encoder from a spec (see :func:`esg_memory.encoders.create_encoder`)."""
    from .encoders import create_encoder

    return create_encoder(spec or DEFAULT_ENCODER)


def new_memory(encoder: Any, encoder_spec: str | None = None, locality_pool: Any = None) -> Any:
    """An empty `EditMemory` for ``encoder``, with its domain's locality pool and recommended config
    when the encoder is a shipped CLIP (``esg-easyvqa-clip``: the shipped easy-vqa pool;
    ``esg-scenes-clip``: the scenes world's pool), so "same question, other picture" negatives can be
    given; the library defaults otherwise. ``locality_pool``: that domain pool, when the caller already
    holds it (the eval harness's dataset does), so it is not read or rendered again."""
    from .memory import EditMemory

    spec = encoder_spec or DEFAULT_ENCODER
    if spec == "esg-easyvqa-clip":
        from .pretrained import easyvqa_locality_pool, easyvqa_memory_config

        pool = easyvqa_locality_pool() if locality_pool is None else locality_pool
        return EditMemory(encoder, config=easyvqa_memory_config(), locality_pool=pool)
    if spec == "esg-scenes-clip":
        from .pretrained import scenes_memory_config
        from .worlds import scenes_locality_pool

        pool = scenes_locality_pool() if locality_pool is None else locality_pool
        return EditMemory(encoder, config=scenes_memory_config(), locality_pool=pool)
    return EditMemory(encoder, locality_pool=locality_pool)
