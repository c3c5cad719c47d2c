"""Opening a memory on a PostgreSQL store, and moving memories between a directory and a store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import StoreConfig
from ..errors import ConfigError
from ..persist.journal import live_records
from ..persist.replay import replay
from .log import SharedLog
from .pack import pack_snapshot, unpack_snapshot
from .store import Store

__all__ = ["migrate", "open_store"]

logger = logging.getLogger("esg_memory.replicas")


def _config(config: Any) -> StoreConfig:
    config = StoreConfig() if config is None else config
    if not isinstance(config, StoreConfig):
        raise ConfigError(f"a PostgreSQL memory takes a StoreConfig, not {type(config).__name__}")
    return config


def _all_records(store: Store, after: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while True:
        got = store.records_after(after)
        if not got:
            return out
        out += got
        after = got[-1][0]


def open_store(
    cls: Any,
    url: str,
    encoder: Any = None,
    *,
    backend: str | None = None,
    readonly: bool = False,
    config: Any = None,
    seed: Any = None,
    follow: bool = True,
) -> Any:
    """`EditMemory.open` on a ``postgresql://`` URL: the store's newest snapshot plus the log after it.

    A store holding no memory yet starts from ``seed`` (an `EditMemory`, e.g. one with a locality
    pool) or an empty memory over ``encoder``; when several replicas start at once the first snapshot
    stored wins and all of them load it. ``follow``: start the thread applying other replicas' writes.
    """
    config = _config(config)
    store = Store(url, config)
    try:
        store.ensure_schema(create=not readonly)
        got = store.latest_snapshot()
        if got is None:
            if readonly:
                raise ConfigError(f"{store.safe_url} holds no memory yet (open it writable, or migrate)")
            if seed is None and encoder is None:
                raise ConfigError(f"{store.safe_url} holds no memory yet; pass encoder= to create one")
            first = seed if seed is not None else cls(encoder, backend=backend or "flat")
            store.put_snapshot(0, pack_snapshot(first.snapshot(), {"lsn": 0, "lineage": store.lineage}))
            got = store.latest_snapshot()
        seq, packed = got  # type: ignore[misc]
        snap = unpack_snapshot(packed, encoder, backend, f"{store.safe_url} snapshot {seq}")
        rows = _all_records(store, seq)
        change = replay(snap.edits, int(snap.encoder.dim), live_records(rows))
        mem = cls.from_snapshot(snap, replayed=change)
        log = SharedLog(store, rows[-1][0] if rows else seq, readonly, config)
        mem.set_journal(log)
        if follow:
            log.start_following(mem)
        logger.info("opened %s: snapshot %d + %d log records, %d edits",
                    store.safe_url, seq, len(rows), len(mem))
        return mem
    except BaseException:
        store.close()
        raise


def migrate(cls: Any, source: str | Path, target: str | Path, encoder: Any = None) -> int:
    """Copy the memory at ``source`` to ``target`` (a directory and a ``postgresql://`` URL, either way).

    Into a store: the store must hold no memory yet; the memory becomes its first snapshot. Into a
    directory: a durable directory at the store's head. Returns the number of edits moved. Routing of
    the copy is identical (the same snapshot bytes are read back).
    """
    from .store import is_store_url

    src_pg, dst_pg = is_store_url(source), is_store_url(target)
    if src_pg == dst_pg:
        raise ConfigError("migrate moves a memory between a directory and a postgresql:// store")
    if dst_pg:
        mem = cls.load(Path(source), encoder)
        store = Store(str(target))
        try:
            store.ensure_schema()
            taken = ConfigError(f"{store.safe_url} already holds a memory; migrate into an empty database")
            if store.latest_snapshot() is not None or store.head():
                raise taken
            # first snapshot wins: a replica (or another migration) that got there after the check above
            if not store.put_snapshot(0, pack_snapshot(mem.snapshot(), {"lsn": 0, "lineage": store.lineage})):
                raise taken
        finally:
            store.close()
        return len(mem)
    dst = Path(target)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"{dst} is not empty; migrate into a new directory")
    mem = open_store(cls, str(source), encoder, readonly=True, follow=False)
    log = mem.journal
    try:
        # detached from the (read-only) log, `save` settles deletes the log left pending in memory,
        # as `EditMemory.load` does for a directory; journaling that settle would be refused
        mem.set_journal(None)
        mem.save(dst)
        with cls.open(dst, mem.encoder):  # made durable, as `serve` and the CLI use it
            pass
        return len(mem)
    finally:
        log.close(mem)
