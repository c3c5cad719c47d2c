"""esg-memory: scoped, instantly editable memory of corrections for frozen multimodal LLMs.

The heavy parts (torch, transformers, open_clip) load on first use of the name that needs
them, so ``import esg_memory`` stays cheap for tools that only read a memory directory.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import errors as _errors
from .errors import *  # noqa: F403  (the EsgMemoryError hierarchy)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "EditMemory": "memory",
    "MemoryConfig": "config",
    "Edit": "types",
    "EditVersion": "types",
    "Positive": "types",
    "RouteResult": "types",
    "KeyEncoder": "encoders",
    "ClipKeyEncoder": "encoders",
    "CompositeKeyEncoder": "encoders",
    "MiniLMTextEncoder": "encoders",
    "create_encoder": "encoders",
    "register_encoder": "encoders",
    "list_encoders": "encoders",
    "augment_image": "augment",
    "question_templates": "augment",
    "EditedModel": "model",
    "AdapterConfig": "config",
    "EditedModelConfig": "config",
    "load_base_model": "loading",
    "load_encoder": "loading",
    "JournalConfig": "config",
    "run_eval": "eval",
    "EvalConfig": "eval",
}

__all__ = [*_errors.__all__, "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'esg_memory' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
