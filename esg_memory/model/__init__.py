"""The wrapper: a frozen multimodal LLM whose answers follow an edit memory, and everything it injects.

================  ==================================================================================
`wrapper`         `EditedModel`: construction and loading, the edit writes, tuning jobs, answers, save
`inject`          the read path: inputs -> routing -> per-row prefixes -> the base call (never writes)
`cache`           which adapter an edit version injects in this process (stored or compiled here)
`adapters`        the stored adapter format (safetensors bytes) and its sizes
`runtime`         an adapter made usable by one model: compiled, materialised as K/V (LRU), tuned
`tuning`          tuning a prefix with the base frozen, and the examples it must answer
`jobs`            checking an edit's own input and tuning it (foreground or background), and its status
`status`          `EditStatus` per (edit, version): ``gives_answer``, ``tuning``
`chat`            ``messages=`` conversations: the chat template, and the row each is routed by
`placement`       ``to`` / ``cuda`` / ``half`` ...: the base model moved or cast, the key encoder moved
`families`        per-architecture facts and the mechanics of injecting a per-row K/V prefix
`identity`        ``edited_model.json``: which base model and encoder a directory was saved for
================  ==================================================================================

When adapters are compiled: a write through the wrapper (`EditedModel.add_edit`, ``revise_edit``,
``rollback_edit``, and wrapping a memory that can be written) compiles and attaches the adapter
before it returns; ``generate`` / ``forward`` / ``retrieve`` never write, and compile an adapter they
find missing into the process's cache only.
"""

from __future__ import annotations

from ..config import EditedModelConfig
from .adapters import ADAPTER_FORMAT_VERSION, ADAPTER_KIND, Adapter, adapter_bytes, soft_rank_for
from .families import (
    FAMILIES,
    Family,
    ModelSpec,
    PrefixKV,
    get_family,
    make_cache,
    reference_configs,
    register_family,
    supported_model_types,
)
from .runtime import AdapterRuntime
from .status import EditStatus
from .tuning import TuneReport, tune_prefix, tuning_examples
from .wrapper import EditedModel, Retrieval

__all__ = [
    "ADAPTER_FORMAT_VERSION",
    "ADAPTER_KIND",
    "FAMILIES",
    "Adapter",
    "AdapterRuntime",
    "EditStatus",
    "EditedModel",
    "EditedModelConfig",
    "Family",
    "ModelSpec",
    "PrefixKV",
    "Retrieval",
    "TuneReport",
    "adapter_bytes",
    "get_family",
    "make_cache",
    "reference_configs",
    "register_family",
    "soft_rank_for",
    "supported_model_types",
    "tune_prefix",
    "tuning_examples",
]
