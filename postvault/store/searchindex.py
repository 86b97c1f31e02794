"""Reads for IMAP SEARCH: metadata conditions in SQL, and the sealed
search index of header fields.

``search_metadata`` answers the size and internal-date keys (LARGER,
SMALLER, BEFORE, ON, SINCE) in one query over the folder, as one 0/1 octet
per message and condition: no object per message, so a date search over
10,000 messages costs a few milliseconds.

``search_fields`` gives the header fields SEARCH matches on
(``postvault.mime.searchfields``) from the search index: one sealed entry
per message copy (``message_copies.sealed_search``), opened with the
account's search-index key (``crypto.search_index_key``: derived from the
private key, so only a logged-in session of the account can make or read
one). Delivery cannot make entries (it holds only public keys), so a copy
without one has its header decrypted once, here, and its entry written;
the first header search of a large folder pays for that, later ones
decrypt one small entry per message instead of a key unwrap and a header.

Invariants:
- No plaintext field is ever written: an entry is sealed before it leaves
  this module, bound to the account and the message
  (``crypto.seal_search_entry``).
- An entry belongs to its copy's row: EXPUNGE and DELETE remove it with the
  row; COPY and MOVE inside the account carry it (the binding is to the
  message, and a message's header never changes).
- An entry that does not open (damaged, moved from another row, or sealed
  under another key) is never trusted: the message's own (authenticated)
  header answers instead, the entry is re-sealed, and a warning without
  content is logged.
- Read-only sessions (emergency access) read and use entries but write none.
- APPEND writes its message's entry with the message (``entry_for``);
  delivery, which has no private key, leaves it to the IMAP service's
  fill after login (``fill_search_index``) or else the first search.
- The headers decrypted for missing entries also give their copies' header
  cache entries (``headercache.py``), written in the same transaction.
"""

from __future__ import annotations

import io
import logging
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from typing import Any, cast

from sqlalchemy import Engine, Table, and_, bindparam, case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..errors import IntegrityError
from ..mime.searchfields import Fields, entry_of, parse_header, read_header
from . import crypto, headercache
from .db import unit_of_work
from .models import Mailbox, Message, MessageCopy
from .types import UID_TYPECODE, AccountSession, ContentKeyCache

log = logging.getLogger(__name__)

# Messages per round of ``search_fields``: one query, one batch of header
# decryptions for those without an entry, one short write transaction (so a
# first search of 100,000 messages never holds the write lock for long),
# and a bounded number of decoded entries in memory.
BATCH = 1000
METADATA_KEYS = frozenset({"LARGER", "SMALLER", "BEFORE", "ON", "SINCE"})
_COPIES = cast(Table, MessageCopy.__table__)


_builders: dict[tuple[int, int], threading.Lock] = {}
_builders_lock = threading.Lock()


@contextmanager
def _builder(account_id: int, box_id: int) -> Iterator[None]:
    """One filler per folder in this process: sessions of one account that
    search one folder at once (a client's several connections) would each
    decrypt every message; the second waits, then finds the entries."""
    with _builders_lock:
        lock = _builders.setdefault((account_id, box_id), threading.Lock())
    with lock:
        yield


def entry_for(session: AccountSession, public_id: str, data: bytes) -> bytes:
    """The sealed index entry of a message the session is storing itself
    (APPEND: the plaintext is at hand, so no later search decrypts it)."""
    entry = entry_of(parse_header(read_header(io.BytesIO(data))))
    return crypto.seal_search_entry(crypto.search_index_key(session.private_key), session.key_owner,
                                    public_id.encode(), entry)


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


_DIGITS = bytes.maketrans(b"01", b"\x00\x01")


def _aligned(uid_text: str | None, digit_texts: Sequence[str | None]) -> tuple[array[int], list[bytes]]:
    """``search_metadata``'s answer from aggregated text: UIDs ascending,
    each test's octets in the same order."""
    if not uid_text:
        return array(UID_TYPECODE), [b"" for _ in digit_texts]
    uids = array(UID_TYPECODE, map(int, uid_text.split(",")))
    columns = [(t or "").encode("ascii").translate(_DIGITS) for t in digit_texts]
    ordered = array(UID_TYPECODE, sorted(uids))
    if ordered != uids:
        order = sorted(range(len(uids)), key=uids.__getitem__)
        columns = [bytes(c[i] for i in order) for c in columns]
        uids = ordered
    return uids, columns


