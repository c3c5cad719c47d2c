"""Embedded worlds: procedurally rendered scenes to edit, generated from a seed (nothing large committed).

==============  ==========================================================================
`render`        numpy-only drawing of shapes, patterns and nuisance factors (`render`, `Nuisance`)
`scenes`        `ScenesWorld`: subjects, question families with train / held-out phrasings, splits
`stream`        edit streams planned symbolically, and `check_stream` (no locality probe covered)
==============  ==========================================================================

See docs/worlds.md for the splits. The models trained on this world and the ``esg-memory eval --kind
scenes`` loader are issue #16's remaining parts.
"""

from .scenes import WORLD_VERSION, Family, ScenesWorld, Subject
from .stream import PlannedEdit, PlannedProbe, check_stream, plan_stream

__all__ = [
    "WORLD_VERSION",
    "Family",
    "PlannedEdit",
    "PlannedProbe",
    "ScenesWorld",
    "Subject",
    "check_stream",
    "plan_stream",
]
