"""The few statements that SQLite and PostgreSQL spell differently.

The store runs on both (``[store] url``). SQLite serializes every writer
(BEGIN IMMEDIATE, see ``db.py``); PostgreSQL runs writers side by side
under READ COMMITTED, so what SQLite gets from that one lock PostgreSQL
gets from row locks (``SELECT ... FOR UPDATE``, ``UPDATE ... RETURNING``),
from inserts that tolerate a row another writer just added, and from the
advisory lock of ``lock_audit_chain``.
"""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import Connection, Insert, Table, insert, text

# Any constant works: the advisory lock space is the database's own. This
# one is "postvaul" in ASCII, so it is recognisable in pg_locks.
AUDIT_CHAIN_LOCK = 0x706F737476617560


@lru_cache(maxsize=None)
def insert_ignoring_duplicates(table: Table, dialect: str) -> Insert:
    """``INSERT`` that skips rows whose unique key another transaction
    already wrote (``ON CONFLICT DO NOTHING``): two writers adding the same
    thread participant both succeed. Built once per table and dialect."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    return insert(table)


_ADVISORY = text(f"SELECT pg_advisory_xact_lock({AUDIT_CHAIN_LOCK})")


def lock_audit_chain(conn: Connection) -> None:
    """Make the caller's transaction the only appender to the audit chain
    until it ends. A chain link needs the newest hash, so appenders must
    take turns: on SQLite the write transaction (BEGIN IMMEDIATE) already
    does; on PostgreSQL a transaction-scoped advisory lock, released by
    COMMIT or ROLLBACK, shared by every process on the database. Appending
    is the last step of the write transactions that lock rows, so none
    holds it while it waits for a row lock (were one to, PostgreSQL would
    find the deadlock and fail one transaction, not hang)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_ADVISORY)
