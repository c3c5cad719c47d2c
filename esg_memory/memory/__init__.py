"""The edit memory: edits, their versions, learned scopes, routing and exact deletion.

===================  ==========================================================================
`memory`             `EditMemory`, the facade: locks, committed state, the writes, delegation
`state`              the data: `EditState`, `EditVectors`, `LocalityPool`, `MemorySnapshot`
`ops`                the vocabulary of writes: `Op`s and the `Change` each makes
`committed`          `Committed`: the committed state and the one place a `Change` is installed
`plan`               `Plan`: a write planned on a copy-on-write overlay (neighbours, re-fits)
`encode`             `EditEncoder`: an edit's inputs, the pool and cross negatives as keys
`inputs`             parsing write arguments (ids, images, positives, metadata)
`router`             `Router`: which edit's scope holds each input (reads only)
`settle`             two-phase delete: `WriterMutex`, the background `Settler`
`feedback`           planning `EditMemory.feedback`
`tables`             planning caches: cross blocks per pair, candidate vectors per edit
===================  ==========================================================================
"""

from ..validate import MAX_TEXT_CHARS
from .memory import EditMemory
from .state import MemorySnapshot

__all__ = ["MAX_TEXT_CHARS", "EditMemory", "MemorySnapshot"]
