"""Where a run's time goes, per edit and by stage (issue #16 asks for the cost per edit by stage).

`TimedEncoder` wraps the run's key encoder (duck-typed, like every encoder the memory takes) and adds
up the seconds spent in it; `StageClock` adds up named stages. The runner splits each write into
``encode`` (the key encoder inside the memory's write), ``scope`` (the rest of the write: scope fit,
neighbour re-fits, index, the compiled adapter), ``tune`` (the adapter tuned to its answer) and the
scoring into ``probe_immediate`` / ``probe_retention``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StageClock", "TimedEncoder"]


class TimedEncoder:
    """Forwards to ``encoder``; ``seconds`` is the time spent in its ``encode*`` calls."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._encoder, name)
        if not (name.startswith("encode") and callable(attr)):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


class StageClock:
    """Seconds and counts per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.counts[name] += 1

    def report(self, n_edits: int) -> dict[str, Any]:
        """Per stage: total seconds, calls, and seconds per added edit."""
        return {
            k: {
                "seconds": round(v, 3),
                "calls": self.counts[k],
                "per_edit_s": round(v / n_edits, 4) if n_edits else None,
            }
            for k, v in sorted(self.seconds.items())
        }
