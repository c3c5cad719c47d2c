"""A throwaway PostgreSQL server (Debian's ``postgresql`` binaries, no pytest): for the benchmarks, and
for the tests through ``tests/_postgres.py``.

``initdb`` on a temporary directory, listening only on a Unix socket there (``listen_addresses=''``),
so it never clashes with another server; ``fsync=off`` unless asked otherwise. As root (CI) the
binaries refuse to run, so they run through ``runuser -u postgres``. ``$ESG_PG_BIN`` names the
binaries' directory, else the newest ``/usr/lib/postgresql/<v>/bin``.
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

__all__ = ["PgServer", "pg_binaries"]

_count = itertools.count()


def pg_binaries() -> Path | None:
    env = os.environ.get("ESG_PG_BIN")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for c in reversed([env] if env else found):
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


class PgServer:
    """One server in a temp directory, for the lifetime of a run (`close` removes it); `stop` / `start`
    take it down and bring it back (the replica tests' store outage). ``bindir``: the binaries
    (default `pg_binaries`); ``fsync`` off unless asked (nothing here needs to survive a power cut)."""

    def __init__(self, bindir: Path | None = None, fsync: bool = False, prefix: str = "esg-pg-",
                 port_base: int = 25432) -> None:
        bindir = bindir or pg_binaries()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (apt-get install postgresql; or $ESG_PG_BIN)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.root / "data"
        self.port = port_base + os.getpid() % 1000
        self.fsync = fsync
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
        opts = (f"-k {self.root} -p {self.port} -c listen_addresses='' -c max_connections=200 "
                f"-c fsync={'on' if self.fsync else 'off'}")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.root}&port={self.port}"

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"db{os.getpid()}_{next(_count)}"
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
