"""Threads adding, revising and deleting edits while others route and generate: checked serially.

See `tests/_concurrency_oracle.py` for the oracle: every read must be explained by some serial
state within the window of writes it overlapped, and no thread may raise.
"""

from __future__ import annotations

import pytest
from _concurrency_oracle import run_concurrency_check
from _model_fixtures import one_thread, tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def test_concurrent_writes_reads_and_generation_match_a_serial_oracle():
    model, proc = tiny("llava")
    rep = run_concurrency_check(model, proc, seed=0, n_writes=30, min_reads=6)
    assert not rep.errors, rep.errors
    assert not rep.violations, "\n".join(rep.violations[:20])
    # the check must have had something to check: writes interleaved with both kinds of reads
    assert rep.writes == 30 and rep.routes_checked >= 12 and rep.generations_checked >= 12
    assert rep.injections >= 1, "no generation ran with an edit injected"
