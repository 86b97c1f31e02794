"""Append-only audit events, chained by hash.

Each event records who did what to which account and message id, from
where, over which protocol: never content, subjects or file names. Each row's
``hash`` covers its fields and the previous row's hash, so editing or
removing a row breaks the chain from there on; ``auditlog`` signs
checkpoints of it, verifies, prunes and exports it.

A command that touches several messages (an IMAP FETCH, STORE, COPY, MOVE
or EXPUNGE) is one event: ``message`` holds the id if there is one, else
``detail`` ends with ``count=N messages=ID,ID,...``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import cast

from sqlalchemy import Connection, Table, select
from sqlalchemy.orm import Session

from .fastread import FastInsert, FastSelect
from .models import AuditEvent
from .sqlcompat import lock_audit_chain

GENESIS = b"\x00" * 32


def event_hash(prev_hash: bytes, fields: dict[str, str | None]) -> bytes:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(prev_hash + canonical).digest()


@dataclass(frozen=True)
class Event:
    """One event to append (``record_many``); the time is taken when it is written."""

    event: str
    actor: str
    account: str | None = None
    message: str | None = None
    client_ip: str | None = None
    protocol: str | None = None
    detail: str = ""


_TABLE = AuditEvent.__table__
# Built once, and run on the sqlite3 connection (fastread): record_many runs
# for every batch of deliveries and for every IMAP command that reads or
# changes messages; through Core its insert cost more than the hashing.
_HEAD = FastSelect(select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
_INSERT = FastInsert(cast(Table, _TABLE))


def _rows(last_id: int, prev: bytes, events: Sequence[Event]) -> list[dict[str, object]]:
    """The rows of ``events`` chained after entry ``last_id`` whose hash is
    ``prev``: each row's hash is ``event_hash(previous row's hash, its
    canonical fields)``; ids follow on without a gap."""
    rows: list[dict[str, object]] = []
    for i, e in enumerate(events, start=last_id + 1):
        at = datetime.now(timezone.utc)
        fields = {
            "at": at.isoformat(),
            "event": e.event,
            "actor": e.actor,
            "account": e.account,
            "message": e.message,
            "client_ip": e.client_ip,
            "protocol": e.protocol,
            "detail": e.detail,
        }
        digest = event_hash(prev, fields)
        rows.append({
            "id": i, "at": at, "event": e.event, "actor": e.actor, "account": e.account, "message": e.message,
            "client_ip": e.client_ip, "protocol": e.protocol, "detail": e.detail, "prev_hash": prev,
            "hash": digest,
        })
        prev = digest
    return rows


def record_many(conn: Connection, events: Sequence[Event]) -> None:
    """Append ``events``, in order, inside the caller's write transaction,
    which holds the chain (``lock_audit_chain``) from here until it ends:
    the head is read once and the rows go in with one multi-row insert.

    Ids are given here, the head's plus one, two, ...: what SQLite's rowid
    would give. A PostgreSQL sequence would not do: a rolled-back
    transaction still uses up its numbers, and ``verify`` rightly reads a
    gap in the ids as deleted entries."""
    if not events:
        return
    lock_audit_chain(conn)
    head = _HEAD.rows(conn, {})
    last_id, prev = (int(head[0][0]), bytes(head[0][1])) if head else (0, GENESIS)
    _INSERT.insert(conn, _rows(last_id, prev, events))


def record(
    session: Session,
    event: str,
    *,
    actor: str,
    account: str | None = None,
    message: str | None = None,
    client_ip: str | None = None,
    protocol: str | None = None,
    detail: str = "",
) -> None:
    """Append one event inside the caller's transaction."""
    # Pending ORM rows (an earlier event of this session among them) go in
    # first, so the chain reads the newest hash and ids keep chain order.
    session.flush()
    record_many(session.connection(), [Event(event, actor, account, message, client_ip, protocol, detail)])
