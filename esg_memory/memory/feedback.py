"""Planning `EditMemory.feedback`: an observed input becomes negatives or a positive of edits it concerns.

Feedback is stored in the current version of each edit it concerns (`types.FeedbackProbe`), so
it is part of that edit's content: re-encoding and re-fitting it is an ordinary planned write, and
the result is still a function of the set of edits (deletion stays exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..types import EditVersion, FeedbackProbe
from .plan import Plan
from .state import EditVectors

__all__ = ["plan_feedback"]


def plan_feedback(
    plan: Plan,
    table: tuple[np.ndarray, np.ndarray],
    in_scope: list[int],
    expected: int | None,
    image: str | None,
    text: str | None,
    now: float,
    encode: Callable[[EditVersion], EditVectors],
) -> tuple[list[str], set[int]]:
    """Put the feedback on ``plan``; returns (what was done, edits to re-fit).

    ``in_scope``: every edit whose scope holds the input now. Each of them except ``expected``
    gets the input as a negative; ``expected``, if it misses the input, gets it as a positive.
    """
    actions: list[str] = []
    affected: set[int] = set()

    def add(eid: int, kind: str) -> None:
        st = plan.base[eid]  # the committed state: the overlay's neighbour sets are recomputed anyway
        probe = FeedbackProbe(kind=kind, text=text, image=image, created_at=now)
        v = replace(st.current, feedback=[*st.current.feedback, probe])
        new = replace(st, versions=(*st.versions[:-1], v), updated_at=now, vec=encode(v))
        affected.update(plan.set_vectors(new, table))

    for eid in sorted(e for e in in_scope if e != expected):
        add(eid, "negative")
        actions.append(f"edit {eid}: false activation, input added as a negative")
    if expected is not None and expected not in in_scope:
        add(expected, "positive")
        actions.append(f"edit {expected}: missed input added as a positive")
    return actions, affected
