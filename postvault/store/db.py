"""Database engine, sessions and schema migrations.

One place makes the SQLAlchemy engine for a store URL and brings the schema
to the current Alembic revision; ``postvault`` calls ``upgrade`` on start.
SQLite runs in WAL mode with ``synchronous=FULL``: a commit that returned is
on disk, which is what lets us acknowledge a message only once it is stored.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
WRITE_OPTION = "postvault_write"
# How long a writer waits for the database (SQLite's busy timeout, and the
# writers' lock's; see WriteLockedConnection).
BUSY_SECONDS = 30
# Beside the database file: the writers' lock (WriteLockedConnection); empty.
WRITE_LOCK_SUFFIX = "-writelock"


def make_engine(url: str) -> Engine:
    """Engine for ``url`` with the pragmas our durability promises need."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_engine(url, connect_args=sqlite_connect_args())
        event.listen(engine, "connect", sqlite_pragmas)
        # pysqlite's own transaction handling is off (see sqlite_pragmas);
        # a unit of work that writes starts with BEGIN IMMEDIATE so that two
        # writers serialize at the start instead of one failing at commit
        # (UID allocation relies on it); reads take a deferred BEGIN and never
        # block writers under WAL.
        event.listen(engine, "begin", sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def sqlite_connect_args() -> dict[str, object]:
    """sqlite3.connect's arguments for every connection of ours (also the
    kept read connections of fastread.py)."""
    return {"timeout": BUSY_SECONDS, "factory": WriteLockedConnection}


def sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see above)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
    # Freed pages are zeroed so deleted rows don't linger in the file.
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


def sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    # A write: the execution option, or, on a kept connection (fastread),
    # the flag its current user set (cheaper than changing options twice).
    immediate = conn.get_execution_options().get(WRITE_OPTION, False) or conn.info.get(WRITE_OPTION, False)
    if not immediate:
        conn.exec_driver_sql("BEGIN")
        return
    raw = conn.connection.driver_connection
    locking = isinstance(raw, WriteLockedConnection)
    if locking:
        raw.lock_for_write()
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        if locking:
            raw.unlock_write()
        raise


def is_sqlite_file(database: str) -> bool:
    """Whether a SQLite database name is a plain file (not in memory, not a
    URI), so that other connections to it, and a file beside it, are its."""
    return database not in ("", ":memory:") and not database.startswith("file:")


_THREAD = threading.local()


def _held_locks() -> dict[str, int]:
    """Write locks this thread holds, by lock file (see lock_for_write)."""
    held: dict[str, int] | None = getattr(_THREAD, "held", None)
    if held is None:
        held = _THREAD.held = {}
    return held


class WriteLockedConnection(sqlite3.Connection):
    """A sqlite3 connection whose write transactions queue on a file lock.

    SQLite admits one writer; a second one's ``BEGIN IMMEDIATE`` waits in
    SQLite's busy handler, which sleeps in steps of 1, 2, 5, 10, ... ms and
    looks again, so a waiting writer (another process's, with ``[smtp]
    processes`` > 1, or another thread's) wakes up to several milliseconds
    after the lock was free. Each write transaction here first takes an
    exclusive ``flock`` on ``<database>-writelock`` (one open file per
    connection, so threads of one process exclude each other too) and
    releases it once ``commit`` or ``rollback`` returned; a waiter finds it
    free within a millisecond (``lock_for_write``). SQLite's own lock still
    decides; this only orders the writers that use it (a program that does
    not use it waits in the busy handler as before). The lock goes with the
    open file: a process that dies holding it releases it.
    """

    def __init__(self, database, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(database, *args, **kwargs)
        name = os.fspath(database)
        self._lock_path = name + WRITE_LOCK_SUFFIX if is_sqlite_file(name) else None
        self._lock_fd: int | None = None
        self._locked = False
        self._held_by: dict[str, int] = {}

    def lock_for_write(self) -> None:
        """Take the writers' lock, waiting at most ``BUSY_SECONDS``.

        Never a blocking ``flock`` without a limit: a writer that waits for
        another thread's result inside its transaction would then hang for
        good where SQLite alone gives up after the busy timeout. So: look,
        then look again after 0.1, 0.2, 0.4, ... ms, at most 1 ms apart
        (SQLite's handler: 1, 2, 5, 10, ... 100 ms). After ``BUSY_SECONDS``
        the transaction goes on without the lock, into SQLite's busy
        handler, as before this lock existed. A thread that holds the lock
        through another connection does not wait for itself.
        """
        if self._lock_path is None or self._locked:
            return
        held = _held_locks()
        if held.get(self._lock_path):
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        delay, deadline = 0.0001, None
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + BUSY_SECONDS
                elif now >= deadline:
                    log.warning("the database write lock stayed taken for %d s; going on without it", BUSY_SECONDS)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 0.001)
        self._locked = True
        held[self._lock_path] = held.get(self._lock_path, 0) + 1
        self._held_by = held

    def unlock_write(self) -> None:
        if self._locked:
            self._locked = False
            # The locking thread's count, whichever thread unlocks (a pool
            # may close a connection from another thread).
            self._held_by[self._lock_path] -= 1  # type: ignore[index]
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)  # type: ignore[arg-type]

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.unlock_write()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.unlock_write()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.unlock_write()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    command.upgrade(alembic_config(engine), "head")


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One write transaction: committed on success, rolled back on any error."""
    with factory() as session, session.begin():
        session.connection(execution_options={WRITE_OPTION: True})
        yield session
