"""The SQLite writers' file lock (db.WriteLockedConnection): held from
BEGIN IMMEDIATE until commit or rollback returned, by threads and by
processes alike, and let go when its holder dies."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from postvault.store.db import (
    WRITE_LOCK_SUFFIX,
    WRITE_OPTION,
    WriteLockedConnection,
    make_engine,
)


def _held(db: Path) -> bool:
    """Whether some connection holds the write lock now (an outside probe
    with its own open file, as another writer would take it)."""
    fd = os.open(f"{db}{WRITE_LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)




def test_a_write_transaction_holds_the_lock_until_commit_or_rollback(engine, tmp_path: Path) -> None:
    db = tmp_path / "pv.db"
    with engine.connect() as conn:
        assert isinstance(conn.connection.driver_connection, WriteLockedConnection)
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            conn.execute(text("INSERT INTO t VALUES (1)"))
            assert _held(db)
        assert not _held(db)
        with pytest.raises(RuntimeError), conn.begin():
            conn.execute(text("INSERT INTO t VALUES (2)"))
            assert _held(db)
            raise RuntimeError("roll back")
        assert not _held(db)
    # Reads never take it.
    with engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT count(*) FROM t"))
        assert not _held(db)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT x FROM t")).scalars().all() == [1]


def test_a_second_writer_thread_waits_for_the_first_commit(engine) -> None:
    order: list[str] = []
    first_in = threading.Event()
    release = threading.Event()

    def first() -> None:
        with engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                conn.execute(text("INSERT INTO t VALUES (1)"))
                first_in.set()
                release.wait(30)
                order.append("first commits")

    def second() -> None:
        first_in.wait(30)
        with engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                order.append("second begins")
                conn.execute(text("INSERT INTO t VALUES (2)"))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_in.wait(30)
    # The second writer cannot begin while the first holds the lock.
    threads[1].join(0.5)
    assert threads[1].is_alive() and order == []
    release.set()
    for t in threads:
        t.join(30)
    assert order == ["first commits", "second begins"]
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT x FROM t")).scalars()) == [1, 2]


_HOLDER = """
import sys, time
from sqlalchemy import text
from postvault.store.db import WRITE_OPTION, make_engine
e = make_engine(sys.argv[1])
with e.connect() as conn:
    conn.execution_options(**{WRITE_OPTION: True})
    with conn.begin():
        conn.execute(text("INSERT INTO t VALUES (7)"))
        print("holding", flush=True)
        time.sleep(120)
"""


def test_another_process_holding_the_lock_excludes_us_and_its_death_frees_it(engine, tmp_path: Path) -> None:
    db = tmp_path / "pv.db"
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, f"sqlite:///{db}"], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"holding"
        assert _held(db)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert not _held(db)
    # Its transaction died with it; ours goes ahead.
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            conn.execute(text("INSERT INTO t VALUES (8)"))
        assert conn.execute(text("SELECT x FROM t")).scalars().all() == [8]


def test_a_lock_held_too_long_is_given_up_after_the_busy_timeout(tmp_path: Path, monkeypatch) -> None:
    """A writer never waits for the lock forever: after BUSY_SECONDS it
    goes on under SQLite's own locking, as before the lock existed."""
    import time

    from postvault.store import db

    monkeypatch.setattr(db, "BUSY_SECONDS", 0.3)
    path = tmp_path / "pv.db"
    e = make_engine(f"sqlite:///{path}")
    try:
        with e.connect() as c:
            c.execute(text("CREATE TABLE t (x INTEGER)"))
            c.commit()
        # Someone holds the lock file but not the database (say, a writer
        # stuck outside its transaction).
        fd = os.open(f"{path}{WRITE_LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            started = time.monotonic()
            with e.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    conn.execute(text("INSERT INTO t VALUES (1)"))
            assert time.monotonic() - started >= 0.3
        finally:
            os.close(fd)
        with e.connect() as conn:
            assert conn.execute(text("SELECT x FROM t")).scalars().all() == [1]
    finally:
        e.dispose()


def test_a_nested_writer_in_the_same_thread_does_not_wait_for_its_own_lock(tmp_path: Path, monkeypatch) -> None:
    """Two write transactions at once in one thread cannot both go on in
    SQLite; the inner one fails after SQLite's busy timeout (as without the
    lock), not after a wait for the lock its own thread holds on top."""
    import time

    from sqlalchemy.exc import OperationalError

    from postvault.store import db

    monkeypatch.setattr(db, "BUSY_SECONDS", 60)
    e = make_engine(f"sqlite:///{tmp_path / 'pv.db'}")
    try:
        with e.connect() as c:
            c.execute(text("CREATE TABLE t (x INTEGER)"))
            c.commit()
        with e.connect() as outer:
            outer.execution_options(**{WRITE_OPTION: True})
            with outer.begin():
                outer.execute(text("INSERT INTO t VALUES (1)"))
                with e.connect() as inner:
                    # SQLite gives up after 0.2 s; the lock would make it wait 60 s.
                    inner.connection.driver_connection.execute("PRAGMA busy_timeout=200")
                    inner.execution_options(**{WRITE_OPTION: True})
                    started = time.monotonic()
                    with pytest.raises(OperationalError, match="locked"), inner.begin():
                        pass
                    assert time.monotonic() - started < 30
    finally:
        e.dispose()
