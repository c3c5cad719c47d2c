"""A real PostgreSQL server for the replica tests: Debian's ``postgresql`` binaries, one per test session.

The server itself is `benchmarks/_postgres_server.py`'s `PgServer` (one recipe for tests and
benchmarks): a temporary directory, a Unix socket there, ``runuser -u postgres`` as root.
`PgServer.database()` creates a fresh database per test. Without the binaries the tests skip —
except when ``$CI`` is set, where they fail: `.ci/run` installs the ``postgresql`` package, so a
missing server there is a broken CI.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from benchmarks._postgres_server import PgServer, pg_binaries

__all__ = ["PgServer", "pg_binaries", "start_server"]


def missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(reason)


def start_server() -> PgServer:
    bindir = pg_binaries()
    if bindir is None:
        missing("no PostgreSQL server binaries (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install 'esg-memory[postgres]')")
    try:
        return PgServer(bindir, prefix="esg-test-pg-", port_base=15432)
    except (subprocess.CalledProcessError, OSError, KeyError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        missing(f"could not start PostgreSQL: {detail.strip()[:300]}")
        raise
