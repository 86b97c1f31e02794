"""Server-wide HMAC keys kept in the database (``server_secrets``).

They pseudonymize what the server must be able to match but not show: the
Message-IDs of the thread index, the user names of failed logins. They are
not content keys; a copy of the database carries them, so they protect
against reading a value at a glance, not against someone who holds the disk
and guesses inputs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from .models import ServerSecret

THREAD_INDEX = "thread-index-hmac"
AUTH_FAILURES = "auth-failure-hmac"


def server_key(session: Session, name: str) -> bytes:
    """The key called ``name``, made on first use."""
    key = session.scalar(select(ServerSecret.value).where(ServerSecret.name == name))
    if key is None:
        key = secrets.token_bytes(32)
        try:
            # A savepoint, so that losing a race with another process that
            # made the key first costs only this insert, not the transaction.
            with session.begin_nested():
                session.add(ServerSecret(name=name, value=key))
        except DBIntegrityError:
            key = session.scalar(select(ServerSecret.value).where(ServerSecret.name == name))
            assert key is not None
    return key


def keyed_hash(key: bytes, value: bytes) -> bytes:
    return hmac.new(key, value, hashlib.sha256).digest()
