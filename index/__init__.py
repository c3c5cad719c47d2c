"""Torch-free scoped vector index: edits (stable int64 ids) own unit keys with per-key cosine thresholds.

>>> from index import ScopedIndex
>>> ix = ScopedIndex(dim=512, backend="auto")

See ``index/README.md`` for the API, the semantics of search/match and the on-disk format.
"""

from ._prune import scan_error
from .backends import IndexConfig
from .errors import (
    DimensionError,
    DuplicateIdError,
    IndexFormatError,
    InvalidArgumentError,
    InvalidIdError,
    InvalidVectorError,
    ScopedIndexError,
    ThresholdError,
    UnknownIdError,
)
from .persist import FORMAT_VERSION
from .scoped import ScopedIndex, SearchResult

__all__ = [
    "FORMAT_VERSION",
    "DimensionError",
    "DuplicateIdError",
    "IndexConfig",
    "IndexFormatError",
    "InvalidArgumentError",
    "InvalidIdError",
    "InvalidVectorError",
    "ScopedIndex",
    "ScopedIndexError",
    "SearchResult",
    "ThresholdError",
    "UnknownIdError",
    "scan_error",
]
