"""Serving replicas sharing one edit memory through PostgreSQL (`esg_memory.replicas`), on a real server.

Convergence bit for bit under concurrent writers (compare-and-append conflicts forced, re-plans
counted), a revise racing a delete, propagation through the follower, compaction into a snapshot
row, migration directory <-> store, the server going down and coming back, cut connections,
read-only replicas, and the typed errors of opening. Timings are only ever bounds to wait within.
"""

from __future__ import annotations

import logging
import threading

import psycopg
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image
from _replica_fixtures import (
    ENC,
    StaleCounter,
    close_all,
    edit_spec,
    keys_state,
    log_ops,
    open_all,
    routing,
    saved_state,
    wait_until,
)

from esg_memory.config import JournalConfig, StoreConfig
from esg_memory.errors import (
    ConfigError,
    EncoderMismatchError,
    FormatError,
    StaleStateError,
    StoreUnavailableError,
    UnknownEditError,
)
from esg_memory.memory import EditMemory
from esg_memory.replicas import Store, migrate, open_store
from esg_memory.replicas.store import _hung_up

FAST = StoreConfig(staleness_bound_s=0.5, poll_s=0.1, connect_timeout_s=1.0)


@pytest.fixture
def mems():
    """Memories a test opens; closed at teardown even when it fails."""
    opened: list[EditMemory] = []
    yield opened
    close_all(opened)


def opened(mems: list, *new: EditMemory) -> list[EditMemory]:
    mems.extend(new)
    return list(new)


def head(url: str) -> int:
    s = Store(url)
    try:
        return s.head()
    finally:
        s.close()


def at_head(*ms: EditMemory) -> None:
    """Every memory settled and caught up with the log (background settlers may still append: retried)."""
    url = ms[0].journal.store.url

    def caught_up() -> bool:
        for m in ms:
            if not m.journal.readonly:
                m.settle()
            m.sync()
        n = head(url)
        return all(m.journal.applied == n and not m.pending_refits for m in ms)

    wait_until(caught_up, what="every replica at the head of the log")


# ------------------------------------------------------------------------------------ convergence
def test_concurrent_writers_on_three_replicas_converge_bit_for_bit(pg_url, tmp_path, monkeypatch, mems):
    # each writer's first append is held until all three planned on the same position: two must re-plan
    counter = StaleCounter(monkeypatch, hold=3)
    reps = opened(mems, *open_all(pg_url, 3))
    errors: list[BaseException] = []

    def work(i: int, m: EditMemory) -> None:
        try:
            mine = [m.add(**edit_spec(3 * k + i, tag=f"r{i}")) for k in range(3)]
            mine += m.add_many([edit_spec(9 + i, tag=f"r{i}"), edit_spec(12 + i, tag=f"r{i}")])
            m.revise(mine[0], answer=f"revised by {i}")
            m.attach(mine[1], "adapter", f"adapter of replica {i}".encode())
            m.feedback(shape_image("red", "circle"), "what colour is the circle?", None)
            m.delete(mine[2])
            m.add(None, f"who wrote book {i}?", f"writer {i}")
        except BaseException as e:  # reported below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, m), name=f"writer-{i}") for i, m in enumerate(reps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert counter.stale >= 2  # the held first appends collided: the writes were re-planned, not lost
    for m in reps:
        m.settle()  # deletes settled by whichever replica gets there first; the others catch up
    at_head(*reps)
    n = head(pg_url)
    # every position written exactly once, by compare-and-append
    assert sorted(seq for seq, _ in counter.appended) == list(range(1, n + 1))
    ops = [op["op"] for op in log_ops(pg_url)]
    assert ops.count("delete") == 3 and ops.count("new_version") == 3 and ops.count("attach") == 3
    assert len(reps[0]) == 3 * 5 - 3 + 3
    states = [saved_state(m, tmp_path) for m in reps]
    assert states[0] == states[1] == states[2]
    routes = [routing(m) for m in reps]
    assert routes[0] == routes[1] == routes[2]
    # and a replica starting now, from the store alone (snapshot + the whole log), is the same memory
    fresh = opened(mems, EditMemory.open(pg_url, ENC))[0]
    assert saved_state(fresh, tmp_path) == states[0] and routing(fresh) == routes[0]
    for m in reps:
        m.verify()


