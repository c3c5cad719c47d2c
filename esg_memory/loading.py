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

import json
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
    "require_accelerate",
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


def load_base_model(
    spec: str | Path,
    *,
    device: Any = None,
    dtype: str | None = None,
    device_map: Any = None,
    **hf_kwargs: Any,
) -> tuple[Any, Any]:
    """``(model, processor)`` for a registered name, a local directory or an HF id (eval mode).

    ``device``: a torch device the model is moved to (``"cuda"``, ``"cuda:1"``, ``"cpu"``); ``dtype``: one
    of `esg_memory.config.MODEL_DTYPES` (``"float32"``, ``"float16"``, ``"bfloat16"``); ``device_map``:
    transformers' big-model placement (``"auto"``, a device, or a ``{module: device}`` dict), which needs
    the ``accelerate`` package (``pip install 'esg-memory[accelerate]'``) and excludes ``device``. All are
    checked before anything is loaded (`ConfigError`). ``hf_kwargs`` go to transformers'
    ``from_pretrained`` (a registered name's own loader takes none).
    """
    torch_dtype, torch_device = _placement(device, dtype, device_map)
    key = str(spec)
    if key in MODEL_SPECS:
        model, processor = MODEL_SPECS.get(key)()
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device_map is not None:
            model = _dispatch(model, device_map)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .model import get_family

        kwargs = dict(hf_kwargs)
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype  # transformers 5's name (``torch_dtype`` before)
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            from transformers import AutoConfig

            get_family(AutoConfig.from_pretrained(key).model_type)
            model = AutoModelForImageTextToText.from_pretrained(key, **kwargs)
            processor = AutoProcessor.from_pretrained(key)
        except OSError as e:
            raise ConfigError(
                f"cannot load model {key!r}: not a registered name ({', '.join(list_model_specs())}), "
                f"not a local model directory, and not reachable on the hub ({e})"
            ) from None
    if torch_device is not None:
        model = model.to(torch_device)
    return model.eval(), processor


def _placement(device: Any, dtype: str | None, device_map: Any) -> tuple[Any, Any]:
    """``(torch dtype, torch device)`` of `load_base_model`'s arguments, or `ConfigError` (loads nothing)."""
    from .config import check_model_dtype

    if dtype is not None:
        check_model_dtype(dtype)
    if device is not None and device_map is not None:
        raise ConfigError("pass either a device or a device_map (--device or --device-map), not both")
    if device_map is not None:
        require_accelerate("a device_map")
        if not isinstance(device_map, dict) and device_map not in _DEVICE_MAP_STRATEGIES:
            _torch_device(device_map, "device_map")  # a single device ("cuda:0", 0): checked now
    if device is None and dtype is None:
        return None, None
    import torch

    torch_device = None if device is None else _torch_device(device)
    return (None if dtype is None else getattr(torch, dtype)), torch_device


def model_placement(device: str | None = None, dtype: str | None = None,
                    device_map: str | None = None) -> dict[str, Any]:
    """``--device`` / ``--dtype`` / ``--device-map`` checked (`ConfigError`, before any model is loaded)
    and turned into `esg_memory.loading.load_base_model` keywords (only those given).

    ``dtype``: float32, float16 or bfloat16 (transformers 5's ``from_pretrained(dtype=)``, a cast for a
    registered model). ``device``: a torch device; a CUDA one must be available. ``device_map``:
    ``"auto"``, ``"balanced"``, ``"sequential"``, a device, or a JSON ``{module: device}`` object; it
    needs the ``accelerate`` package (``pip install 'esg-memory[accelerate]'``) and excludes ``device``.
    Both command lines (``esg-memory ...`` and ``serve``) read their options through this one function.
    """
    from .config import check_model_dtype

    out: dict[str, Any] = {}
    if dtype is not None:
        out["dtype"] = check_model_dtype(dtype, "--dtype")
    if device is not None and device_map is not None:
        raise ConfigError("pass either --device or --device-map, not both")
    if device_map is not None:
        require_accelerate("--device-map")
        out["device_map"] = _device_map(device_map)
    if device is not None:
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"bad --device {device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device!r}: CUDA is not available on this machine")
        out["device"] = str(dev)
    return out


def _device_map(text: str) -> Any:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--device-map must be a non-empty string")
    if not text.lstrip().startswith("{"):
        return text.strip()
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--device-map is not a JSON object ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError("--device-map must be a strategy, a device or a JSON object")
    return value


def require_accelerate(what: str) -> None:
    """`ConfigError` naming the extra when the ``accelerate`` package is not installed."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{what} needs the accelerate package: pip install 'esg-memory[accelerate]'"
        ) from None


_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _dispatch(model: Any, device_map: Any) -> Any:
    """A model built in memory (a registered name) placed by ``device_map`` as ``from_pretrained`` would."""
    if isinstance(device_map, dict):
        from accelerate import dispatch_model

        return dispatch_model(model, device_map=device_map)
    if isinstance(device_map, str) and device_map in _DEVICE_MAP_STRATEGIES:
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        placed = infer_auto_device_map(model, no_split_module_classes=no_split)
        return dispatch_model(model, device_map=placed)
    return model.to(_torch_device(device_map, "device_map"))


def _torch_device(value: Any, what: str = "device") -> Any:
    import torch

    try:
        return torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"bad {what} {value!r}: {e}") from None


def load_encoder(spec: str | None = None, device: Any = None) -> Any:
    """A key encoder from a spec (see :func:`esg_memory.encoders.create_encoder`), on ``device`` when given
    (its ``to(device)``: the device changes, its float32 dtype does not)."""
    from .encoders import create_encoder

    encoder = create_encoder(spec or DEFAULT_ENCODER)
    if device is not None:
        move = getattr(encoder, "to", None)
        if not callable(move):
            raise ConfigError(f"encoder {spec or DEFAULT_ENCODER!r} cannot be placed on a device")
        move(_torch_device(device))
    return encoder


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
