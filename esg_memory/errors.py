"""The typed errors every public esg-memory call raises on bad input or bad state.

One root (`EsgMemoryError`) so callers can catch everything the library refuses, and
subclasses that also derive from the matching builtin (`ValueError`, `KeyError`, ...)
so ordinary ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DuplicateEditError",
    "EncoderMismatchError",
    "EsgMemoryError",
    "FormatError",
    "ImageError",
    "InternalError",
    "InvalidInputError",
    "LockError",
    "ModelMismatchError",
    "StaleStateError",
    "StoreUnavailableError",
    "TuningError",
    "UnknownEditError",
    "UnsupportedModelError",
    "VersionError",
]


class EsgMemoryError(Exception):
    """Root of every error esg-memory raises on purpose."""


class InvalidInputError(EsgMemoryError, ValueError):
    """An argument has the wrong type, shape, dtype or value (empty question, NaN key, ...)."""


class ImageError(InvalidInputError):
    """An image is missing, undecodable, too large, or outside the allowed root."""


class UnknownEditError(EsgMemoryError, KeyError):
    """No edit (or no such version of an edit) has this id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown edit"


class DuplicateEditError(EsgMemoryError, ValueError):
    """An id that already exists (or existed: ids are never reused) was given again; ``edit_id`` names it
    when the memory knows which."""

    def __init__(self, message: str, edit_id: int | None = None):
        super().__init__(message)
        self.edit_id = edit_id


class VersionError(EsgMemoryError, ValueError):
    """A rollback or revision names a version that does not exist."""


class EncoderMismatchError(EsgMemoryError, ValueError):
    """Saved keys were made by another encoder (name, dim) or for another model than the one in use."""


class ModelMismatchError(EncoderMismatchError):
    """A saved edited-model directory was made for another base model (architecture or weights)."""


class FormatError(EsgMemoryError, ValueError):
    """A saved file is truncated, corrupted, foreign, or written by a newer format version."""


class UnsupportedModelError(EsgMemoryError, TypeError):
    """The model's architecture is not in the families registry."""


class ConfigError(EsgMemoryError, ValueError):
    """A configuration value is out of range or inconsistent."""


class LockError(EsgMemoryError, RuntimeError):
    """Another writer holds the memory directory's lock."""


class TuningError(EsgMemoryError, RuntimeError):
    """Adapter tuning could not run (no trainable target, non-finite loss, ...)."""


class InternalError(EsgMemoryError, RuntimeError):
    """The library's own state broke an invariant (`EditMemory.verify`): a bug to report, not bad input."""


class StoreUnavailableError(EsgMemoryError, ConnectionError):
    """The shared store (PostgreSQL) cannot be reached: the write was not applied (reads go on)."""


class StaleStateError(EsgMemoryError, RuntimeError):
    """Another replica kept moving the shared log past the state a write was planned on (retries used up)."""