def test_a_revise_racing_a_delete_of_the_same_edit(pg_url, tmp_path, mems):
    # the two orders, made deterministic with replicas that only catch up when told (no follower)
    a, b = opened(mems, *(open_store(EditMemory, pg_url, ENC, follow=False) for _ in range(2)))
    ids = a.add_many([edit_spec(k) for k in range(4)])
    b.sync()
    a.delete(ids[0])  # b has not seen it: b's revise is planned on a state that still has the edit
    with pytest.raises(UnknownEditError):
        b.revise(ids[0], answer="too late")
    b.revise(ids[1], answer="revised first")  # a has not seen it: a's delete is re-planned after it
    a.delete(ids[1])
    at_head(a, b)
    ops = [(op["op"], op.get("edit_id")) for op in log_ops(pg_url)]
    assert ("new_version", ids[0]) not in ops
    assert ops.index(("new_version", ids[1])) < ops.index(("delete", ids[1]))
    a.settle()
    at_head(a, b)
    assert ids[0] not in b and ids[1] not in b and saved_state(a, tmp_path) == saved_state(b, tmp_path)

    # and truly concurrent, through the followers: whichever wins, the outcome is one of the two above
    c, d = opened(mems, *open_all(pg_url, 2))
    seen = set()
    for r in range(4):
        x = c.add(**edit_spec(10 + r))
        wait_until(lambda x=x: x in d, what="the add to reach the other replica")
        gate, got = threading.Barrier(2, timeout=20), {}

        def revise(x=x, r=r, gate=gate, got=got) -> None:
            gate.wait()
            try:
                got["revise"] = d.revise(x, answer=f"revised {r}")
            except UnknownEditError:
                got["revise"] = "unknown"

        def delete(x=x, gate=gate) -> None:
            gate.wait()
            c.delete(x)

        ts = [threading.Thread(target=revise), threading.Thread(target=delete)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=30)
        at_head(c, d)
        assert x not in c and x not in d
        on_x = [op["op"] for op in log_ops(pg_url) if op.get("edit_id") == x]
        assert on_x == (["delete"] if got["revise"] == "unknown" else ["new_version", "delete"])
        seen.add(got["revise"] == "unknown")
    c.settle()
    at_head(a, b, c, d)
    states = [saved_state(m, tmp_path) for m in (a, b, c, d)]
    assert all(s == states[0] for s in states)


def test_an_add_on_one_replica_reaches_the_others(pg_url, mems):
    a, b = opened(mems, *open_all(pg_url, 2, journal=FAST))
    x = a.add(**edit_spec(0))
    wait_until(lambda: x in b, what="the add on a to reach b")
    assert b.get(x) == a.get(x) and routing(b) == routing(a)
    assert int(b.route(images=[shape_image("red", "circle", shift=1)], texts=["what colour is the circle?"])
               .edit_ids[0]) == x
    a.revise(x, answer="new answer")
    wait_until(lambda: b.get(x).version == 2, what="the revise to reach b")
    assert b.get(x).answer == "new answer"
    y = b.add(**edit_spec(1))  # and the other way round
    wait_until(lambda: y in a, what="the add on b to reach a")
    a.delete(x)
    wait_until(lambda: x not in b, what="the delete to reach b")
    wait_until(lambda: a.journal.health()["healthy"] and b.journal.health()["healthy"], what="health")
    h = b.journal.health()
    assert h["store"] == "ok" and h["applied"] == head(pg_url) and b.journal.follower.applied_records >= 3


