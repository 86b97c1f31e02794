"""The sealed header cache: each message copy's raw header block, for IMAP
FETCH of header sections without opening the message.

A mail client's message list asks, for each window of messages, for a few
header fields (``BODY.PEEK[HEADER.FIELDS (From To Subject Date ...)]``).
From the sealed message that costs, per message, an X25519 unwrap of its
content key, the opening of its summary (for the header's length) and the
decryption of its first chunk. Here each copy keeps its header block
(plaintext ``[0, header_size)``, through the blank line) in
``message_copies.sealed_header``, sealed with AES-256-GCM under the
account's header-cache key (``crypto.header_cache_key``: derived from the
private key with a label of its own, so only a logged-in session of the
account makes or reads entries, and apart from the search-index key).
FETCH of top-level header sections then opens one small entry per message.

The design is that of the search index (``searchindex.py``), and so are
the invariants:
- No plaintext header is ever written: an entry is sealed before it leaves
  this module, bound to the account and the message
  (``crypto.seal_header_entry``).
- An entry belongs to its copy's row: EXPUNGE and DELETE remove it with the
  row; COPY and MOVE inside the account carry it.
- An entry that does not open (damaged, moved from another row, sealed
  under another key) is never trusted: the message's own (authenticated)
  header answers, the entry is re-sealed, and a warning without content is
  logged.
- Read-only sessions (emergency access) read and use entries but write none.
- APPEND writes its message's entry with the message (``entry_for``); the
  search index fill writes the entries of the headers it decrypts; FETCH
  writes those of the messages it had to open. Delivery, which has no
  private key, writes none.
- Headers above ``HEADER_CACHE_MAX`` octets are not cached (FETCH reads
  them from the message as before): an entry stays small, and a batch of
  them is bounded in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import MailboxNotFound
from ..mime.summary import header_size
from . import crypto
from .db import unit_of_work
from .models import Mailbox, MessageCopy
from .types import AccountSession

log = logging.getLogger(__name__)

HEADER_CACHE_MAX = 64 * 1024
_COPIES = cast(Table, MessageCopy.__table__)


def header_block(head: bytes, whole: bool) -> bytes | None:
    """The exact header block (a summary's ``[0, header_size)``) of a
    message of which ``head`` is the start (``whole``: all of it), or None
    if ``head`` stops before the blank line or the block is above
    ``HEADER_CACHE_MAX``."""
    end = header_size(head)
    if end == len(head) and not whole and not (head.endswith((b"\n\n", b"\n\r\n")) or head in (b"\n", b"\r\n")):
        return None  # no blank line in what was read: the header may go on
    if end > HEADER_CACHE_MAX:
        return None
    return head[:end]


def seal(session: AccountSession, public_id: str, head: bytes, key: bytes | None = None) -> bytes:
    """The sealed entry of a message's header block for this account
    (``key``: the account's header-cache key, if the caller derived it)."""
    if key is None:
        key = crypto.header_cache_key(session.private_key)
    return crypto.seal_header_entry(key, session.key_owner, public_id.encode(), head)


def entry_for(session: AccountSession, public_id: str, data: bytes) -> bytes | None:
    """The sealed entry of a message the session is storing itself (APPEND:
    the plaintext is at hand, so no later FETCH decrypts it); None if its
    header is too large to cache."""
    head = header_block(data[:HEADER_CACHE_MAX + 1], len(data) <= HEADER_CACHE_MAX)
    return None if head is None else seal(session, public_id, head)


class HeaderCacheStore:
    """The header cache reads and writes of ``Store`` (see the module
    docstring). FETCH reads the entries with its rows
    (``read_copies(..., with_headers=True)``)."""

    engine: Engine
    _sessions: sessionmaker[Session]
    check_access: Callable[..., None]
    _mailbox: Callable[..., Mailbox]

    def open_headers(self, session: AccountSession, copies: Sequence[Any]) -> dict[int, bytes]:
        """The header blocks of those of ``copies`` (``read_copies`` rows
        read ``with_headers``) whose entry opens, by UID. Entries that do not
        open are left out (and counted in a warning without content): the
        caller reads those headers from their messages, and ``save_headers``
        re-seals them."""
        self.check_access(session, write=False)
        sealed = [(c.meta.uid, c.meta.message_id, c.sealed_header) for c in copies if c.sealed_header is not None]
        if not sealed:
            return {}
        opened = crypto.open_header_entries(crypto.header_cache_key(session.private_key), session.key_owner,
                                            ((pid.encode(), e) for _, pid, e in sealed))
        out: dict[int, bytes] = {}
        bad = 0
        for (uid, _, _), head in zip(sealed, opened):
            if head is None or len(head) > HEADER_CACHE_MAX:
                bad += 1
            else:
                out[uid] = head
        if bad:
            log.warning("%d header cache entries of account %d did not open; read from their messages instead",
                        bad, session.account_id)
        return out

    def save_headers(self, session: AccountSession, mailbox: str, heads: Sequence[tuple[int, str, bytes]]) -> None:
        """Seal and write the entries of ``(uid, public id, header block)``
        of copies in ``mailbox``, in one short transaction; nothing for a
        read-only session, nor for a block above ``HEADER_CACHE_MAX``. A
        copy expunged or moved meanwhile matches no row: nothing written."""
        if session.read_only:
            return
        key = crypto.header_cache_key(session.private_key)
        writes = [{"u": uid, "e": seal(session, pid, head, key)} for uid, pid, head in heads
                  if len(head) <= HEADER_CACHE_MAX]
        if not writes:
            return
        try:
            with unit_of_work(self._sessions) as s:
                box_id = self._mailbox(s, session.account_id, mailbox).id
                stmt = (update(_COPIES)
                        .where(_COPIES.c.mailbox_id == box_id, _COPIES.c.uid == bindparam("u"))
                        .values(sealed_header=bindparam("e")))
                s.connection().execute(stmt, writes)
        except MailboxNotFound:
            pass  # deleted meanwhile: its copies are gone with it
        except OperationalError as exc:
            # The cache only saves work: a read whose entries could not be
            # written (the database busy past its timeout, or full) still
            # answers, and the next read tries again.
            log.warning("header cache entries of account %d not written: %s", session.account_id,
                        type(exc.orig).__name__)