class SearchIndexStore:
    """The SEARCH reads of ``Store`` (see the module docstring)."""

    engine: Engine
    _sessions: sessionmaker[Session]
    check_access: Callable[..., None]
    _mailbox: Callable[..., Mailbox]
    open_messages: Callable[..., Iterator[tuple[int, Any]]]

    @staticmethod
    def _condition(name: str, value: Any) -> Any:
        if name == "LARGER":
            return MessageCopy.size > int(value)
        if name == "SMALLER":
            return MessageCopy.size < int(value)
        # RFC 3501: dates compare without time and zone; internal dates are
        # stored in UTC, so a day is [its 00:00 UTC, the next day's).
        day = value.date() if isinstance(value, datetime) else value
        start = _day_start(day)
        if name == "SINCE":
            return MessageCopy.internal_date >= start
        if name == "BEFORE":
            return MessageCopy.internal_date < start
        if name == "ON":
            return and_(MessageCopy.internal_date >= start, MessageCopy.internal_date < start + timedelta(days=1))
        raise ValueError(f"not a metadata search key: {name}")

    def search_metadata(
        self, session: AccountSession, mailbox: str, tests: Sequence[tuple[str, Any]]
    ) -> tuple[array[int], list[bytes]]:
        """Every UID of the mailbox (ascending) and, per ``(key, value)``
        test (a key of ``METADATA_KEYS`` and its number or date), one octet
        per UID: 1 where the message passes, else 0."""
        self.check_access(session, write=False)
        with self._sessions() as s:
            box = self._mailbox(s, session.account_id, mailbox)
            dialect = s.get_bind().dialect.name
            if dialect == "sqlite":
                # One row: the UIDs and each test's 0/1 string, aggregated
                # over the same rows in the same order (so aligned, whatever
                # that order is); a third less than a row per message.
                digits = [func.group_concat(case((self._condition(n, v), "1"), else_="0"), "")
                          for n, v in tests]
                got = s.connection().execute(
                    select(func.group_concat(MessageCopy.uid), *digits).where(MessageCopy.mailbox_id == box.id)
                ).one()
                return _aligned(got[0], got[1:])
            cols = [case((self._condition(name, value), 1), else_=0) for name, value in tests]
            # Plain tuples from the DB-API cursor: integers need no conversion.
            rows = s.connection().execute(
                select(MessageCopy.uid, *cols).where(MessageCopy.mailbox_id == box.id).order_by(MessageCopy.uid)
            ).cursor.fetchall()
        uids = array(UID_TYPECODE, [r[0] for r in rows])
        return uids, [bytes([r[k] for r in rows]) for k in range(1, len(cols) + 1)]

    def search_fields(
        self, session: AccountSession, mailbox: str, uids: Sequence[int], keys: ContentKeyCache | None = None
    ) -> Iterator[tuple[int, Fields | IntegrityError]]:
        """The search fields of the messages with these UIDs, in UID order
        (UIDs not in the mailbox are left out); a message that has no entry
        yet, or one that does not open, is read from its sealed content and
        its entry written. A message whose content does not open either is
        ``(uid, IntegrityError)``. ``keys``: the connection's content-key
        cache, for those reads. A generator: each round is read when the
        caller gets that far."""
        self.check_access(session, write=False)
        wanted = sorted(set(uids))
        if not wanted:
            return
        index_key = crypto.search_index_key(session.private_key)
        owner = session.key_owner
        with self._sessions() as s:
            box_id = self._mailbox(s, session.account_id, mailbox).id
        q = (
            select(MessageCopy.uid, MessageCopy.sealed_search, Message.public_id)
            .join(Message, Message.id == MessageCopy.message_id)
            .where(MessageCopy.mailbox_id == box_id,
                   MessageCopy.uid.between(bindparam("low"), bindparam("high")))
            .order_by(MessageCopy.uid)
        )
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start:start + BATCH]
            members = set(batch)
            with self._sessions() as s:
                cursor = s.connection().execute(q, {"low": batch[0], "high": batch[-1]}).cursor
                rows = [r for r in cursor.fetchall() if r[0] in members]
            sealed = [(r[0], r[2], r[1]) for r in rows if r[1] is not None]
            opened = crypto.open_search_entries(index_key, owner, ((pid.encode(), e) for _, pid, e in sealed))
            found: dict[int, Fields | IntegrityError] = {}
            bad = 0
            for (uid, _, _), plain in zip(sealed, opened):
                fields = Fields.parse(plain) if plain is not None else None
                if fields is None:
                    bad += 1
                else:
                    found[uid] = fields
            public_ids = {r[0]: r[2] for r in rows}
            missing = [r[0] for r in rows if r[0] not in found]
            if bad:
                log.warning("%d search index entries of account %d did not open; read from their messages instead",
                            bad, session.account_id)
            if missing:
                with _builder(session.account_id, box_id):
                    missing = self._still_missing(box_id, missing, public_ids, index_key, owner, found)
                    if missing:
                        found.update(self._index_messages(session, mailbox, box_id, missing, public_ids, index_key,
                                                          keys))
            for uid in batch:
                got = found.get(uid)
                if got is not None:
                    yield uid, got

    def fill_search_index(
        self, session: AccountSession, mailbox: str, after: int = 0, limit: int = BATCH,
    ) -> tuple[int, int, int, int | None]:
        """One round of a fill that nobody waits for (the IMAP service's
        fill after login, imapd/indexfill.py): the first ``limit`` copies
        of the mailbox above UID ``after`` that have no entry get one (and
        their header cache entry), as a search's fill would write them.

        Returns ``(folder id, copies looked at, entries written, last UID
        looked at)``; the last UID is None when no copy without an entry is
        left above ``after``. The caller passes it as the next ``after``,
        so a message whose content does not open is looked at once per
        fill, not forever. A read-only session writes nothing."""
        self.check_access(session, write=False)
        with self._sessions() as s:
            box_id = self._mailbox(s, session.account_id, mailbox).id
            if session.read_only:
                return box_id, 0, 0, None
            rows = s.execute(
                select(MessageCopy.uid, Message.public_id)
                .join(Message, Message.id == MessageCopy.message_id)
                .where(MessageCopy.mailbox_id == box_id, MessageCopy.uid > after,
                       MessageCopy.sealed_search.is_(None))
                .order_by(MessageCopy.uid).limit(limit)
            ).all()
        if not rows:
            return box_id, 0, 0, None
        uids = [uid for uid, _ in rows]
        public_ids = {uid: pid for uid, pid in rows}
        index_key = crypto.search_index_key(session.private_key)
        found: dict[int, Fields | IntegrityError] = {}
        written = 0
        # The same per-folder lock as a search's fill: a search of this
        # folder meanwhile waits for this round, then finds its entries.
        with _builder(session.account_id, box_id):
            missing = self._still_missing(box_id, uids, public_ids, index_key, session.key_owner, found)
            if missing:
                got = self._index_messages(session, mailbox, box_id, missing, public_ids, index_key, None)
                written = sum(1 for v in got.values() if not isinstance(v, IntegrityError))
        return box_id, len(uids), written, uids[-1]

    def _still_missing(
        self, box_id: int, uids: list[int], public_ids: dict[int, str], index_key: bytes, owner: bytes,
        found: dict[int, Fields | IntegrityError],
    ) -> list[int]:
        """Of ``uids`` (no usable entry when read), those still without one:
        another session of this process may have filled them while this one
        waited for ``_builder``. Adds the entries found to ``found``."""
        with self._sessions() as s:
            rows = s.execute(
                select(MessageCopy.uid, MessageCopy.sealed_search)
                .where(MessageCopy.mailbox_id == box_id, MessageCopy.uid.between(uids[0], uids[-1]),
                       MessageCopy.sealed_search.is_not(None))
            ).all()
        wanted = set(uids)
        entries = [(uid, entry) for uid, entry in rows if uid in wanted and entry is not None]
        opened = crypto.open_search_entries(index_key, owner, ((public_ids[u].encode(), e) for u, e in entries))
        for (uid, _), plain in zip(entries, opened):
            fields = Fields.parse(plain) if plain is not None else None
            if fields is not None:
                found[uid] = fields
        return [u for u in uids if u not in found]

    def _index_messages(
        self, session: AccountSession, mailbox: str, box_id: int, uids: list[int], public_ids: dict[int, str],
        index_key: bytes, keys: ContentKeyCache | None,
    ) -> dict[int, Fields | IntegrityError]:
        """Fields of messages without a usable entry, from their headers
        (one ``open_messages`` pass); their new entries written in one
        transaction (not for a read-only session)."""
        out: dict[int, Fields | IntegrityError] = {}
        writes = []
        # The header blocks decrypted here go to the header cache too
        # (headercache.py): a client that searches a folder lists it next.
        head_writes = []
        head_key = crypto.header_cache_key(session.private_key)
        for uid, reader in self.open_messages(session, mailbox, uids, keys):
            if isinstance(reader, IntegrityError):
                out[uid] = reader
                continue
            with reader:
                head = read_header(reader)
            entry = entry_of(parse_header(head))
            block = headercache.header_block(head, whole=False)
            if block is not None:
                head_writes.append({"b": box_id, "u": uid, "h": headercache.seal(session, public_ids[uid], block,
                                                                                  head_key)})
            del head, block
            fields = Fields.parse(entry)
            assert fields is not None  # entry_of makes entries of this version
            out[uid] = fields
            writes.append({"b": box_id, "u": uid, "e": crypto.seal_search_entry(
                index_key, session.key_owner, public_ids[uid].encode(), entry)})
        if writes and not session.read_only:
            stmt = (update(_COPIES)
                    .where(_COPIES.c.mailbox_id == bindparam("b"), _COPIES.c.uid == bindparam("u"))
                    .values(sealed_search=bindparam("e")))
            with unit_of_work(self._sessions) as s:
                # A copy expunged or moved meanwhile matches no row: nothing written.
                s.connection().execute(stmt, writes)
                if head_writes:
                    s.connection().execute(
                        update(_COPIES)
                        .where(_COPIES.c.mailbox_id == bindparam("b"), _COPIES.c.uid == bindparam("u"))
                        .values(sealed_header=bindparam("h")), head_writes)
        return out
