"""Hot reads of the SMTP path run on the sqlite3 connection directly.

A one-row SELECT through SQLAlchemy Core costs about 0.3 ms of CPU here
(the connection's BEGIN through its "begin" event, the execution context,
parameter and result processing), against about 0.02 ms for the same
statement on the sqlite3 connection; the submission server makes four
such reads per message (address book at MAIL, the account at RCPT, the
owners and the office allowances at DATA).

``FastSelect`` wraps one Core SELECT, built once, and compiles it once for
SQLite. ``run(engine, params)`` executes it on the pooled connection's
sqlite3 object inside ``BEGIN ... ROLLBACK`` (one snapshot, exactly as the
Core read's deferred transaction) and returns named rows; ``rows(conn,
params)`` does the same inside the caller's transaction (the writer's).
On any other database the Core statement runs unchanged. Each column's
value goes through the SQLAlchemy result processor of its type for this
dialect (DATETIME text to ``datetime``, 0/1 to ``bool``), so rows hold
what Core would return; parameters are passed as they are, so they must
be plain values (strings, integers, bytes). An expanding ``IN`` parameter
(``bindparam(..., expanding=True)``) becomes one ``?`` per value.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, Select, Table, create_engine, event, insert
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from .db import WRITE_OPTION, is_sqlite_file, sqlite_begin, sqlite_connect_args, sqlite_pragmas

_SQLITE = sqlite.dialect(paramstyle="qmark")
# SQLAlchemy's spelling of an expanding parameter in compiled SQL.
_POSTCOMPILE = re.compile(r"__\[POSTCOMPILE_(\w+)\]")


class FastSelect:
    """One SELECT, compiled once for SQLite (see the module docstring)."""

    def __init__(self, stmt: Select[*tuple[Any, ...]]) -> None:
        self.stmt = stmt
        compiled = stmt.compile(dialect=_SQLITE)
        self._row: Any = namedtuple("Row", list(stmt.selected_columns.keys()), rename=True)  # type: ignore[misc]
        self._expanding = {m.group(1) for m in _POSTCOMPILE.finditer(compiled.string)}
        # Literal values in the statement (e.g. role == "member") are
        # bound parameters too; their values come from the compiled form.
        self._fixed = {k: b.effective_value for k, b in compiled.binds.items() if not b.required}
        self._names = list(compiled.positiontup or ())
        self._sql = compiled.string
        self._by_count: dict[tuple[int, ...], str] = {}
        # Per column, the result processor of its type on the engine's
        # dialect (None: the value as sqlite3 gives it), set at first use.
        self._procs: list[Any] | None = None

    def _text(self, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        if not self._expanding:
            return self._sql, [params[n] if n in params else self._fixed[n] for n in self._names]
        counts = tuple(len(params[n]) for n in sorted(self._expanding))
        sql = self._by_count.get(counts)
        if sql is None:
            sizes = dict(zip(sorted(self._expanding), counts))
            sql = _POSTCOMPILE.sub(lambda m: ", ".join("?" * sizes[m.group(1)]) or "NULL", self._sql)
            if len(self._by_count) < 64:
                self._by_count[counts] = sql
        values: list[Any] = []
        for n in self._names:
            if n in self._expanding:
                values.extend(params[n])
            else:
                values.append(params[n] if n in params else self._fixed[n])
        return sql, values

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> Sequence[Any]:
        """The rows in ``conn``'s current transaction (any database)."""
        if conn.dialect.name != "sqlite":
            return conn.execute(self.stmt, dict(params)).all()
        sql, values = self._text(params)
        procs = self._procs
        if procs is None:
            dialect = conn.dialect
            found = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in self.stmt.selected_columns]
            procs = self._procs = found if any(found) else []
        make = self._row._make
        if not procs:
            return [make(r) for r in _raw(conn, sql, values)]
        return [make([v if f is None or v is None else f(v) for f, v in zip(procs, r)])
                for r in _raw(conn, sql, values)]

    def run(self, engine: Engine, params: Mapping[str, Any]) -> Sequence[Any]:
        """The rows, read in a transaction of their own."""
        with snapshot(engine) as conn:
            return self.rows(conn, params)


