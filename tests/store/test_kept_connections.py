"""Snapshots on a SQLite file read through one kept connection per thread
(store/fastread._KeptConnections): each snapshot still sees every commit made
before it and none made during it, nested snapshots work, and the kept
connections close with the engine and with their threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from postvault.store import fastread
from postvault.store.db import make_engine


def _insert(engine: Engine, x: int) -> None:
    with engine.connect() as c:
        c.execute(text("INSERT INTO t VALUES (:x)"), {"x": x})
        c.commit()


def _count(conn) -> int:  # type: ignore[no-untyped-def]
    return int(fastread._raw(conn, "SELECT count(*) FROM t", [])[0][0])


def _driver(conn):  # type: ignore[no-untyped-def]
    return conn.connection.driver_connection


def test_a_thread_keeps_one_connection_outside_the_pool_and_sees_each_commit(engine: Engine) -> None:
    with fastread.snapshot(engine) as a:
        first = _driver(a)
        assert engine.pool.checkedout() == 0  # not taken from the main pool
        assert _count(a) == 0
    _insert(engine, 1)
    with fastread.snapshot(engine) as b:
        assert _driver(b) is first
        assert _count(b) == 1  # a new snapshot sees the commit before it


def test_a_snapshot_does_not_see_a_commit_made_during_it(engine: Engine) -> None:
    _insert(engine, 1)
    with fastread.snapshot(engine) as conn:
        assert _count(conn) == 1
        _insert(engine, 2)
        assert _count(conn) == 1
    with fastread.snapshot(engine) as conn:
        assert _count(conn) == 2


def test_a_nested_snapshot_reads_on_another_connection(engine: Engine) -> None:
    _insert(engine, 1)
    with fastread.snapshot(engine) as outer:
        with fastread.snapshot(engine) as inner:
            assert _driver(inner) is not _driver(outer)
            assert _count(inner) == 1
        assert _count(outer) == 1
    with fastread.snapshot(engine) as again:
        assert _driver(again) is _driver(outer)


def test_threads_have_their_own_and_an_ended_threads_is_closed(engine: Engine) -> None:
    seen = []

    def read() -> None:
        with fastread.snapshot(engine) as conn:
            seen.append(_driver(conn))
            _count(conn)

    t = threading.Thread(target=read)
    t.start()
    t.join(30)
    with fastread.snapshot(engine) as mine:  # a new kept connection: the ended thread's goes
        assert _driver(mine) is not seen[0]
    with pytest.raises(sqlite3.ProgrammingError):
        seen[0].execute("SELECT 1")


def test_disposing_the_engine_closes_the_kept_connections(engine: Engine) -> None:
    with fastread.snapshot(engine) as conn:
        kept = _driver(conn)
    engine.dispose()
    with pytest.raises(sqlite3.ProgrammingError):
        kept.execute("SELECT 1")
    # The engine still works after dispose, with a new kept connection.
    _insert(engine, 5)
    with fastread.snapshot(engine) as conn:
        assert _driver(conn) is not kept and _count(conn) == 1


def test_a_failed_read_drops_its_connection(engine: Engine) -> None:
    from sqlalchemy.exc import OperationalError

    with fastread.snapshot(engine) as conn:
        first = _driver(conn)
    with pytest.raises(OperationalError), fastread.snapshot(engine) as conn:
        fastread._raw(conn, "SELECT * FROM no_such_table", [])
    with fastread.snapshot(engine) as conn:
        assert _driver(conn) is not first
        assert _count(conn) == 0


def test_in_memory_databases_use_the_pool(tmp_path: Path) -> None:
    e = make_engine("sqlite://")
    try:
        assert fastread._kept_connections(e) is None
        with fastread.snapshot(e) as conn:
            assert fastread._raw(conn, "SELECT 1", []) == [(1,)]
    finally:
        e.dispose()


def test_a_write_on_the_kept_connection_takes_the_writers_lock_and_leaves_it_clean(engine: Engine,
                                                                                   tmp_path: Path) -> None:
    import fcntl
    import os

    from postvault.store.db import WRITE_LOCK_SUFFIX, WRITE_OPTION

    def lock_taken() -> bool:
        fd = os.open(f"{tmp_path / 'pv.db'}{WRITE_LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    with fastread.snapshot(engine) as conn:
        kept = _driver(conn)
    with fastread.kept_connection(engine, write=True) as conn:
        assert _driver(conn) is kept
        with conn.begin():
            conn.execute(text("INSERT INTO t VALUES (1)"))
            assert lock_taken() and _driver(conn).in_transaction
        assert not lock_taken()
    # The next user of the connection reads: a deferred BEGIN, no lock.
    with fastread.kept_connection(engine) as conn:
        assert _driver(conn) is kept and not conn.info[WRITE_OPTION]
        with conn.begin():
            assert _count(conn) == 1
            assert not lock_taken()
    with fastread.snapshot(engine) as conn:
        assert _driver(conn) is kept and _count(conn) == 1
    # A pooled connection (the thread's own is busy) writes the same way.
    with fastread.kept_connection(engine) as outer, fastread.kept_connection(engine, write=True) as conn:
        assert _driver(conn) is not _driver(outer)
        with conn.begin():
            conn.execute(text("INSERT INTO t VALUES (2)"))
            assert lock_taken()
    with fastread.snapshot(engine) as conn:
        assert _count(conn) == 2


def test_disposing_while_another_thread_reads_closes_its_connection_after_the_read(engine: Engine) -> None:
    inside, go_on = threading.Event(), threading.Event()
    got: list[object] = []

    def read() -> None:
        with fastread.snapshot(engine) as conn:
            got.append(_driver(conn))
            inside.set()
            go_on.wait(30)
            got.append(_count(conn))  # still open: the dispose waited for this read

    t = threading.Thread(target=read)
    t.start()
    assert inside.wait(30)
    engine.dispose()
    go_on.set()
    t.join(30)
    assert got[1] == 0
    with pytest.raises(sqlite3.ProgrammingError):
        got[0].execute("SELECT 1")  # type: ignore[attr-defined]
