"""Embedded worlds: procedurally rendered scenes to edit, generated from a seed (nothing large committed).

==============  ==========================================================================
`render`        numpy-only drawing of shapes, patterns and nuisance factors (`render`, `Nuisance`)
`scenes`        `ScenesWorld`: subjects, question families with train / held-out phrasings, splits
`stream`        edit streams planned symbolically, and `check_stream` (no locality probe covered)
`pool`          `scenes_locality_pool`: never-edited, never-probed inputs a memory may learn from
==============  ==========================================================================

See docs/worlds.md for the splits; ``scripts/train_scenes_models.py`` trains the shipped models of this
world (``esg-scenes-clip``, ``esg-scenes-llava``); ``esg-memory eval --kind scenes`` edits it.
"""

from .pool import scenes_locality_pool
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
    "scenes_locality_pool",
]