class FastInsert:
    """A multi-row INSERT of every column of ``table`` on the sqlite3
    connection (``executemany``) inside the caller's write transaction; on
    any other database the Core ``insert(table)`` runs unchanged. Each value
    goes through the bind processor of its column's type for this dialect
    (``datetime`` to SQLAlchemy's DATETIME text, and so on), so the stored
    rows are those Core would store. Rows are dicts with every column."""

    def __init__(self, table: Table) -> None:
        self.stmt = insert(table)
        self._table = table
        self._names = [c.name for c in table.columns]
        self._sql = (f"INSERT INTO {table.name} ({', '.join(self._names)}) "
                     f"VALUES ({', '.join('?' * len(self._names))})")
        self._procs: list[Any] | None = None

    def insert(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if conn.dialect.name != "sqlite":
            conn.execute(self.stmt, list(rows))
            return
        procs = self._procs
        if procs is None:
            dialect = conn.dialect
            procs = self._procs = [c.type.dialect_impl(dialect).bind_processor(dialect) for c in self._table.columns]
        names = self._names
        values = [[v if f is None or v is None else f(v) for f, v in zip(procs, (r[n] for n in names))]
                  for r in rows]
        _driver(conn, self._sql, values, many=True)


class FastWrite:
    """One INSERT or UPDATE with a fixed set of parameters, compiled once
    for SQLite, run on the sqlite3 connection inside the caller's write
    transaction; on any other database the Core statement runs unchanged.
    Each parameter goes through the bind processor of its type for this
    dialect, as Core's would (``datetime`` to SQLAlchemy's DATETIME text),
    and literal values in the statement are bound from its compiled form.
    A statement whose columns take defaults computed in Python is refused
    (Core would compute them; this does not). Errors are wrapped as
    SQLAlchemy wraps them. ``run`` returns the new row's id (an INSERT's
    ``lastrowid``, Core's ``inserted_primary_key``), ``run_many`` runs it
    for several parameter sets (``executemany``)."""

    def __init__(self, stmt: Any, keys: Sequence[str]) -> None:
        self.stmt = stmt
        self._insert = bool(getattr(stmt, "is_insert", False))
        compiled = stmt.compile(dialect=_SQLITE, column_keys=list(keys))
        if compiled.insert_prefetch or compiled.update_prefetch:
            raise ValueError("a column default computed in Python: run this statement through Core")
        self._sql = compiled.string
        self._names = list(compiled.positiontup or ())
        self._binds = [compiled.binds[n] for n in self._names]
        self._fixed = {k: b.effective_value for k, b in compiled.binds.items() if not b.required}
        self._procs: list[Any] | None = None

    def _values(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        procs = self._procs
        if procs is None:
            dialect = conn.dialect
            procs = self._procs = [b.type.dialect_impl(dialect).bind_processor(dialect) for b in self._binds]
        fixed = self._fixed
        out = []
        for name, proc in zip(self._names, procs):
            v = params[name] if name in params else fixed[name]
            out.append(v if proc is None or v is None else proc(v))
        return out

    def run(self, conn: Connection, params: Mapping[str, Any]) -> int | None:
        if conn.dialect.name != "sqlite":
            result = conn.execute(self.stmt, dict(params))
            if not self._insert:
                return None
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])
        values = self._values(conn, params)
        cursor = _driver(conn, self._sql, values)
        return int(cursor.lastrowid) if self._insert else None

    def returning(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of the statement's RETURNING clause (plain values: the
        returned columns must be ones sqlite3 gives as Core does, such as
        integers)."""
        if conn.dialect.name != "sqlite":
            return [tuple(r) for r in conn.execute(self.stmt, dict(params))]
        values = self._values(conn, params)
        return _driver(conn, self._sql, values).fetchall()  # type: ignore[no-any-return]

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if conn.dialect.name != "sqlite":
            conn.execute(self.stmt, [dict(r) for r in rows])
            return
        values = [self._values(conn, r) for r in rows]
        _driver(conn, self._sql, values, many=True)


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection in a read transaction (one snapshot) for ``rows``.

    On a SQLite file, the thread's kept connection (``kept_connection``)
    when it is free, else one from the pool as on other databases."""
    if engine.dialect.name != "sqlite":
        with engine.connect() as conn:
            yield conn
        return
    with kept_connection(engine) as conn, _read_transaction(conn):
        yield conn


@contextmanager
def kept_connection(engine: Engine, write: bool = False) -> Iterator[Connection]:
    """The thread's kept connection to a SQLite file (``_KeptConnections``) while
    it is free, else a pooled one; on other databases a pooled one. With
    ``write``, its ``begin()`` is a write transaction (BEGIN IMMEDIATE under
    the writers' lock on SQLite, as ``WRITE_OPTION`` on the main engine,
    db.py). A connection that raised a database error is not kept."""
    kept = _kept_connections(engine) if engine.dialect.name == "sqlite" else None
    conn = kept.take() if kept is not None else None
    if conn is None:
        with engine.connect() as conn:
            if write:
                conn.execution_options(**{WRITE_OPTION: True})
            yield conn
        return
    assert kept is not None
    conn.info[WRITE_OPTION] = write
    failed = False
    try:
        yield conn
    except DBAPIError:
        failed = True
        raise
    finally:
        kept.give_back(conn, failed)


