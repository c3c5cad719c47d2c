"""SIGKILL a journaling writer at random moments (dozens of trials); nothing acknowledged is lost.

The harness (`benchmarks/_crash.py`) runs each writer in a child process and checks, after each
kill, that every acknowledged write is present with its version, the write in flight is whole or
absent, the index matches the records, every edit routes its own input, and a new writer recovers
the directory (torn tail dropped, compaction leftovers cleaned)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _crash import run_crash_trials


def test_kills_at_random_moments_lose_nothing(tmp_path):
    stats = run_crash_trials(16, seed=11, workdir=tmp_path, ops=20)
    assert stats["problems"] == []
    assert stats["trials"] == 16 and stats["kills"] >= 13
    assert stats["lost"] == 0 and stats["partial"] == 0
    assert stats["acknowledged"] > 100 and stats["recovered"] == stats["acknowledged"]


def test_kills_during_compaction_lose_nothing(tmp_path):
    # a 2 KB threshold compacts after nearly every write, so most kills land inside a compaction
    stats = run_crash_trials(8, seed=5, workdir=tmp_path, ops=12, compact_bytes=2048, max_delay_s=0.03)
    assert stats["problems"] == []
    assert stats["lost"] == 0 and stats["partial"] == 0
    assert stats["kills_during_compaction"] >= 1
