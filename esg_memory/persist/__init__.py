"""Persistence of an edit memory: plain snapshot directories, the write-ahead journal, durable directories.

================  ==========================================================================
`snapshot`        a memory as a versioned directory of plain data (`save_snapshot`, `read_snapshot`)
`journal`         the write-ahead journal: segments, the fsyncing writer, record encoding
`frames`          segment layout on disk: header, record frames, torn vs damaged tails
`replay`          journal records turned back into the one `Change` they made
`durable`         durable directories: writer lock, snapshot + journal, compaction, opening
================  ==========================================================================

It works on the memory's data (`esg_memory.memory.state`) and its vocabulary of writes
(`esg_memory.memory.ops`), and on a live memory only through `EditMemory`'s public methods.
"""

from .durable import SNAPSHOT, Durable, WriterLock, is_durable
from .journal import JOURNAL_VERSION
from .snapshot import FORMAT_VERSION, read_snapshot, save_snapshot

__all__ = [
    "FORMAT_VERSION",
    "JOURNAL_VERSION",
    "SNAPSHOT",
    "Durable",
    "WriterLock",
    "is_durable",
    "read_snapshot",
    "save_snapshot",
]
