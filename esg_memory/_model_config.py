"""The wrapper's saved configuration and its per-row routing explanation (see `esg_memory.model`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .adapters import AdapterConfig
from .errors import ConfigError, FormatError

__all__ = ["EditedModelConfig", "Retrieval", "TuneMode", "config_from_meta"]

TuneMode = Literal["never", "sync", "background"]


@dataclass
class EditedModelConfig:
    """Wrapper behaviour; saved next to the memory by :meth:`EditedModel.save`."""

    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    """How adapters are compiled, tuned and stored."""
    tune: TuneMode = "never"
    """Default for ``add_edit(tune=None)``."""
    n_paraphrases: int = 4
    """Generated question rewrites (``question_templates``) added to the tuning examples."""
    n_augmented_images: int = 2
    """Generated views of the edit image (``augment_image``) added to the tuning examples."""

    def __post_init__(self) -> None:
        if isinstance(self.adapters, dict):
            self.adapters = AdapterConfig(**self.adapters)
        if self.tune not in ("never", "sync", "background"):
            raise ConfigError(f"tune must be 'never', 'sync' or 'background', not {self.tune!r}")
        if self.n_paraphrases < 0 or self.n_augmented_images < 0:
            raise ConfigError("n_paraphrases and n_augmented_images must be >= 0")


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