# ------------------------------------------------------------------------------------ snapshots, migration
def test_compact_stores_a_snapshot_row_new_replicas_start_from(pg_url, tmp_path, mems, caplog):
    a, b = opened(mems, *open_all(pg_url, 2))
    ids = a.add_many([edit_spec(k) for k in range(5)])
    b.sync()
    b.revise(ids[1], answer="revised on b")
    a.sync()
    a.delete(ids[2])
    seq = a.compact()
    assert seq == head(pg_url) and seq >= 3
    with psycopg.connect(pg_url) as conn:
        assert [r[0] for r in conn.execute("SELECT seq FROM esg_snapshot ORDER BY seq")] == [seq]
    b.sync()
    b.add(**edit_spec(7))
    b.attach(ids[0], "adapter", b"after the snapshot")
    caplog.set_level(logging.INFO, logger="esg_memory.replicas")
    c = opened(mems, EditMemory.open(pg_url, ENC))[0]
    assert f"snapshot {seq} + 2 log records" in caplog.text  # the snapshot row, then only what follows it
    at_head(a, b, c)
    states = [saved_state(m, tmp_path) for m in (a, b, c)]
    assert states[0] == states[1] == states[2]
    assert c.attachment(ids[0], "adapter") == b"after the snapshot"

    # a replica behind the log, holding a delete it left to settle, compacts too: it catches up first
    d = opened(mems, open_store(EditMemory, pg_url, ENC, follow=False))[0]
    d.set_settle("manual")
    d.delete(ids[3])
    assert d.pending_refits
    a.sync()
    a.add(**edit_spec(8))  # settles d's delete and moves the log on: d is stale
    seq2 = d.compact()
    assert seq2 == head(pg_url)
    at_head(a, b, c, d)
    fresh = opened(mems, EditMemory.open(pg_url, ENC))[0]
    assert saved_state(fresh, tmp_path) == saved_state(d, tmp_path)
    # (d's settle mode is part of the snapshot it stored; routing is the same under every mode)
    assert routing(fresh) == routing(a) and keys_state(fresh) == keys_state(a)


def test_migrate_a_directory_into_a_store_and_back(pg_url, tmp_path, mems):
    src = tmp_path / "src"
    with EditMemory.open(src, ENC) as m:
        ids = m.add_many([edit_spec(k) for k in range(5)])
        m.revise(ids[0], answer="changed")
        m.attach(ids[1], "adapter", b"moved along")
        m.delete(ids[2])
    ref = EditMemory.load(src, ENC)
    assert migrate(EditMemory, src, pg_url, ENC) == 4
    s = opened(mems, EditMemory.open(pg_url, ENC))[0]
    assert routing(s) == routing(ref) and keys_state(s) == keys_state(ref)
    assert saved_state(s, tmp_path) == saved_state(ref, tmp_path)
    assert s.attachment(ids[1], "adapter") == b"moved along"
    with pytest.raises(ConfigError):
        migrate(EditMemory, src, pg_url, ENC)  # the store holds a memory already
    with pytest.raises(ConfigError):
        migrate(EditMemory, src, tmp_path / "elsewhere", ENC)  # directory to directory

    s.add(**edit_spec(6))
    t = opened(mems, open_store(EditMemory, pg_url, ENC, follow=False))[0]
    t.set_settle("manual")
    victim = max((e.id for e in t.list()), key=lambda i: (len(t.holders(i)), -i))
    t.delete(victim)  # left pending in the log: the copy settles it, as loading a directory does
    wait_until(lambda: s.pending_refits, what="s to follow the delete")
    out = tmp_path / "out"
    assert migrate(EditMemory, pg_url, out, ENC) == 4
    s.settle()
    back = EditMemory.load(out, ENC)
    assert routing(back) == routing(s) and keys_state(back) == keys_state(s)
    assert saved_state(back, tmp_path) == saved_state(s, tmp_path)
    with EditMemory.open(out, ENC) as durable:  # a durable directory, ready for `serve`
        assert durable.durable_path == out.resolve()
    with pytest.raises(ConfigError):
        migrate(EditMemory, pg_url, out, ENC)  # not into a non-empty directory


# ------------------------------------------------------------------------------------ failures
def test_store_down_refuses_writes_keeps_reads_then_recovers(pg_server, pg_url, tmp_path, mems):
    a, b = opened(mems, *open_all(pg_url, 2, journal=FAST))
    ids = a.add_many([edit_spec(k) for k in range(3)])
    wait_until(lambda: len(b) == 3, what="b to catch up")
    wait_until(lambda: a.journal.health()["healthy"], what="a healthy")
    before, routed = saved_state(a, tmp_path), routing(a)
    pg_server.stop()
    try:
        with pytest.raises(StoreUnavailableError):
            a.add(**edit_spec(5))
        with pytest.raises(StoreUnavailableError):
            a.revise(ids[0], answer="not now")
        with pytest.raises(StoreUnavailableError):
            b.delete(ids[1])
        assert saved_state(a, tmp_path) == before and routing(a) == routed == routing(b)  # reads go on
        assert ids[1] in b
        h = wait_until(lambda: (h := a.journal.health())["store"] == "unreachable" and not h["healthy"] and h,
                       what="a to report the store unreachable and itself unhealthy")
        assert h["stale_s"] > FAST.staleness_bound_s and h["last_error"]
    finally:
        pg_server.start()
    for m in (a, b):
        wait_until(lambda m=m: m.journal.health()["healthy"], what="the follower to reconnect")
        assert m.journal.health()["store"] == "ok"
    x = a.add(**edit_spec(6))
    wait_until(lambda: x in b, what="a write after the restart to reach b")
    at_head(a, b)
    assert saved_state(a, tmp_path) == saved_state(b, tmp_path) and len(a) == 4


