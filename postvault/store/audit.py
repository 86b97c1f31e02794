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
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import AuditEvent

GENESIS = b"\x00" * 32


def event_hash(prev_hash: bytes, fields: dict[str, str | None]) -> bytes:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(prev_hash + canonical).digest()


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
    at = datetime.now(timezone.utc)
    last = session.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
    prev = last if last is not None else GENESIS
    fields = {
        "at": at.isoformat(),
        "event": event,
        "actor": actor,
        "account": account,
        "message": message,
        "client_ip": client_ip,
        "protocol": protocol,
        "detail": detail,
    }
    session.add(
        AuditEvent(
            at=at,
            event=event,
            actor=actor,
            account=account,
            message=message,
            client_ip=client_ip,
            protocol=protocol,
            detail=detail,
            prev_hash=prev,
            hash=event_hash(prev, fields),
        )
    )
