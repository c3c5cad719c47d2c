"""The wrapper's saved configuration and its per-row routing explanation (see `esg_memory.model`)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import AdapterConfig, EditedModelConfig, TuneMode
from .errors import FormatError

__all__ = ["EditedModelConfig", "Retrieval", "TuneMode", "config_from_meta"]


@dataclass(frozen=True)
class Retrieval:
    """Why one row did or did not get an edit."""

    row: int
    edit_id: int
    """-1 when no edit is in scope."""
    version: int
    score: float
    threshold: float
    margin: float
    answer: str | None
    """The edit's answer when in scope."""
    explanation: str


def config_from_meta(meta: dict) -> EditedModelConfig:
    try:
        cfg = EditedModelConfig(**meta.get("config", {}))
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise FormatError(f"saved wrapper config is invalid: {exc}") from None
    if not isinstance(cfg.adapters, AdapterConfig):
        raise FormatError("saved wrapper config is invalid: 'adapters' must be an object")
    return cfg