def test_cut_connections_are_reopened(pg_server, pg_url, mems):
    a = opened(mems, EditMemory.open(pg_url, ENC, journal=FAST))[0]
    b = opened(mems, open_store(EditMemory, pg_url, ENC, config=FAST, follow=False))[0]
    x = b.add(**edit_spec(0))  # b's only connection is its write connection, open and idle now
    wait_until(lambda: x in a, what="a to follow")
    conn = b.journal.store._conn
    assert pg_server.terminate_backends(pg_url) >= 2
    wait_until(lambda: _hung_up(conn), what="the server to drop b's connection")
    y = b.add(**edit_spec(1))  # the next write runs on a new connection instead of failing
    wait_until(lambda: y in a, what="a's follower to reconnect and apply")
    z = a.add(**edit_spec(2))  # a's write connection was cut too
    b.sync()
    assert z in b and len(a) == len(b) == 3
    wait_until(lambda: a.journal.health()["healthy"] and a.journal.health()["store"] == "ok", what="health")


def test_a_readonly_replica_refuses_writes_and_follows(pg_url, tmp_path, mems):
    a = opened(mems, EditMemory.open(pg_url, ENC))[0]
    ids = a.add_many([edit_spec(k) for k in range(3)])
    r = opened(mems, EditMemory.open(pg_url, ENC, readonly=True))[0]
    assert len(r) == 3
    for write in (lambda: r.add(**edit_spec(4)), lambda: r.revise(ids[0], answer="x"),
                  lambda: r.delete(ids[0]), lambda: r.attach(ids[0], "adapter", b"x"), r.compact):
        with pytest.raises(ConfigError):
            write()
    assert head(pg_url) == a.journal.applied
    x = a.add(**edit_spec(5))
    wait_until(lambda: x in r, what="the read-only replica to follow")
    a.revise(ids[0], answer="revised")
    wait_until(lambda: r.get(ids[0]).version == 2, what="the revise to reach the read-only replica")
    assert routing(r) == routing(a) and saved_state(r, tmp_path) == saved_state(a, tmp_path)
    assert r.journal.health()["healthy"]

    # a read-only replica may log in with a role that can only read
    role = "ro_" + pg_url.split("/")[3].split("?")[0]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    ro_url = pg_url.replace("postgres@", f"{role}@")
    with pytest.raises(ConfigError):
        EditMemory.open(ro_url, ENC)  # writable: that role may not
    r2 = opened(mems, EditMemory.open(ro_url, ENC, readonly=True))[0]
    y = a.add(**edit_spec(6))
    wait_until(lambda: y in r2, what="the read-only role's replica to follow")
    assert routing(r2) == routing(a)


def _pending_delete(url: str, mems: list) -> tuple[EditMemory, list[int]]:
    """A writer that deleted an edit with holders and left its re-fit pending (settle="manual")."""
    a = opened(mems, EditMemory.open(url, ENC))[0]
    a.set_settle("manual")
    ids = a.add_many([edit_spec(k) for k in (0, 2, 4)])
    a.delete(max(ids, key=lambda i: (len(a.holders(i)), -i)))
    assert a.pending_refits
    return a, ids


