"""The store API: the one entry point both servers and the CLI use.

``Store`` is synchronous and thread-safe; each call is one unit of work in
its own database session (servers run it on worker threads). Callers never
see SQL or keys: they hold an ``AccountSession`` after a login, which carries
that account's unwrapped private key in memory only.

Invariants:
- A message is sealed once (fresh content key, chunked AES-GCM) and its
  content key is wrapped to each owner's public key; delivery needs no
  password.
- The sealed blob is durably written before the database row that points at
  it is committed; a call returns only after that commit. So a success
  return means "durably stored", and a failure leaves no row behind (an
  unreferenced blob may remain after a crash; fsck collects those).
- UIDs come from ``mailboxes.uidnext`` under a write lock on the mailbox
  row (BEGIN IMMEDIATE on SQLite, SELECT ... FOR UPDATE elsewhere); they are
  strictly ascending and never reused (RFC 3501 §2.3.1.1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sqlalchemy import Engine

from .accounts import AccountStore
from .blobs import FileBlobStore
from . import audit
from .db import make_engine, sessions, unit_of_work, upgrade
from .dbblobs import DatabaseBlobStore
from .mail import MailStore
from .types import *  # noqa: F403  (the API's data types, re-exported)
from .types import BlobStore, KdfSettings


class Store(AccountStore, MailStore):
    """Accounts, mailboxes and sealed messages behind one API."""

    def __init__(self, engine: Engine, blobs: BlobStore | None = None, kdf: KdfSettings | None = None) -> None:
        self.engine = engine
        self._sessions = sessions(engine)
        self.blobs: BlobStore = blobs if blobs is not None else DatabaseBlobStore(self._sessions)
        self.kdf = kdf or KdfSettings()

    @classmethod
    def open(cls, url: str, blobs: Path | Literal["database"], kdf: KdfSettings | None = None) -> "Store":
        """Engine for ``url``, schema upgraded to the newest revision."""
        engine = make_engine(url)
        upgrade(engine)
        store = cls(engine, None, kdf)
        if blobs != "database":
            store.blobs = FileBlobStore(Path(blobs))
        return store

    def close(self) -> None:
        self.engine.dispose()

    def record_event(
        self,
        event: str,
        *,
        actor: str,
        account: str | None = None,
        message: str | None = None,
        client_ip: str | None = None,
        protocol: str | None = None,
        detail: str = "",
    ) -> None:
        """Append one audit event (never content) in its own transaction."""
        with unit_of_work(self._sessions) as s:
            audit.record(s, event, actor=actor, account=account, message=message, client_ip=client_ip,
                         protocol=protocol, detail=detail)