@contextmanager
def _read_transaction(conn: Connection) -> Iterator[None]:
    # isolation_level is None on our SQLite connections (db.py): BEGIN is
    # ours to send; a deferred one, as db.py's read transactions. Each
    # snapshot is a transaction of its own: a kept connection sees every
    # commit made before its BEGIN.
    _raw(conn, "BEGIN", [])
    try:
        yield
    finally:
        _raw(conn, "ROLLBACK", [])


class _KeptConnections:
    """One connection per thread for one SQLite file, kept between
    snapshots (and the writer thread's transactions).

    A snapshot through the pool checks a connection out and back in (the
    pool's lock, the reset's ROLLBACK, SQLAlchemy's connection objects):
    several times a message on the SMTP path and once or twice a FETCH,
    under contention for the GIL. These connections come from an engine of
    their own without a pool (``NullPool``), so they never take a place in
    the main pool that other work waits for; the same pragmas and sqlite3
    class (db.py). A thread uses its own only when it is not already in a
    snapshot on it (a nested snapshot takes a pooled one). Kept connections
    are closed when the main engine is disposed (``Store.close``), and those
    of threads that have ended whenever a new one is made.
    """

    def __init__(self, url: Any) -> None:
        self._engine = create_engine(url, poolclass=NullPool,
                                     connect_args={**sqlite_connect_args(), "check_same_thread": False})
        event.listen(self._engine, "connect", sqlite_pragmas)
        event.listen(self._engine, "begin", sqlite_begin)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[weakref.ref[threading.Thread], Connection]] = []

    def take(self) -> Connection | None:
        local = self._local
        conn: Connection | None = getattr(local, "conn", None)
        if conn is not None and conn.info[_IN_USE]:
            return None  # a nested use: the caller takes a pooled one
        if conn is None:
            conn = self._engine.connect()
            with self._lock:
                ended = [c for t, c in self._open if (th := t()) is None or not th.is_alive()]
                self._open = [(t, c) for t, c in self._open if c not in ended]
                self._open.append((weakref.ref(threading.current_thread()), conn))
            for c in ended:
                c.close()
            local.conn = conn
        conn.info[_IN_USE] = True
        return conn

    def give_back(self, conn: Connection, failed: bool) -> None:
        """The thread is done with ``conn``; one that ``failed`` (raised a
        database error) or whose engine was disposed meanwhile is closed."""
        if failed or conn.info.get(_CLOSE_AFTER_USE):
            self.drop(conn)
        else:
            conn.info[_IN_USE] = False

    def drop(self, conn: Connection) -> None:
        self._local.conn = None
        with self._lock:
            self._open = [(t, c) for t, c in self._open if c is not conn]
        conn.close()

    def close_all(self) -> None:
        """Close every kept connection (the engine is being disposed): one
        in use by its thread right now is closed when that use ends."""
        with self._lock:
            conns, self._open = [c for _, c in self._open], []
        self._local = threading.local()
        for c in conns:
            c.info[_CLOSE_AFTER_USE] = True
            if not c.info.get(_IN_USE):
                c.close()


# Keys of a kept connection's ``info`` (its own; SQLAlchemy's is not shared).
_IN_USE = "postvault_kept_in_use"
_CLOSE_AFTER_USE = "postvault_kept_close"

_KEPT: weakref.WeakKeyDictionary[Engine, _KeptConnections | None] = weakref.WeakKeyDictionary()
_KEPT_LOCK = threading.Lock()


def _kept_connections(engine: Engine) -> _KeptConnections | None:
    """The kept connections of a SQLite file engine (None: an
    in-memory or URI database, where another connection is another
    database)."""
    try:
        return _KEPT[engine]
    except KeyError:
        pass
    with _KEPT_LOCK:
        if engine not in _KEPT:
            kept = _KeptConnections(engine.url) if is_sqlite_file(engine.url.database or "") else None
            if kept is not None:
                event.listen(engine, "engine_disposed", lambda _engine: kept.close_all())
            _KEPT[engine] = kept
        return _KEPT[engine]


def _raw(conn: Connection, sql: str, values: Sequence[Any]) -> list[Any]:
    """``sql`` on the sqlite3 connection; its errors wrapped as SQLAlchemy
    wraps them (``sqlalchemy.exc.OperationalError`` and so on), so callers
    see the same exceptions as from ``Connection.execute``."""
    return _driver(conn, sql, values).fetchall()  # type: ignore[no-any-return]


def _driver(conn: Connection, sql: str, values: Any, many: bool = False) -> Any:
    """``sql`` run on the sqlite3 connection under ``conn`` (``executemany``
    with ``many``), returning its cursor; errors wrapped as SQLAlchemy wraps
    them."""
    raw = conn.connection.driver_connection
    assert raw is not None
    base = conn.dialect.loaded_dbapi.Error
    try:
        return raw.executemany(sql, values) if many else raw.execute(sql, values)
    except base as exc:
        raise DBAPIError.instance(sql, values[0] if many else values, exc, base, dialect=conn.dialect) from exc
