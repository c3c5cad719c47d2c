"""Torch-free scoped vector index: edits (stable int64 ids) own unit keys with per-key cosine thresholds.

>>> from index import ScopedIndex, as_unit_rows, write_index, read_index
>>> ix = ScopedIndex(dim=512, backend="auto")
>>> q = as_unit_rows(queries, ix.dim)      # validated once, then used by every method as it is
>>> ix.maybe_in_scope(q), ix.search(q, k=8)

Also public: the crash-safe file helpers of `index.fs` (`atomic_directory`, `atomic_write_bytes`,
...) and the readers-writer lock of `index.sync` (`RWLock`), which `esg_memory` builds on.

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
from .results import SearchResult
from .rows import UnitRows, as_unit_rows
from .scoped import ScopedIndex, read_index, write_index
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
    "UnitRows",
    "UnknownIdError",
    "as_unit_rows",
    "atomic_directory",
    "atomic_write_bytes",
    "check_replaceable",
    "fsync_dir",
    "read_index",
    "read_regular_file",
    "recover_dir",
    "scan_error",
    "write_index",
]
