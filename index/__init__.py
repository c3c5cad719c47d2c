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
from .fs import (
    NotReplaceableError,
    atomic_directory,
    atomic_write_bytes,
    check_replaceable,
    fsync_dir,
    read_regular_file,
    recover_dir,
)
from .persist import FORMAT_VERSION
from .scoped import ScopedIndex, SearchResult
from .sync import RWLock

__all__ = [
    "FORMAT_VERSION",
    "DimensionError",
    "DuplicateIdError",
    "IndexConfig",
    "IndexFormatError",
    "InvalidArgumentError",
    "InvalidIdError",
    "InvalidVectorError",
    "NotReplaceableError",
    "RWLock",
    "ScopedIndex",
    "ScopedIndexError",
    "SearchResult",
    "ThresholdError",
    "UnknownIdError",
    "atomic_directory",
    "atomic_write_bytes",
    "check_replaceable",
    "fsync_dir",
    "read_regular_file",
    "recover_dir",
    "scan_error",
]
