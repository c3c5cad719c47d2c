"""The scenes world's locality pool: inputs no edit of any stream may answer, for a memory to learn from.

Every pair is a ``pool``-split subject (never edited, never trained on, never a probe's subject) in a
training-nuisance rendering, asked one of its families in a train phrasing. So the pool is realistic
(the world's own questions on the world's own kind of pictures) and disjoint from every probe by
construction: a memory's scope and a global threshold's calibration see no test input.
"""

from __future__ import annotations

import random

from .scenes import ScenesWorld

__all__ = ["POOL_FIRST_RENDERING", "scenes_locality_pool"]

#: Pool renderings use indices from here on (streams draw theirs below 1000, training from 1000 up to
#: 10**6 on other subjects).
POOL_FIRST_RENDERING = 2_000_000


def scenes_locality_pool(
    world: ScenesWorld | None = None, n: int = 256, seed: int = 0
) -> list[tuple[bytes, str]]:
    """``n`` (PNG bytes, question) pairs on ``pool``-split subjects (module docstring), seeded."""
    world = world or ScenesWorld()
    rng = random.Random(seed)
    subjects = [s for s in world.subjects if world.subject_split(s) == "pool"]
    picked = rng.sample(subjects, min(n, len(subjects)))
    out = []
    for k, s in enumerate(picked):
        fam = rng.choice(world.families(s))
        out.append((world.png(s, "train", POOL_FIRST_RENDERING + k), rng.choice(fam.train)))
    return out
