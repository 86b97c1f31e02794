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
- Each message's summary (ENVELOPE, BODYSTRUCTURE, part offsets:
  ``postvault.mime.summary``) is made when it is sealed and kept sealed under
  its content key; ``summaries`` lists a folder without reading a blob.
- IMAP SEARCH's header fields are kept per message copy in a sealed
  search index under a key derived from the account's private key
  (``searchindex.py``); only the account's own sessions fill and read it.
- IMAP FETCH of header sections answers from a sealed header cache per
  message copy, under another key derived from the private key
  (``headercache.py``); only the account's own sessions fill and read it.
- Every committed change to a mailbox is announced on ``Store.bus``
  (``notify.ChangeBus``), after the commit, for IMAP IDLE; on PostgreSQL
  to every process on the database (``pgnotify.PgChangeBus``).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, func, select

from . import audit
from .accounts import AccountStore
from .auditlog import AuditLog
from .blobs import FileBlobStore
from .db import is_sqlite_file, make_engine, sessions, unit_of_work, upgrade
from .dbblobs import DatabaseBlobStore
from .emergency import EmergencyStore
from .headercache import HeaderCacheStore
from .mail import MailStore
from .models import Account
from .notify import ChangeBus
from .offices import OfficesStore
from .recovery import RecoveryStore
from .searchindex import SearchIndexStore
from .smallblobs import SplitBlobStore
from .types import *  # noqa: F403  (the API's data types, re-exported)
from .types import AccountSession, BlobStore, KdfSettings


def _login_fingerprint(a: Account) -> bytes:
    # Everything a login's outcome depends on: the password check, the key
    # wrap and its KDF, the public key it is checked against, the state.
    parts = (a.state.encode(), a.password_hash or b"", a.wrapped_private_key, a.kdf_params.encode(),
             a.public_key, a.key_owner.encode())
    return hashlib.sha256(b"".join(struct.pack(">I", len(p)) + p for p in parts)).digest()


class Store(AccountStore, MailStore, SearchIndexStore, HeaderCacheStore, OfficesStore, AuditLog, RecoveryStore, EmergencyStore):
    """Accounts, mailboxes and sealed messages behind one API."""

    def __init__(self, engine: Engine, blobs: BlobStore | FileBlobStore | None = None,
                 kdf: KdfSettings | None = None) -> None:
        self.engine = engine
        self._sessions = sessions(engine)
        # Small messages' blobs are rows of the database's blob table
        # (smallblobs), so a blob folder always has that table beside it.
        table = DatabaseBlobStore(self._sessions, engine)
        chosen: Any = table if blobs is None else SplitBlobStore(blobs, table) if isinstance(blobs, FileBlobStore) \
            else blobs
        self.blobs: BlobStore = chosen
        self.kdf = kdf or KdfSettings()
        # Committed mailbox changes, for IMAP IDLE (see notify.py).
        self.bus = ChangeBus()

    @classmethod
    def open(cls, url: str, blobs: Path | Literal["database"], kdf: KdfSettings | None = None) -> "Store":
        """Engine for ``url``, schema upgraded to the newest revision."""
        engine = make_engine(url)
        upgrade(engine)
        store = cls(engine, None if blobs == "database" else FileBlobStore(Path(blobs)), kdf)
        if engine.dialect.name == "postgresql":
            # Other processes on this database hear this one's changes, and
            # (once ``postvault serve`` starts it) the other way round.
            from .pgnotify import PgChangeBus

            store.bus = PgChangeBus(engine)
        return store

    @property
    def local_reads(self) -> bool:
        """Whether reads are of a SQLite file on this machine: no network
        round trip, and in WAL mode a reader never waits for a writer, so a
        few indexed reads take tens of microseconds. The submission server
        then makes a small message's reads on its event loop rather than
        hopping to a worker thread (smtpd/handler.py)."""
        return self.engine.dialect.name == "sqlite" and is_sqlite_file(self.engine.url.database or "")

    def close(self) -> None:
        self.engine.dispose()

    # -- for the login cache (postvault/login.py) -------------------------

    def login_fingerprint(self, email: str) -> bytes | None:
        """A digest that changes whenever the account's password, key wrap,
        keys or state change; None if there is no active account. One cheap
        read; not secret (it is a hash of wrapped and public values)."""
        with self._sessions() as s:
            acct = s.scalar(select(Account).where(func.lower(Account.email) == email.strip().lower()))
        if acct is None or acct.state != "active":
            return None
        return _login_fingerprint(acct)

    def resume_login(
        self, session: AccountSession, fingerprint: bytes, *, client_ip: str | None = None,
        protocol: str | None = None,
    ) -> bool:
        """A login from the cache: if the account still has ``fingerprint``
        (nothing changed since ``session`` was made by ``login``), record
        the login exactly as ``login`` does (throttle reset, ``login.ok``
        audited) and return True; else record nothing and return False."""
        with self._sessions() as s:
            acct = s.get(Account, session.account_id)
        if acct is None or acct.state != "active" or _login_fingerprint(acct) != fingerprint:
            return False
        self._login_succeeded(acct, client_ip, protocol)
        return True

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
