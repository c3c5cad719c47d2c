"""`Registry`: the one mechanism behind every table of named things (open_clip's registry of named configs).

Model families (by ``model_type``), key encoders (by spec name), base-model specs and shipped models
are each one `Registry` instance in the module that owns them; a name is looked up the same way
everywhere, an unknown one gets the same typed error naming every known name, and a name is never
replaced silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import ConfigError, EsgMemoryError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind.

    ``kind`` names the entries in error messages ("model family", "encoder"); ``unknown_error`` is
    raised for a name that is not registered (its message lists the registered ones), ``ConfigError``
    for a bad or duplicate name.
    """

    def __init__(self, kind: str, unknown_error: type[EsgMemoryError] = ConfigError) -> None:
        self.kind = kind
        self.unknown_error = unknown_error
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: T, *, overwrite: bool = False) -> T:
        """Add ``value`` under ``name``; refuses to replace an existing entry unless ``overwrite``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} name must be a non-empty string, not {name!r}")
        if name in self._entries and not overwrite:
            raise ConfigError(
                f"a {self.kind} named {name!r} is already registered (overwrite=True replaces it)"
            )
        self._entries[name] = value
        return value

    def get(self, name: object) -> T:
        """The entry registered as ``name``; ``unknown_error`` naming the registered ones otherwise."""
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        raise self.unknown_error(f"{self.kind} {name!r} is not registered; known: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