# A snapshot settles pending deletes first: a read-only replica settles a copy in memory (it cannot log
# a settle); a replica behind the log re-plans its settle on the caught-up state (`Writer.when_settled`).
def test_a_readonly_replica_saves_while_a_delete_is_pending(pg_url, tmp_path, mems):
    a, _ = _pending_delete(pg_url, mems)
    r = opened(mems, EditMemory.open(pg_url, ENC, readonly=True))[0]
    assert r.pending_refits
    early = saved_state(r, tmp_path / "r")
    alive = [e.id for e in r.list()]
    seen = {i: r.history(i) for i in alive}
    assert r.pending_refits  # the replica itself still follows the log: the writer's settle is to come
    a.settle()
    wait_until(lambda: not r.pending_refits)
    later, mine = saved_state(r, tmp_path / "r2"), saved_state(a, tmp_path / "a")
    mine["memory.json"]["config"]["settle"] = later["memory.json"]["config"]["settle"]  # a's own mode: local
    assert early == later == mine  # the copy r settled in memory is the state the writer's settle logged
    assert seen == {i: a.history(i) for i in alive}


def test_a_replica_behind_the_log_saves_while_a_delete_is_pending(pg_url, tmp_path, mems):
    a, _ = _pending_delete(pg_url, mems)
    b = opened(mems, open_store(EditMemory, pg_url, ENC, follow=False))[0]
    assert b.pending_refits
    a.add(**edit_spec(9))  # settles the delete and adds: b, still holding it pending, is behind
    saved_state(b, tmp_path)


def test_opening_errors_are_typed(pg_server, pg_url, tmp_path):
    with pytest.raises(StoreUnavailableError) as e:
        EditMemory.open("postgresql://postgres@127.0.0.1:1/nothing", ENC)
    assert isinstance(e.value, ConnectionError)
    with pytest.raises(StoreUnavailableError):
        EditMemory.open(f"postgresql://postgres@/nothing?host={tmp_path / 'no-socket-here'}", ENC)
    with pytest.raises(ConfigError):
        EditMemory.open(pg_url, readonly=True)  # an empty store: nothing to read
    with pytest.raises(ConfigError):
        EditMemory.open(pg_url)  # an empty store and no encoder to create a memory with
    with pytest.raises(ConfigError):
        EditMemory.open(pg_url, ENC, journal=JournalConfig())  # a directory's config
    with pytest.raises(ConfigError):
        Store("/not/a/url")
    with EditMemory.open(pg_url, ENC) as m:
        m.add(**edit_spec(0))
    with pytest.raises(EncoderMismatchError):
        EditMemory.open(pg_url, HashKeyEncoder(dim=32, image_weight=0.5))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE esg_schema SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(FormatError, match="schema version 99"):
        EditMemory.open(pg_url, ENC)
    other = pg_server.database()
    with psycopg.connect(other, autocommit=True) as conn:
        conn.execute("CREATE TABLE esg_schema (name text PRIMARY KEY, value text NOT NULL)")
        conn.execute("INSERT INTO esg_schema VALUES ('format', 'something-else')")
    with pytest.raises(FormatError):
        EditMemory.open(other, ENC)


def test_a_write_the_store_keeps_refusing_changes_nothing(pg_url, tmp_path, mems, monkeypatch):
    a = opened(mems, EditMemory.open(pg_url, ENC, journal=StoreConfig(max_replans=3)))[0]
    a.add_many([edit_spec(k) for k in range(3)])
    before, n, tries = saved_state(a, tmp_path), head(pg_url), []

    def always_stale(self, seq, op, record):
        tries.append(seq)
        raise StaleStateError(f"log position {seq} was taken by another writer")

    monkeypatch.setattr(Store, "append", always_stale)
    with pytest.raises(StaleStateError):  # planned max_replans times, then given up
        a.add(**edit_spec(4))
    assert tries == [n + 1] * 3
    monkeypatch.undo()
    assert saved_state(a, tmp_path) == before and head(pg_url) == n
    assert a.add(**edit_spec(4)) == 3  # nothing of the refused write was left behind


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://esg:s3cret@db:5432/esg", "postgresql://esg@db:5432/esg"),
        ("postgresql://esg@db/esg?password=s3cret&sslmode=require", "postgresql://esg@db/esg?password=***&sslmode=require"),
        ("postgresql://u:p@ss@/db?host=/run/pg&PASSWORD=x", "postgresql://u@/db?host=/run/pg&password=***"),
        ("postgresql:///esg?host=/tmp", "postgresql:///esg?host=/tmp"),
    ],
)
def test_messages_never_show_the_password(url, shown):
    assert Store(url).safe_url == shown
