"""A real PostgreSQL server for the replica tests: Debian's ``postgresql`` binaries, one per test session.

`PgServer` runs ``initdb`` / ``pg_ctl`` on a temporary directory, listening only on a Unix socket in
that directory (``listen_addresses=''``), so tests never clash with another server. As root (CI) the
binaries refuse to run, so they run through ``runuser -u postgres``. `PgServer.database()` creates a
fresh database per test. Without the binaries the tests skip — except when ``$CI`` is set, where they
fail: `.ci/run` installs the ``postgresql`` package, so a missing server there is a broken CI.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

__all__ = ["PgServer", "pg_binaries"]

_count = itertools.count()


def pg_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` holding initdb and pg_ctl (or $ESG_PG_BIN)."""
    env = os.environ.get("ESG_PG_BIN")
    found = glob.glob("/usr/lib/postgresql/*/bin")
    cands = [env] if env else sorted(found, key=lambda p: int(Path(p).parent.name))
    for c in reversed(cands):
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(reason)


class PgServer:
    """One server in a temp directory; `stop` / `start` let tests take it down and bring it back."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="esg-pg-"))
        self.data = self.root / "data"
        self.port = 15432 + os.getpid() % 1000
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o755)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        opts = f"-k {self.root} -p {self.port} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.root}&port={self.port}"

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(_count)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def terminate_backends(self, db_url: str) -> int:
        """Cut every connection to ``db_url``'s database (a network cut, as the replicas see it)."""
        import psycopg

        db = db_url.split("/")[3].split("?")[0]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (db,),
            ).fetchall()
        return len(rows)

    def close(self) -> None:
        self.stop("immediate")
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)


def start_server() -> PgServer:
    bindir = pg_binaries()
    if bindir is None:
        missing("no PostgreSQL server binaries (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install 'esg-memory[postgres]')")
    try:
        return PgServer(bindir)
    except (subprocess.CalledProcessError, OSError, KeyError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        missing(f"could not start PostgreSQL: {detail.strip()[:300]}")
        raise
