"""Mailboxes and sealed messages: delivery, APPEND, reading, flags,
COPY/MOVE and EXPUNGE, the sealed summaries IMAP lists folders from, and the
thread index they keep up to date.

Every method that changes a mailbox publishes a ``notify.Change`` on
``self.bus`` once its transaction has committed (never before: a listener
that re-reads the mailbox at once must find the change).
"""

from __future__ import annotations

import bisect
import gc
import io
import json
import logging
import secrets
import threading
import typing
from collections import Counter
from contextlib import contextmanager
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, BinaryIO, Literal, NamedTuple, TypeVar

from sqlalchemy import Engine, Table, Text, bindparam, case, cast, delete, func, literal, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import (
    IntegrityError,
    InvalidInput,
    MailboxExists,
    MailboxHasChildren,
    MailboxNotFound,
    MessageNotFound,
    storage_full,
)
from ..mime.summary import summarize
from . import audit, crypto, serverkeys, threads
from . import delivery, fastread, headercache, searchindex, smallblobs
from .fastread import FastSelect
from .db import unit_of_work
from .delivery import PreparedDelivery
from .groupcommit import GroupRunner
from .models import (
    Account,
    BlobChunk,
    Mailbox,
    Message,
    MessageCopy,
    ServerSecret,
    Thread,
    ThreadParticipant,
)
from .notify import Change, ChangeBus
from .sqlcompat import insert_ignoring_duplicates
from .types import (
    AccountSession,
    AppendResult,
    BlobStore,
    ContentKeyCache,
    CopyResult,
    DeliveryResult,
    UID_TYPECODE,
    MailboxChanges,
    MailboxFlags,
    MailboxInfo,
    MailboxSnapshot,
    MailboxState,
    MessageMeta,
    check_flags,
    first_position,
    flags_set,
    flags_text,
    new_uidvalidity,
    now,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MAX_HEADER_SCAN = 256 * 1024
# APPEND to Sent of a message the server delivered this recently, with the
# same Message-ID, is the client saving its own copy of what it just sent
# by SMTP (Thunderbird does): answered with the delivered copy's UID.
SENT_DEDUPE_WINDOW = timedelta(minutes=10)
# seal_small label of a message's summary; a new summary format gets a new
# label (and "v" inside), so an old one is never read as the new.
SUMMARY_LABEL = b"message-summary/v1"
# Above this many UIDs one range query (filtered here) beats a huge IN list,
# which SQLite also caps at 32766 parameters.
_IN_LIST_MAX = 500


class Sealed(NamedTuple):
    """A message sealed by ``MailStore._seal``."""

    public_id: str
    blob_id: str
    size: int
    key: bytes
    head: bytes
    summary: bytes
    # The sealed blob when it is to be written with the message row
    # (smallblobs); None when it is in the blob store already.
    inline: bytes | None


class StoredCopy(NamedTuple):
    """A message copy as FETCH reads it (``read_copies``): its metadata
    and what opening it needs (``open_messages(rows=...)``)."""

    meta: MessageMeta
    wrapped_key: bytes
    blob_id: str
    # Its header cache entry, when read ``with_headers`` (headercache.py).
    sealed_header: bytes | None = None


# Hot IMAP reads, built once and run on the sqlite3 connection (fastread):
# through the ORM a FETCH of one message cost two mailbox lookups and two
# row queries, most of its CPU (docs/benchmarks.md, "IMAP per command").
def _copies_read(*extra: Any) -> FastSelect:
    """FETCH's read of a mailbox's copies by UID: metadata, wrapped key and
    blob, and ``extra`` columns."""
    return FastSelect(
        select(MessageCopy.uid, MessageCopy.flags, MessageCopy.size, MessageCopy.internal_date, MessageCopy.modseq,
               Message.public_id, MessageCopy.wrapped_key, Message.blob_id, *extra)
        .join(Message, Message.id == MessageCopy.message_id)
        .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
        .where(Mailbox.account_id == bindparam("account"), Mailbox.name == bindparam("name"),
               MessageCopy.uid.in_(bindparam("uids", expanding=True)))
        .order_by(MessageCopy.uid)
    )


_COPIES = _copies_read()
# The same with each copy's header cache entry, for FETCH of header
# sections (headercache.py); a separate statement so that other FETCHes do
# not read the entries.
_COPIES_HEADERS = _copies_read(MessageCopy.sealed_header)
_SUMMARY_ROWS = FastSelect(
    select(MessageCopy.uid, MessageCopy.wrapped_key, Message.id, Message.public_id, Message.blob_id,
           Message.sealed_summary)
    .join(Message, Message.id == MessageCopy.message_id)
    .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
    .where(Mailbox.account_id == bindparam("account"), Mailbox.name == bindparam("name"),
           MessageCopy.uid.in_(bindparam("uids", expanding=True)))
)
# The catch-up after a change (``mailbox_changes``): rows above a modseq
# (the (mailbox, modseq) index) and the message count.
_CHANGED = FastSelect(
    select(MessageCopy.uid, MessageCopy.flags, MessageCopy.size, MessageCopy.internal_date, MessageCopy.modseq,
           Message.public_id)
    .join(Message, Message.id == MessageCopy.message_id)
    .where(MessageCopy.mailbox_id == bindparam("box"), MessageCopy.modseq > bindparam("since"))
    .order_by(MessageCopy.uid)
)
# SELECT after a change: the flags of the rows changed or added since the
# kept view's HIGHESTMODSEQ (the (mailbox, modseq) index), to bring it up
# to date instead of reading every message (``_advance``).
_FLAGS_SINCE = FastSelect(
    select(MessageCopy.uid, MessageCopy.flags)
    .where(MessageCopy.mailbox_id == bindparam("box"), MessageCopy.modseq > bindparam("since"))
    .order_by(MessageCopy.uid)
)
_COUNT = FastSelect(select(func.count()).select_from(MessageCopy).where(MessageCopy.mailbox_id == bindparam("box")))
_MARKS = FastSelect(
    select(Mailbox.uidnext, Mailbox.highestmodseq)
    .where(Mailbox.account_id == bindparam("account"), Mailbox.name == bindparam("name"))
)


# STORE (``set_flags``): the mailbox row locked for the change (FOR UPDATE
# on PostgreSQL; SQLite's BEGIN IMMEDIATE holds the database), the copies'
# flags, and the two updates.
_BOX_FOR_WRITE = FastSelect(
    select(Mailbox.id, Mailbox.name, Mailbox.highestmodseq)
    .where(Mailbox.account_id == bindparam("account"), Mailbox.name == bindparam("name"))
    .with_for_update()
)
_COPY_FLAGS = FastSelect(
    select(MessageCopy.uid, MessageCopy.flags, Message.public_id)
    .join(Message, Message.id == MessageCopy.message_id)
    .where(MessageCopy.mailbox_id == bindparam("box"), MessageCopy.uid.in_(bindparam("uids", expanding=True)))
    .order_by(MessageCopy.uid)
)
_COPY_TABLE = typing.cast(Table, MessageCopy.__table__)  # a Table (mypy sees only FromClause)
_BOX_TABLE = typing.cast(Table, Mailbox.__table__)
_SET_COPY_FLAGS = (
    update(_COPY_TABLE)
    .where(_COPY_TABLE.c.mailbox_id == bindparam("box"), _COPY_TABLE.c.uid == bindparam("u"))
    .values(flags=bindparam("f"), modseq=bindparam("m"))
)
_SET_HIGHEST = update(_BOX_TABLE).where(_BOX_TABLE.c.id == bindparam("box")).values(highestmodseq=bindparam("hm"))


_BOX_INFO = FastSelect(
    select(Mailbox.id, Mailbox.name, Mailbox.special_use, Mailbox.uidvalidity, Mailbox.uidnext,
           Mailbox.highestmodseq, Mailbox.subscribed)
    .where(Mailbox.account_id == bindparam("account"), Mailbox.name == bindparam("name"))
)


# SELECT: the mailbox row and its message count in one statement (one
# snapshot on any database), to validate the cached view (``_ViewCache``).
_BOX_STATE = FastSelect(
    select(Mailbox.id, Mailbox.name, Mailbox.special_use, Mailbox.uidvalidity, Mailbox.uidnext,
           Mailbox.highestmodseq, Mailbox.subscribed,
           select(func.count()).where(MessageCopy.mailbox_id == Mailbox.id).scalar_subquery())
    .where(Mailbox.account_id == bindparam("account"), Mailbox.name == bindparam("name"))
)

# The views a store keeps between sessions: at most this many mailboxes,
# and this many UIDs over all of them (8 bytes each with their flags).
VIEW_CACHE_BOXES = 256
VIEW_CACHE_UIDS = 2_000_000


class _ViewCache:
    """The per-message part of ``mailbox_state`` (UIDs, flags, counts,
    first unseen, keywords), kept between SELECTs of any session of this
    process, so a SELECT of an unchanged folder reads one row instead of
    every message.

    An entry is keyed by what identifies the mailbox's contents: its id
    and UIDVALIDITY, its UIDNEXT and HIGHESTMODSEQ, its message count and
    the ``since`` asked for. Every SELECT reads the first five from the
    database (one statement: ``_BOX_STATE``) and uses an entry only if all
    match, so a change by any process or node is seen: an append raises
    UIDNEXT, a flag change or an expunge raises HIGHESTMODSEQ, and a
    removal that raised neither (an invitation's discarded mail) lowers
    the count; UIDNEXT and HIGHESTMODSEQ never go back, so a key is never
    valid again once a change passed it. A deleted and re-made folder has
    a fresh UIDVALIDITY. Entries are immutable (``MailboxState`` and its
    arrays are only read by their users); least recently used go first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], MailboxState] = {}
        self._uids = 0

    def get(self, key: tuple[Any, ...]) -> MailboxState | None:
        with self._lock:
            state = self._entries.pop(key, None)
            if state is not None:
                self._entries[key] = state  # most recently used: last
            return state

    def latest(self, box_id: int, uidvalidity: int) -> tuple[tuple[Any, ...], MailboxState] | None:
        """The kept view of this mailbox (at most one: ``put`` drops older
        ones) read without ``since``, whatever its marks."""
        with self._lock:
            for key, state in self._entries.items():
                if key[0] == box_id and key[1] == uidvalidity and key[5] is None:
                    return key, state
        return None

    def put(self, key: tuple[Any, ...], state: MailboxState) -> None:
        n = len(state.uids)
        if n > VIEW_CACHE_UIDS // 4:
            return  # one huge folder must not push out every other
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._uids -= len(old.uids)
            # Older contents of the same mailbox are never valid again.
            for k in [k for k in self._entries if k[0] == key[0]]:
                self._uids -= len(self._entries.pop(k).uids)
            self._entries[key] = state
            self._uids += n
            while len(self._entries) > VIEW_CACHE_BOXES or self._uids > VIEW_CACHE_UIDS:
                first = next(iter(self._entries))
                self._uids -= len(self._entries.pop(first).uids)


def _advance(old: MailboxState, box: MailboxInfo, rows: Sequence[Any], count: int) -> MailboxState | None:
    """``old`` (a kept view with flags, read without ``since``) brought up
    to ``box``: ``rows`` are (uid, flags) of every message changed or added
    since ``old``'s HIGHESTMODSEQ, ``count`` the messages the mailbox holds
    now (read with ``box``). None when that is not enough: something was
    removed (the count does not add up), and the caller reads it all."""
    flags = old.flags
    assert flags is not None
    uids = old.uids
    last = uids[-1] if uids else 0
    added = sum(1 for r in rows if r[0] > last)
    if len(uids) + added != count:
        return None
    sets = list(flags.sets)
    ids: dict[frozenset[str], int] = {}
    for n, fs in enumerate(sets):
        ids.setdefault(fs, n)
    index = array("I", flags.index)
    out_uids = array(UID_TYPECODE, uids)
    for uid, text in rows:
        fs = flags_set(text)
        k = ids.get(fs)
        if k is None:
            k = ids[fs] = len(sets)
            sets.append(fs)
        if uid > last:
            out_uids.append(uid)  # rows ascend by UID
            index.append(k)
            continue
        i = bisect.bisect_left(uids, uid)
        if i == len(uids) or uids[i] != uid:
            return None
        index[i] = k
    counts = Counter(index)
    unseen = 0
    first_at: int | None = None
    keywords: set[str] = set()
    data = index.tobytes()
    size = index.itemsize
    for k, n in counts.items():
        fs = sets[k]
        keywords.update(f for f in fs if not f.startswith("\\"))
        if "\\Seen" not in fs:
            unseen += n
            at = first_position(data, size, k)
            if at is not None and (first_at is None or at < first_at):
                first_at = at
    first_unseen = None if first_at is None else out_uids[first_at]
    return MailboxState(box, out_uids, unseen, first_unseen, frozenset(keywords), None,
                        MailboxFlags(out_uids, index, tuple(sets)))


def _box_info_in(s: Session, account_id: int, name: str) -> MailboxInfo:
    """The mailbox as ``_box_info(_mailbox(...))`` gives it, read in the
    session's transaction without an ORM object (reads only: SELECT,
    FETCH and the catch-up after a change run this on every command)."""
    rows = _BOX_INFO.rows(s.connection(), {"account": account_id, "name": _box_key(name)})
    if not rows:
        raise MailboxNotFound(f"no mailbox named {name!r}")
    r = rows[0]
    return MailboxInfo(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]))


def _box_key(name: str) -> str:
    # RFC 3501 §5.1: INBOX is case-insensitive, other names are not.
    return "INBOX" if name.upper() == "INBOX" else name


def _bytes_of(raw: bytes | BinaryIO) -> bytes:
    """The message bytes: the summary needs them whole, once, in memory."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    return raw.read()


def _head(data: bytes) -> bytes:
    """The header block (for the thread index), bounded."""
    head = data[:MAX_HEADER_SCAN]
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[: end + 2]


@contextmanager
def _full_disk() -> Iterator[None]:
    """A write refused because the disk or quota is full comes out as
    ``StorageFull`` (the protocol edges answer 452 4.3.1 / NO [OVERQUOTA]);
    anything else passes unchanged. What failed was rolled back or removed
    by the code inside, so nothing is half-stored."""
    try:
        yield
    except (OSError, SQLAlchemyError) as exc:
        full = storage_full(exc)
        if full is None:
            raise
        raise full from exc


def _uid_list(dialect: str) -> Any:
    """An aggregate that lists a group's UIDs as comma-separated text, on
    the databases that have one (else None: the caller reads rows)."""
    if dialect == "sqlite":
        return func.group_concat(MessageCopy.uid)
    if dialect == "postgresql":
        return func.string_agg(cast(MessageCopy.uid, Text), ",")
    return None


def _decode_many(uids: Sequence[int], docs: Sequence[bytes]) -> dict[int, dict[str, Any]]:
    """JSON-decode many summaries, with the cyclic garbage collector paused.

    Decoding 10,000 summaries allocates a few hundred thousand small dicts
    and lists, none of them garbage, and the collector's passes over them
    doubled the time. JSON makes no reference cycles, so nothing is missed;
    the pause is short, and the collector is switched back on only if it was
    on (never turned on behind the back of someone who turned it off).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return {uid: json.loads(doc) for uid, doc in zip(uids, docs)}
    finally:
        if enabled:
            gc.enable()


class MailStore:
    """The mail half of ``Store``."""

    engine: Engine
    _sessions: sessionmaker[Session]
    blobs: BlobStore
    bus: ChangeBus
    # Made on first use (class defaults: Store.__init__ is not ours to extend).
    _writer: GroupRunner | None = None
    _writer_lock = threading.Lock()
    # SELECT's views between sessions (``_ViewCache``), made on first use.
    _views: _ViewCache | None = None
    _thread_key_value: bytes | None = None
    _account: Callable[[Session, str], Account]  # from AccountStore
    # From EmergencyStore: refuses changes by read-only sessions and reads
    # after an emergency grant ended; free for normal sessions.
    check_access: Callable[..., None]

    def _publish(self, *changes: Change) -> None:
        """Announce committed changes; a failing bus never fails the call."""
        for change in changes:
            if not change.uids and change.kind not in ("deleted", "renamed"):
                continue
            try:
                self.bus.publish(change)
            except Exception as exc:  # noqa: BLE001 - the change is committed whatever a listener does
                log.warning("publishing a mailbox change failed (%s)", type(exc).__name__)

    def _mailbox(self, s: Session, account_id: int, name: str, *, lock: bool = False) -> Mailbox:
        # RFC 3501 §5.1: INBOX is case-insensitive, other names are not.
        key = "INBOX" if name.upper() == "INBOX" else name
        q = select(Mailbox).where(Mailbox.account_id == account_id, Mailbox.name == key)
        if lock:
            # The row lock (PostgreSQL; SQLite's BEGIN IMMEDIATE already
            # holds the database) and the row as it is now, not as this
            # session may have read it before the lock.
            q = q.with_for_update().execution_options(populate_existing=True)
        box = s.scalar(q)
        if box is None:
            raise MailboxNotFound(f"no mailbox named {name!r}")
        return box

    @staticmethod
    def _box_info(b: Mailbox) -> MailboxInfo:
        return MailboxInfo(b.id, b.name, b.special_use, b.uidvalidity, b.uidnext, b.highestmodseq, b.subscribed)

    def list_mailboxes(self, session: AccountSession) -> list[MailboxInfo]:
        with self._sessions() as s:
            boxes = s.scalars(select(Mailbox).where(Mailbox.account_id == session.account_id).order_by(Mailbox.id))
            return [self._box_info(b) for b in boxes]

    def create_mailbox(self, session: AccountSession, name: str) -> MailboxInfo:
        self.check_access(session, write=True)
        if not name or name.upper() == "INBOX" or not name.isprintable() or len(name) > 200:
            raise InvalidInput("a mailbox name must be 1-200 printable characters and not INBOX")
        with unit_of_work(self._sessions) as s:
            exists = s.scalar(select(Mailbox.id).where(Mailbox.account_id == session.account_id, Mailbox.name == name))
            if exists is not None:
                raise MailboxExists(f"mailbox {name!r} already exists")
            box = Mailbox(
                account_id=session.account_id, name=name, special_use=None,
                uidvalidity=self._fresh_uidvalidity(s, session.account_id),
                uidnext=1, highestmodseq=1, subscribed=True, created_at=now(),
            )
            s.add(box)
            s.flush()
            return self._box_info(box)

    # -- DELETE, RENAME, SUBSCRIBE (RFC 3501 §6.3.4-7, RFC 9051 §6.3.4-8) --

    @staticmethod
    def _fresh_uidvalidity(s: Session, account_id: int, *retired: int) -> int:
        """A UIDVALIDITY no folder of this account ever had: above every
        current one, above ``accounts.last_uidvalidity`` (which remembers
        those of deleted and renamed folders) and above ``retired``; at
        least the clock's (RFC 3501 §2.3.1.1's usual choice). The account
        row is locked, so two CREATEs at once can't pick the same value."""
        acct = s.scalar(select(Account).where(Account.id == account_id).with_for_update()
                        .execution_options(populate_existing=True))
        if acct is None:
            raise MailboxNotFound("no such account")
        highest = s.scalar(select(func.max(Mailbox.uidvalidity)).where(Mailbox.account_id == account_id)) or 0
        value = max(new_uidvalidity(), int(highest) + 1, (acct.last_uidvalidity or 0) + 1, *(r + 1 for r in retired))
        if value > 0xFFFFFFFF:
            # Four billion renames later: a 32-bit value has run out.
            raise InvalidInput("this account has used up its folder validity numbers")
        acct.last_uidvalidity = value
        return value

    @staticmethod
    def _retire_uidvalidity(s: Session, account_id: int, value: int) -> None:
        """Remember ``value`` (a deleted or renamed folder's) so no later
        folder gets it (RFC 3501 §6.3.4: a new folder of the same name must
        not reuse UIDs under the same UIDVALIDITY)."""
        acct = s.get(Account, account_id)
        if acct is not None and (acct.last_uidvalidity or 0) < value:
            acct.last_uidvalidity = value

    @staticmethod
    def _user_folder(box: Mailbox, verb: str) -> None:
        # The servers ask policy first (aliases, user folders allowed); this
        # is the store's own guard, whoever calls.
        if box.name == "INBOX" and verb == "deleted" or box.special_use:
            raise InvalidInput(f"The {box.name} folder can't be {verb}.")

    @staticmethod
    def _children(s: Session, account_id: int, name: str) -> list[Mailbox]:
        prefix = name + "/"
        rows = s.scalars(select(Mailbox).where(Mailbox.account_id == account_id,
                                               func.substr(Mailbox.name, 1, len(prefix)) == prefix)
                         .order_by(Mailbox.name))
        # substr compares characters on both engines; the check below is
        # the exact one.
        return [b for b in rows if b.name.startswith(prefix)]

    def delete_mailbox(
        self, session: AccountSession, name: str, *, client_ip: str | None = None, protocol: str | None = None
    ) -> list[tuple[int, str]]:
        """DELETE a user folder with its messages; returns (UID, message
        public id) of each copy removed.

        The copies go as EXPUNGE removes them (``_remove_copies``): a
        message no other copy uses is dropped with its blob, so blob counts
        stay right. A folder with folders below it is refused with
        ``MailboxHasChildren`` (RFC 3501 §6.3.4 lets a server refuse; the
        \\Noselect alternative would leave a name that holds nothing).
        INBOX and the special-use folders are refused (``InvalidInput``).
        Its UIDVALIDITY is remembered so a folder made later under the same
        name gets another. Its subscription goes with it: subscriptions are
        a flag on the folder's row, and SUBSCRIBE takes existing folders
        only (RFC 3501 §6.3.6 allows that). RFC 3501 §6.3.9 says a server
        must not remove a name from the subscription list on its own; here
        the client asked for the folder to go, and a name kept would show
        in Outlook's LSUB-based folder list as a folder that isn't there. Audited as ``mailbox.delete`` with the folder's
        id and the messages' ids, never its name (a name may be PHI)."""
        self.check_access(session, write=True)
        with unit_of_work(self._sessions) as s:
            box = self._mailbox(s, session.account_id, name, lock=True)
            self._user_folder(box, "deleted")
            if self._children(s, session.account_id, box.name):
                raise MailboxHasChildren("the folder has folders below it")
            q = (
                select(MessageCopy, Message.public_id)
                .join(Message, Message.id == MessageCopy.message_id)
                .where(MessageCopy.mailbox_id == box.id)
                .order_by(MessageCopy.uid)
            )
            doomed = [(c, pid) for c, pid in s.execute(q)]
            orphan_blobs = self._remove_copies(s, [c for c, _ in doomed])
            self._retire_uidvalidity(s, session.account_id, box.uidvalidity)
            detail = f"folder_id={box.id} count={len(doomed)}"
            if doomed:
                detail += " messages=" + ",".join(pid for _, pid in doomed)
            audit.record(s, "mailbox.delete", actor=session.email, account=session.email, client_ip=client_ip,
                         protocol=protocol, detail=detail)
            s.delete(box)
            removed = [(c.uid, pid) for c, pid in doomed]
            gone = box.name
        for blob_id in orphan_blobs:
            self._discard_blob(blob_id)
        self._publish(Change(session.account_id, gone, "deleted", ()))
        return removed

    def rename_mailbox(
        self, session: AccountSession, old: str, new: str, *, client_ip: str | None = None,
        protocol: str | None = None,
    ) -> MailboxInfo:
        """RENAME a user folder, and the folders below it (RFC 3501
        §6.3.5), keeping their messages, UIDs and subscriptions.

        Each renamed folder gets a new UIDVALIDITY (``_fresh_uidvalidity``):
        a client may have cached another folder that had the new name, and
        must not take this one's UIDs for that one's.

        RENAME INBOX (RFC 3501 §6.3.5) makes a new folder ``new`` and moves
        every message of INBOX into it, UIDs kept; INBOX stays, empty, its
        UIDNEXT unchanged so its UIDs are never reused; folders below INBOX
        stay where they are. ``MailboxExists`` if ``new`` (or a name a
        child would get) exists; ``MailboxNotFound`` if ``old`` doesn't.
        Audited as ``mailbox.rename`` with the folder ids, never the names.
        Returns the folder now named ``new``."""
        self.check_access(session, write=True)
        if not new or new.upper() == "INBOX" or not new.isprintable() or len(new) > 200:
            raise InvalidInput("a mailbox name must be 1-200 printable characters and not INBOX")
        changes: list[Change] = []
        with unit_of_work(self._sessions) as s:
            box = self._mailbox(s, session.account_id, old, lock=True)
            self._user_folder(box, "renamed")
            inbox = box.name == "INBOX"
            moves = [(box, new)]
            if not inbox:
                moves += [(c, new + c.name[len(box.name):]) for c in self._children(s, session.account_id, box.name)]
            for b, target in moves:
                if len(target) > 200:
                    raise InvalidInput("a mailbox name must be 1-200 printable characters and not INBOX")
                taken = s.scalar(select(Mailbox.id).where(Mailbox.account_id == session.account_id,
                                                          Mailbox.name == target))
                if taken is not None:
                    raise MailboxExists("the new name is taken")
            if inbox:
                uids = tuple(s.scalars(select(MessageCopy.uid).where(MessageCopy.mailbox_id == box.id)
                                       .order_by(MessageCopy.uid)))
                dest = Mailbox(
                    account_id=session.account_id, name=new, special_use=None,
                    uidvalidity=self._fresh_uidvalidity(s, session.account_id), uidnext=box.uidnext,
                    highestmodseq=box.highestmodseq, subscribed=True, created_at=now(),
                )
                s.add(dest)
                s.flush()
                # One UPDATE: the copies keep their UIDs, modseqs and keys
                # (a key wrap is bound to the account and message, not the
                # folder).
                s.execute(update(MessageCopy).where(MessageCopy.mailbox_id == box.id)
                          .values(mailbox_id=dest.id))
                box.highestmodseq += 1
                detail = f"folder_id={box.id} to_folder_id={dest.id} count={len(uids)}"
                changes.append(Change(session.account_id, "INBOX", "expunge", uids))
                result = dest
            else:
                retired = [b.uidvalidity for b, _ in moves]
                for b, _ in moves:
                    self._retire_uidvalidity(s, session.account_id, b.uidvalidity)
                # Two steps, so a child's new name may be another's old one
                # without tripping the unique (account, name) index midway.
                for b, _ in moves:
                    b.name = f"\x01renaming/{b.id}"  # never a client's name: not printable
                s.flush()
                for b, target in moves:
                    changes.append(Change(session.account_id, old if b is box else old + target[len(new):],
                                          "renamed", ()))
                    b.name = target
                    b.uidvalidity = self._fresh_uidvalidity(s, session.account_id, *retired)
                s.flush()
                detail = "folder_id=" + ",".join(str(b.id) for b, _ in moves)
                result = box
            audit.record(s, "mailbox.rename", actor=session.email, account=session.email, client_ip=client_ip,
                         protocol=protocol, detail=detail)
            info = self._box_info(result)
        self._publish(*changes)
        return info

    def set_subscribed(self, session: AccountSession, name: str, subscribed: bool) -> None:
        """SUBSCRIBE / UNSUBSCRIBE an existing folder (RFC 3501 §6.3.6
        lets a server refuse names that don't exist). INBOX and the
        special-use folders stay subscribed: Outlook finds Sent and Trash
        through LSUB."""
        self.check_access(session, write=True)
        with unit_of_work(self._sessions) as s:
            box = self._mailbox(s, session.account_id, name, lock=True)
            if not subscribed and (box.name == "INBOX" or box.special_use):
                raise InvalidInput(f"The {box.name} folder is always subscribed.")
            box.subscribed = subscribed

    # -- reading a mailbox (IMAP SELECT, FETCH, IDLE) ---------------------
    # None of these builds an ORM object per message: a 100,000-message
    # SELECT must answer in well under a second (docs/benchmarks.md, IMAP).

    @staticmethod
    def _meta_query(box_id: int) -> Any:
        return (
            select(MessageCopy.uid, MessageCopy.flags, MessageCopy.size, MessageCopy.internal_date,
                   MessageCopy.modseq, Message.public_id)
            .join(Message, Message.id == MessageCopy.message_id)
            .where(MessageCopy.mailbox_id == box_id)
        )

    @staticmethod
    def _metas(rows: Iterable[Any], wanted: set[int] | None = None) -> tuple[MessageMeta, ...]:
        # One frozenset per distinct flag string: a mailbox has a handful.
        sets: dict[str, frozenset[str]] = {}
        out = []
        for uid, flags, size, date, modseq, pid in rows:
            if wanted is not None and uid not in wanted:
                continue
            fs = sets.get(flags)
            if fs is None:
                fs = sets[flags] = flags_set(flags)
            out.append(MessageMeta(uid, fs, size, date, modseq, pid))
        return tuple(out)

    def snapshot(self, session: AccountSession, mailbox: str, uids: Sequence[int] | None = None) -> MailboxSnapshot:
        """The mailbox and its messages' metadata (only those with these
        UIDs if given; UIDs not in the mailbox are left out)."""
        with self._sessions() as s:
            box = _box_info_in(s, session.account_id, mailbox)
            q = self._meta_query(box.id).order_by(MessageCopy.uid)
            wanted = None
            if uids is not None:
                wanted = set(uids)
                if not wanted:
                    return MailboxSnapshot(box, ())
                if len(wanted) <= _IN_LIST_MAX:
                    q = q.where(MessageCopy.uid.in_(sorted(wanted)))
                else:
                    q = q.where(MessageCopy.uid.between(min(wanted), max(wanted)))
            return MailboxSnapshot(box, self._metas(s.execute(q), wanted))

    def read_copies(self, session: AccountSession, mailbox: str, uids: Sequence[int],
                    with_headers: bool = False) -> list[StoredCopy]:
        """What FETCH needs of these messages, in one read on the sqlite3
        connection (``fastread``): each one's metadata (as ``snapshot``
        gives it) with its wrapped content key and blob, ascending UID; UIDs
        not in the mailbox are left out. ``MailboxNotFound`` if the mailbox
        is gone. ``with_headers``: also each copy's (sealed) header cache
        entry, for ``open_headers``."""
        wanted = sorted(set(uids))
        params: dict[str, Any] = {"account": session.account_id, "name": _box_key(mailbox)}
        sets: dict[str, frozenset[str]] = {}
        out: list[StoredCopy] = []
        query = _COPIES_HEADERS if with_headers else _COPIES
        with fastread.snapshot(self.engine) as conn:
            for i in range(0, len(wanted), _IN_LIST_MAX):
                params["uids"] = wanted[i:i + _IN_LIST_MAX]
                for uid, flags, size, date, modseq, pid, wrapped, blob_id, *entry in query.rows(conn, params):
                    fs = sets.get(flags)
                    if fs is None:
                        fs = sets[flags] = flags_set(flags)
                    out.append(StoredCopy(MessageMeta(uid, fs, size, date, modseq, pid), wrapped, blob_id,
                                          entry[0] if entry else None))
            if not out and not _MARKS.rows(conn, params):
                raise MailboxNotFound(f"no mailbox named {mailbox!r}")
        return out

    def mailbox_marks(self, session: AccountSession, mailbox: str) -> tuple[int, int] | None:
        """The mailbox's (uidnext, highestmodseq), or None if it is gone:
        what an IMAP session compares to see whether anything changed."""
        with fastread.snapshot(self.engine) as conn:
            rows = _MARKS.rows(conn, {"account": session.account_id, "name": _box_key(mailbox)})
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def mailbox_state(self, session: AccountSession, mailbox: str, since: datetime | None = None,
                      with_flags: bool = False) -> MailboxState:
        """What SELECT, EXAMINE and STATUS report, from one aggregate
        grouped by flag string: counts, first unseen, keywords, the first
        UID dated at or after ``since`` (asked only when needed: it costs a
        date comparison per message) and, where the database can build a
        list in SQL, every UID. On SQLite this reads 100,000 messages in
        about 100 ms where one Python object per row costs twice that.
        ``with_flags``: also every message's flags (``MailboxState.flags``)
        where the UIDs come listed (SQLite, PostgreSQL), at little cost."""
        views = self._views
        if views is None:
            with self._writer_lock:
                if self._views is None:
                    self._views = _ViewCache()
            views = self._views
        params = {"account": session.account_id, "name": _box_key(mailbox)}

        def marks(conn: Any) -> tuple[MailboxInfo, tuple[Any, ...]]:
            rows = _BOX_STATE.rows(conn, params)
            if not rows:
                raise MailboxNotFound(f"no mailbox named {mailbox!r}")
            r = rows[0]
            box = MailboxInfo(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]))
            return box, (box.id, box.uidvalidity, box.uidnext, box.highestmodseq, int(r[7]), since)

        # The kept view, checked in a raw read transaction (fastread): an
        # ORM session's set-up and close cost more than the rest of it.
        with fastread.snapshot(self.engine) as conn:
            box, key = marks(conn)
            cached = views.get(key)
            if cached is not None and (cached.flags is not None or not with_flags):
                return replace(cached, mailbox=box, flags=cached.flags if with_flags else None)
            base = views.latest(box.id, box.uidvalidity) if since is None else None
            if base is not None and base[1].flags is not None and base[0][2] <= key[2] and base[0][3] <= key[3]:
                # Changed since the kept view (a STORE, new mail): only the
                # rows above its HIGHESTMODSEQ are read.
                state = _advance(base[1], box, _FLAGS_SINCE.rows(conn, {"box": box.id, "since": base[0][3]}),
                                 key[4])
                if state is not None:
                    views.put(key, state)
                    return state if with_flags else replace(state, flags=None)
        with self._sessions() as s:
            conn = s.connection()
            # Again, in the transaction that reads the messages: the state
            # reported is one snapshot (the mailbox may have changed since).
            box, key = marks(conn)
            recent = func.min(case((MessageCopy.internal_date >= since, MessageCopy.uid))) if since is not None \
                else literal(None)
            listing = _uid_list(conn.dialect.name)
            groups = conn.execute(
                select(MessageCopy.flags, func.count(), func.min(MessageCopy.uid), recent,
                       listing if listing is not None else literal(None))
                .where(MessageCopy.mailbox_id == box.id)
                .group_by(MessageCopy.flags)
            ).all()
            every_flag: MailboxFlags | None = None
            if listing is not None and with_flags:
                # Each group's UIDs share its flags: the flags of every
                # message come with the UIDs, from the same read (SELECT
                # used to be followed by ``message_flags``, a second read of
                # every row, at the first command that needed flags).
                owner: dict[int, int] = {}
                for k, g in enumerate(groups):
                    if g[4]:
                        owner.update(dict.fromkeys(map(int, g[4].split(",")), k))
                uids = array(UID_TYPECODE, sorted(owner))
                every_flag = MailboxFlags(uids[:], array("I", map(owner.__getitem__, uids)),
                                          tuple(flags_set(g[0]) for g in groups))
            elif listing is not None:
                # The groups' lists are each unordered; one sort of the
                # joined list (a C loop) orders them.
                text = ",".join(g[4] for g in groups if g[4])
                uids = array(UID_TYPECODE, sorted(map(int, text.split(",")))) if text else array(UID_TYPECODE)
            else:
                result = conn.execute(
                    select(MessageCopy.uid).where(MessageCopy.mailbox_id == box.id).order_by(MessageCopy.uid))
                # The DB-API cursor directly: integers need no conversion,
                # and a Row per message is most of the cost.
                uids = array(UID_TYPECODE, (u for (u,) in result.cursor))
            info = box
        unseen = 0
        first_unseen: int | None = None
        first_since: int | None = None
        keywords: set[str] = set()
        for flags, count, low, since_low, _ in groups:
            names = flags_set(flags)
            keywords.update(f for f in names if not f.startswith("\\"))
            if "\\Seen" not in names:
                unseen += count
                first_unseen = low if first_unseen is None else min(first_unseen, low)
            if since_low is not None:
                first_since = since_low if first_since is None else min(first_since, since_low)
        state = MailboxState(info, uids, unseen, first_unseen, frozenset(keywords), first_since, every_flag)
        if len(uids) == key[4]:
            # Read as of the row (on PostgreSQL the aggregate is a statement
            # of its own, so a change in between could slip in: then the
            # count differs, or the key's marks are passed for good).
            views.put(key, state)
        return state

    def message_flags(self, session: AccountSession, mailbox: str) -> MailboxFlags:
        """The flags of every message, compactly (see ``MailboxFlags``)."""
        with self._sessions() as s:
            box = _box_info_in(s, session.account_id, mailbox)
            rows = s.connection().execute(
                select(MessageCopy.uid, MessageCopy.flags)
                .where(MessageCopy.mailbox_id == box.id)
                .order_by(MessageCopy.uid)
            ).cursor  # plain tuples: neither column needs conversion
            uids = array(UID_TYPECODE)
            index = array("I")
            ids: dict[str, int] = {}
            for uid, flags in rows:
                n = ids.get(flags)
                if n is None:
                    n = ids[flags] = len(ids)
                uids.append(uid)
                index.append(n)
        sets = [frozenset[str]()] * len(ids)
        for text, n in ids.items():
            sets[n] = flags_set(text)
        return MailboxFlags(uids, index, tuple(sets))

    def mailbox_changes(self, session: AccountSession, mailbox: str, since_modseq: int) -> MailboxChanges:
        """Messages added or re-flagged since ``since_modseq`` (through the
        (mailbox, modseq) index) and the message count, for an IMAP session
        to catch up incrementally instead of re-reading the mailbox."""
        # Raw reads (fastread), one snapshot: every session with the mailbox
        # open runs this after each change another session makes (a STORE
        # among ten clients costs nine of these).
        with fastread.snapshot(self.engine) as conn:
            found = _BOX_INFO.rows(conn, {"account": session.account_id, "name": _box_key(mailbox)})
            if not found:
                raise MailboxNotFound(f"no mailbox named {mailbox!r}")
            r = found[0]
            info = MailboxInfo(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]))
            metas = self._metas(_CHANGED.rows(conn, {"box": info.id, "since": since_modseq}))
            count = _COUNT.rows(conn, {"box": info.id})[0][0]
        return MailboxChanges(info, metas, int(count or 0))

    # -- messages -------------------------------------------------------

    def _seal(self, data: bytes) -> Sealed:
        """Seal once. The summary is made here, from the same bytes, so a
        message is parsed once in its life; it is sealed under the content
        key before it leaves this function. A small message is sealed in
        memory: its blob is written by the transaction that files it
        (``smallblobs``); a larger one's is durably in the blob store when
        this returns."""
        public_id = secrets.token_hex(16)
        key = crypto.new_content_key()
        inline: bytes | None = None
        if len(data) <= smallblobs.SMALL_MAX:
            blob_id, size, inline = smallblobs.seal_in_memory(data, key, public_id.encode())
        else:
            with _full_disk():
                writer = self.blobs.writer()
                with writer:
                    size = crypto.seal_stream(io.BytesIO(data), writer, key, public_id.encode())
                    blob_id = writer.commit()  # type: ignore[attr-defined]
        return Sealed(public_id, blob_id, size, key, _head(data), self._seal_summary(data, key, public_id), inline)

    @staticmethod
    def _seal_summary(data: bytes, key: bytes, public_id: str) -> bytes:
        # ensure_ascii: header text keeps undecodable bytes as lone
        # surrogates, which JSON can only carry as \u escapes.
        doc = json.dumps(summarize(data), separators=(",", ":"), ensure_ascii=True).encode("ascii")
        return crypto.seal_small(key, SUMMARY_LABEL, public_id.encode(), doc)

    def _index_thread(
        self, s: Session, head: bytes, participants: Iterable[str], holder_id: int
    ) -> tuple[bytes | None, int]:
        """Keyed hash of the Message-ID, and the thread this message joins.

        A message joins the thread of a message it cites only if the account
        filing it holds that message and the server delivered it: knowing or
        guessing a Message-ID, or APPENDing a made-up message, must not let
        anyone into a conversation.
        """
        parsed = threads.parse_thread_headers(head)
        key = threads.thread_key(s)
        own = threads.mid_hash(key, parsed.message_id) if parsed.message_id else None
        thread_id = self._held_thread(s, holder_id, [threads.mid_hash(key, ref) for ref in parsed.references])
        if thread_id is None:
            t = Thread(created_at=now())
            s.add(t)
            s.flush()
            thread_id = t.id
        known = set(s.scalars(select(ThreadParticipant.email).where(ThreadParticipant.thread_id == thread_id)))
        new = sorted({p.lower() for p in participants} - known)
        if new:
            # Another writer (PostgreSQL: another process) may add the same
            # participant meanwhile; either insert is the same row.
            conn = s.connection()
            conn.execute(insert_ignoring_duplicates(ThreadParticipant.__table__, conn.dialect.name),
                         [{"thread_id": thread_id, "email": e} for e in new])
        return own, thread_id

    @staticmethod
    def _held_threads(s: Session, holder_id: int):  # type: ignore[no-untyped-def]
        """Delivered messages the account holds, as a query to refine."""
        return (
            select(Message.thread_id)
            .join(MessageCopy, MessageCopy.message_id == Message.id)
            .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
            .where(Mailbox.account_id == holder_id, Message.origin == "submission", Message.thread_id.is_not(None))
        )

    def _held_thread(self, s: Session, holder_id: int, hashes: Sequence[bytes]) -> int | None:
        for h in hashes:  # In-Reply-To first, then References newest first
            found = s.scalar(self._held_threads(s, holder_id).where(Message.mid_hash == h).limit(1))
            if found is not None:
                return found
        return None

    def thread_facts(self, sender: str, head: bytes) -> tuple[tuple[str, ...], bool, frozenset[str]]:
        """For the reply-only policy: the Message-IDs the header block cites,
        whether the sender holds (as delivered mail) one of them, and the
        participants of that conversation."""
        parsed = threads.parse_thread_headers(head)
        cited = tuple(ref.decode("utf-8", "replace") for ref in parsed.references)
        with self._sessions() as s:
            acct = self._account(s, sender)
            key = threads.thread_key(s) if parsed.references else b""
            thread_id = self._held_thread(s, acct.id, [threads.mid_hash(key, r) for r in parsed.references])
            if thread_id is None:
                return cited, False, frozenset()
            people = s.scalars(select(ThreadParticipant.email).where(ThreadParticipant.thread_id == thread_id))
            return cited, True, frozenset(people)

    def conversation_partners(self, sender: str) -> frozenset[str]:
        """Everyone the sender shares a delivered conversation with."""
        with self._sessions() as s:
            acct = self._account(s, sender)
            held = self._held_threads(s, acct.id).distinct().subquery()
            people = s.scalars(
                select(ThreadParticipant.email).where(ThreadParticipant.thread_id.in_(select(held.c.thread_id)))
            )
            return frozenset(p for p in people if p != acct.email.lower())

    def _add_copy(
        self, s: Session, box: Mailbox, message: Message, wrapped: bytes, flags: Iterable[str], when: datetime, size: int,
        sealed_search: bytes | None = None, sealed_header: bytes | None = None,
    ) -> int:
        uid = box.uidnext
        box.uidnext = uid + 1
        box.highestmodseq += 1
        s.add(
            MessageCopy(
                mailbox_id=box.id, uid=uid, message_id=message.id, flags=flags_text(flags), internal_date=when,
                size=size, modseq=box.highestmodseq, wrapped_key=wrapped, sealed_search=sealed_search,
                sealed_header=sealed_header,
            )
        )
        return uid

    def _discard_unfiled(self, blob_id: str, inline: bytes | None) -> None:
        """Drop the blob of a message sealed but not filed: a file goes; a
        small message's row (``inline``) was never written, or went with
        the rollback of the transaction that would have filed it."""
        if inline is None:
            self._discard_blob(blob_id)

    def _discard_blob(self, blob_id: str) -> None:
        with self._sessions() as s:
            used = s.scalar(select(Message.id).where(Message.blob_id == blob_id).limit(1))
        if used is None:
            self.blobs.delete(blob_id)

    def deliver(
        self,
        raw: bytes | BinaryIO,
        sender: str,
        recipients: Sequence[str],
        *,
        save_sent: bool = True,
        client_ip: str | None = None,
        protocol: str | None = None,
    ) -> DeliveryResult:
        """Seal ``raw`` once and file it in each recipient's INBOX (and the
        sender's Sent). All recipients or none: an unknown one fails the call
        before anything is stored.

        Concurrent calls are group-committed (``groupcommit``): each returns
        once the transaction holding its message has committed."""
        prepared = self.prepare_delivery(raw, sender, recipients, save_sent=save_sent, client_ip=client_ip,
                                         protocol=protocol)
        return self.submit_delivery(prepared).result()

    def prepare_delivery(
        self,
        raw: bytes | BinaryIO,
        sender: str,
        recipients: Sequence[str],
        *,
        save_sent: bool = True,
        client_ip: str | None = None,
        protocol: str | None = None,
    ) -> PreparedDelivery:
        """The first half of ``deliver``, all of it outside the write lock:
        the accounts read, the message sealed (a large one's blob durably written),
        the content key wrapped for each owner, the thread ids hashed. Hand
        the result to ``submit_delivery`` (or ``discard_delivery``)."""
        if not recipients:
            raise InvalidInput("a message needs at least one recipient")
        with fastread.snapshot(self.engine) as conn:
            owners = delivery.load_owners(conn, [sender, *recipients])
        sender_owner, rcpts = owners[0], {o.email.lower(): o for o in owners[1:]}
        data = _bytes_of(raw)
        thread_key = self._thread_key()
        sealed = self._seal(data)
        public_id, blob_id, key, head = sealed.public_id, sealed.blob_id, sealed.key, sealed.head
        del data
        try:
            pid = public_id.encode()

            def copy(owner: delivery.Owner, mailbox: str, flags: tuple[str, ...]) -> delivery.Copy:
                wrapped = crypto.wrap_content_key(key, owner.public_key, owner.key_owner.encode(), pid)
                return delivery.Copy(owner, mailbox, wrapped, flags)

            own, refs = delivery.hash_thread_ids(thread_key, head)
            return delivery.PreparedDelivery(
                public_id=public_id, blob_id=blob_id, size=sealed.size, sealed_summary=sealed.summary,
                inline=sealed.inline,
                sender=sender_owner, inboxes=[copy(o, "INBOX", ()) for o in rcpts.values()],
                sent=copy(sender_owner, "Sent", ("\\Seen",)) if save_sent else None,
                participants=frozenset([sender_owner.email.lower(), *rcpts]), mid_hash=own, ref_hashes=refs,
                stamp=now(), client_ip=client_ip, protocol=protocol,
            )
        except BaseException:
            self._discard_unfiled(blob_id, sealed.inline)
            raise

    def submit_delivery(self, prepared: PreparedDelivery, then: delivery.AfterFiling | None = None
                        ) -> Future[DeliveryResult]:
        """Queue a prepared message for the next group commit. The future
        holds its ``DeliveryResult`` once its transaction committed (and its
        changes are published), or the error that kept it out; then the
        blob has been discarded. ``then(conn, prepared, result)`` runs in
        that same transaction right after the message is filed, in a
        SAVEPOINT of its own (see ``delivery``): what it writes commits with
        the message, and if it raises only its own writes are undone."""
        if then is not None:
            prepared.then = then
        return self.group_write(self._commit_deliveries, prepared)

    def group_write(self, run_batch: Callable[[Sequence[T]], Sequence[R | BaseException]], item: T) -> Future[R]:
        """Run ``item`` through ``run_batch`` on the store's one writer
        thread, batched with whatever else is queued (``groupcommit``): for
        writes that come in bursts, like the notifications of deliveries.
        ``run_batch`` opens one write transaction for all its items and
        returns one outcome per item."""
        with self._writer_lock:
            if self._writer is None:
                self._writer = GroupRunner(name="postvault-writer")
        return self._writer.submit(run_batch, item)

    def submit_event(self, event: audit.Event) -> Future[None]:
        """Queue one audit event for the store's writer thread
        (``group_write``): events submitted meanwhile, by any session, are
        appended in one transaction and one commit. The future is resolved
        once that transaction committed (or holds the error that kept the
        event out), so a caller that waits for it before answering has the
        same guarantee as ``record_event`` for a fraction of the commits:
        IMAP FETCH answers OK only after its ``message.read`` is on disk."""
        return self.group_write(self._commit_events, event)

    def _commit_events(self, batch: Sequence[audit.Event]) -> list[None | BaseException]:
        """One transaction for the whole batch; if it fails, each event in a
        transaction of its own, so that one failure costs the others nothing."""
        try:
            self._write_events(batch)
            return [None] * len(batch)
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            if len(batch) == 1:
                return [exc]
            log.info("a group commit of %d audit events failed (%s); retrying one by one", len(batch),
                     type(exc).__name__)
        results: list[None | BaseException] = []
        for event in batch:
            try:
                self._write_events([event])
                results.append(None)
            except Exception as one:  # noqa: BLE001 - this event's own outcome
                results.append(one)
        return results

    def _write_events(self, batch: Sequence[audit.Event]) -> None:
        with _full_disk(), fastread.kept_connection(self.engine, write=True) as conn:
            with conn.begin():
                audit.record_many(conn, batch)

    def discard_delivery(self, prepared: PreparedDelivery) -> None:
        """Drop a prepared message that will not be submitted (its blob)."""
        self._discard_unfiled(prepared.blob_id, prepared.inline)

    def _commit_deliveries(self, batch: Sequence[PreparedDelivery]) -> list[DeliveryResult | BaseException]:
        """One write transaction for the whole batch; if it fails, each
        message again in a transaction of its own, so that one bad message
        costs the others nothing (and nothing is ever half-stored)."""
        try:
            results: list[DeliveryResult | BaseException] = list(self._write_deliveries(batch))
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            if len(batch) == 1:
                results = [exc]
            else:
                log.info("a group commit of %d deliveries failed (%s); retrying one by one", len(batch),
                         type(exc).__name__)
                results = []
                for p in batch:
                    try:
                        results.extend(self._write_deliveries([p]))
                    except Exception as one:  # noqa: BLE001 - this message's own outcome
                        results.append(one)
        for p, r in zip(batch, results):
            if isinstance(r, BaseException):
                self._discard_unfiled(p.blob_id, p.inline)
            else:
                self._publish(*p.changes)
        return results

    def _write_deliveries(self, batch: Sequence[PreparedDelivery]) -> list[DeliveryResult]:
        with _full_disk(), fastread.kept_connection(self.engine, write=True) as conn:
            with conn.begin():
                return delivery.write_deliveries(conn, batch)

    def _thread_key(self) -> bytes:
        """The thread-index key; made once (and never changed), so kept."""
        if self._thread_key_value is None:
            with self.engine.connect() as conn:
                key = conn.scalar(select(ServerSecret.value).where(ServerSecret.name == serverkeys.THREAD_INDEX))
            if key is None:
                with unit_of_work(self._sessions) as s:
                    key = threads.thread_key(s)
            self._thread_key_value = key
        return self._thread_key_value

    def append(
        self,
        session: AccountSession,
        mailbox: str,
        raw: bytes | BinaryIO,
        flags: Iterable[str] = (),
        internal_date: datetime | None = None,
        *,
        client_ip: str | None = None,
        protocol: str | None = None,
    ) -> AppendResult:
        """IMAP APPEND: seal and file into one of the account's mailboxes.

        Into the account's \\Sent mailbox, a message with the Message-ID of
        one the server delivered from this account within
        ``SENT_DEDUPE_WINDOW`` (and still in that mailbox) is not stored
        again: the result names that copy, with ``duplicate=True``. That is
        a client saving its own copy of what SMTP already filed in Sent
        (issue 5 item 6).
        """
        self.check_access(session, write=True)
        flags = check_flags(flags)
        data = _bytes_of(raw)
        dup: tuple[int, str] | None = None
        with self._sessions() as s:
            box = self._mailbox(s, session.account_id, mailbox)  # fail before sealing
            if box.special_use == "\\Sent":
                dup = self._sent_duplicate(s, box.id, _head(data))
        if dup is not None:
            with unit_of_work(self._sessions) as s:
                audit.record(
                    s, "message.append", actor=session.email, account=session.email, message=dup[1],
                    client_ip=client_ip, protocol=protocol,
                    detail="duplicate of the delivered copy in Sent; nothing stored",
                )
            return AppendResult(box.uidvalidity, dup[0], dup[1], duplicate=True)
        sealed = self._seal(data)
        public_id, blob_id, size, key = sealed.public_id, sealed.blob_id, sealed.size, sealed.key
        sealed_search = searchindex.entry_for(session, public_id, data)
        sealed_header = headercache.entry_for(session, public_id, data)
        del data
        when = internal_date or now()
        try:
            with _full_disk(), unit_of_work(self._sessions) as s:
                box = self._mailbox(s, session.account_id, mailbox, lock=True)
                if sealed.inline is not None:
                    smallblobs.write_rows(s.connection(), [(blob_id, sealed.inline)])
                msg = Message(public_id=public_id, blob_id=blob_id, size=size, origin="append", created_at=now(),
                              sealed_summary=sealed.summary)
                msg.mid_hash, msg.thread_id = self._index_thread(s, sealed.head, [session.email], session.account_id)
                s.add(msg)
                s.flush()
                wrapped = crypto.wrap_content_key(key, session.public_key, session.key_owner, public_id.encode())
                uid = self._add_copy(s, box, msg, wrapped, flags, when, size, sealed_search, sealed_header)
                audit.record(s, "message.append", actor=session.email, account=session.email, message=public_id,
                             client_ip=client_ip, protocol=protocol)
                validity = box.uidvalidity
        except BaseException:
            self._discard_unfiled(blob_id, sealed.inline)
            raise
        self._publish(Change(session.account_id, box.name, "exists", (uid,)))
        return AppendResult(validity, uid, public_id)

    @staticmethod
    def _sent_duplicate(s: Session, box_id: int, head: bytes) -> tuple[int, str] | None:
        """(UID, public id) of a recent delivered copy in this Sent mailbox
        with the Message-ID of ``head``, if there is one."""
        parsed = threads.parse_thread_headers(head)
        if parsed.message_id is None:
            return None
        # Read the thread key, don't make it: no key, no hashed Message-IDs,
        # and this is a read-only session.
        key = s.scalar(select(ServerSecret.value).where(ServerSecret.name == serverkeys.THREAD_INDEX))
        if key is None:
            return None
        row = s.execute(
            select(MessageCopy.uid, Message.public_id)
            .join(Message, Message.id == MessageCopy.message_id)
            .where(
                MessageCopy.mailbox_id == box_id,
                Message.mid_hash == threads.mid_hash(key, parsed.message_id),
                # Only what the server delivered: an APPENDed copy proves
                # nothing about what was sent.
                Message.origin == "submission",
                Message.created_at >= now() - SENT_DEDUPE_WINDOW,
            )
            .order_by(MessageCopy.uid.desc())
            .limit(1)
        ).one_or_none()
        return None if row is None else (row[0], row[1])

    @staticmethod
    def _unwrap_keys(
        session: AccountSession, rows: Sequence[tuple[bytes, str]], keys: ContentKeyCache | None
    ) -> list[bytes | IntegrityError]:
        """The content keys of ``(wrapped_key, public_id)`` rows, in order:
        from ``keys`` (the connection's cache) where it has them, the rest
        unwrapped in one batch (``crypto.unwrap_content_keys``) and added to
        it. A key that does not open is its ``IntegrityError`` in the list;
        the others still open."""
        out: list[bytes | IntegrityError | None] = [None] * len(rows)
        todo = []
        for i, (_, public_id) in enumerate(rows):
            hit = keys.get(public_id) if keys is not None else None
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
        if todo:
            fresh: list[bytes | IntegrityError]
            try:
                fresh = list(crypto.unwrap_content_keys(
                    ((rows[i][0], rows[i][1].encode()) for i in todo), session.private_key_object, session.key_owner
                ))
            except IntegrityError:
                # The batch stops at the first key that does not open; find
                # which, one by one, so that a damaged row refuses only itself.
                fresh = []
                for i in todo:
                    try:
                        fresh.append(crypto.unwrap_content_key(
                            rows[i][0], session.private_key_object, session.key_owner, rows[i][1].encode()))
                    except IntegrityError as exc:
                        fresh.append(exc)
            for i, key in zip(todo, fresh):
                out[i] = key
                if keys is not None and not isinstance(key, IntegrityError):
                    keys.put(rows[i][1], key)
        return out  # type: ignore[return-value]

    def open_message(
        self, session: AccountSession, mailbox: str, uid: int, keys: ContentKeyCache | None = None
    ) -> crypto.SealedReader:
        """A seekable plaintext reader; chunks are opened as they are read.
        ``keys``: the connection's cache of content keys (``ContentKeyCache``)."""
        self.check_access(session, write=False)
        with self._sessions() as s:
            box = self._mailbox(s, session.account_id, mailbox)
            row = s.execute(
                select(MessageCopy.wrapped_key, Message.public_id, Message.blob_id)
                .join(Message, Message.id == MessageCopy.message_id)
                .where(MessageCopy.mailbox_id == box.id, MessageCopy.uid == uid)
            ).one_or_none()
        if row is None:
            raise MessageNotFound(f"no message with UID {uid} in {mailbox!r}")
        wrapped, public_id, blob_id = row
        key = self._unwrap_keys(session, [(wrapped, public_id)], keys)[0]
        if isinstance(key, IntegrityError):
            raise key
        src = self.blobs.open(blob_id)
        try:
            return crypto.SealedReader(src, key, public_id.encode())
        except BaseException:
            # A refused blob stays the caller's to close (SealedReader's
            # contract); without this every refused open leaks a descriptor.
            src.close()
            raise

    def open_messages(
        self, session: AccountSession, mailbox: str, uids: Sequence[int], keys: ContentKeyCache | None = None,
        *, rows: Sequence[StoredCopy] | None = None,
    ) -> Iterator[tuple[int, crypto.SealedReader | IntegrityError]]:
        """``open_message`` for many messages, for a FETCH batch on one
        worker thread: one query and one batch unwrap of the content keys
        (``crypto.unwrap_content_keys``) instead of a query, a mailbox
        lookup and a full unwrap per message.

        Yields ``(uid, reader)`` in UID order, one reader at a time and only
        when the caller asks for the next, so at most one blob is open if
        the caller closes each reader before the next (the caller owns and
        closes every reader). A message that does not open (its wrapped
        key, blob or layout fails authentication, or its blob is gone) is
        yielded as ``(uid, IntegrityError)`` and the rest still open. UIDs
        not in the mailbox are left out. ``keys``: the connection's cache of
        content keys (``ContentKeyCache``). ``rows``: these messages as
        ``read_copies`` gave them in the same worker call, so they are not
        read again (those of other UIDs are ignored).
        """
        self.check_access(session, write=False)
        wanted = set(uids)
        if not wanted:
            return
        if rows is not None:
            yield from self._open_rows(session, [
                (c.meta.uid, c.wrapped_key, c.meta.message_id, c.blob_id) for c in rows if c.meta.uid in wanted
            ], keys)
            return
        with self._sessions() as s:
            box = self._mailbox(s, session.account_id, mailbox)
            q = (
                select(MessageCopy.uid, MessageCopy.wrapped_key, Message.public_id, Message.blob_id)
                .join(Message, Message.id == MessageCopy.message_id)
                .where(MessageCopy.mailbox_id == box.id)
                .order_by(MessageCopy.uid)
            )
            if len(wanted) <= _IN_LIST_MAX:
                q = q.where(MessageCopy.uid.in_(sorted(wanted)))
            else:
                q = q.where(MessageCopy.uid.between(min(wanted), max(wanted)))
            found = [(r.uid, r.wrapped_key, r.public_id, r.blob_id) for r in s.execute(q) if r.uid in wanted]
        yield from self._open_rows(session, found, keys)

    def _open_rows(
        self, session: AccountSession, rows: Sequence[tuple[int, bytes, str, str]], keys: ContentKeyCache | None
    ) -> Iterator[tuple[int, crypto.SealedReader | IntegrityError]]:
        """``open_messages`` of (uid, wrapped key, public id, blob id) rows."""
        content_keys = self._unwrap_keys(session, [(wrapped, pid) for _, wrapped, pid, _ in rows], keys)
        for (uid, _, public_id, blob_id), key in zip(rows, content_keys):
            if isinstance(key, IntegrityError):
                yield uid, key
                continue
            try:
                src = self.blobs.open(blob_id)
            except IntegrityError as exc:
                yield uid, exc
                continue
            try:
                reader = crypto.SealedReader(src, key, public_id.encode())
            except IntegrityError as exc:
                src.close()
                yield uid, exc
                continue
            except BaseException:
                src.close()
                raise
            yield uid, reader

    def summaries(
        self, session: AccountSession, mailbox: str, uids: Sequence[int], keys: ContentKeyCache | None = None
    ) -> dict[int, dict[str, Any]]:
        """The summaries (``postvault.mime.summary`` format) of the messages
        with these UIDs; UIDs not in the mailbox are left out.

        One query and at most one content-key unwrap per message (none for
        those already in ``keys``, the connection's cache); no blob is read,
        except once for a message stored before summaries existed, whose
        summary is then made from its content and kept (sealed) for next time.
        """
        self.check_access(session, write=False)
        wanted = set(uids)
        if not wanted:
            return {}
        asked = sorted(wanted)
        params: dict[str, Any] = {"account": session.account_id, "name": _box_key(mailbox)}
        rows: list[Any] = []
        with fastread.snapshot(self.engine) as conn:
            for i in range(0, len(asked), _IN_LIST_MAX):
                params["uids"] = asked[i:i + _IN_LIST_MAX]
                rows.extend(_SUMMARY_ROWS.rows(conn, params))
            if not rows:
                if not _MARKS.rows(conn, params):
                    raise MailboxNotFound(f"no mailbox named {mailbox!r}")
                return {}
        content_keys: list[bytes] = []
        for k in self._unwrap_keys(session, [(r.wrapped_key, r.public_id) for r in rows], keys):
            if isinstance(k, IntegrityError):
                raise k
            content_keys.append(k)
        missing = [
            (r.id, r.public_id, r.blob_id, k, r.uid) for r, k in zip(rows, content_keys) if r.sealed_summary is None
        ]
        sealed = [(r, k) for r, k in zip(rows, content_keys) if r.sealed_summary is not None]
        docs = crypto.open_small_many(
            SUMMARY_LABEL, ((k, r.public_id.encode(), r.sealed_summary) for r, k in sealed)
        )
        out = _decode_many([r.uid for r, _ in sealed], docs)
        if missing:
            out.update(self._backfill_summaries(missing))
        return out

    def _backfill_summaries(self, missing: Sequence[tuple[int, str, str, bytes, int]]) -> dict[int, dict[str, Any]]:
        """Summaries of messages stored before revision 0004, made from
        their content (read once) and stored sealed for next time."""
        out: dict[int, dict[str, Any]] = {}
        sealed: dict[int, bytes] = {}
        for message_id, public_id, blob_id, content_key, uid in missing:
            src = self.blobs.open(blob_id)
            try:
                reader = crypto.SealedReader(src, content_key, public_id.encode())
            except BaseException:
                src.close()
                raise
            with reader:
                data = reader.read()
            out[uid] = summarize(data)
            sealed[message_id] = self._seal_summary(data, content_key, public_id)
            del data
        with unit_of_work(self._sessions) as s:
            for message_id, value in sealed.items():
                msg = s.get(Message, message_id)
                # Another session may have filled it meanwhile; either is fine.
                if msg is not None and msg.sealed_summary is None:
                    msg.sealed_summary = value
        return out

    def set_flags(
        self,
        session: AccountSession,
        mailbox: str,
        uids: Sequence[int],
        flags: Iterable[str],
        mode: Literal["set", "add", "remove"] = "set",
        *,
        audit_event: Callable[[list[str]], audit.Event | None] | None = None,
    ) -> dict[int, frozenset[str]]:
        """STORE FLAGS / +FLAGS / -FLAGS; returns the new flags per UID.

        ``audit_event(public ids)``: the event to append in the same
        transaction, given the public ids of the messages found (ascending
        UID), or None for none; the change and its audit entry commit
        together or not at all (IMAP STORE: one commit, not two)."""
        self.check_access(session, write=True)
        wanted = check_flags(flags)
        out: dict[int, frozenset[str]] = {}
        changed: list[int] = []
        asked = sorted(set(uids))
        # Core statements built once, reads on the sqlite3 connection: the
        # ORM's unit of work (a locked, refreshed Mailbox object and one
        # object per copy) was half of a STORE's CPU.
        with fastread.kept_connection(self.engine, write=True) as conn:
            with conn.begin():
                box = _BOX_FOR_WRITE.rows(conn, {"account": session.account_id, "name": _box_key(mailbox)})
                if not box:
                    raise MailboxNotFound(f"no mailbox named {mailbox!r}")
                box_id, box_name, highest = box[0]
                found: list[Any] = []
                for i in range(0, len(asked), _IN_LIST_MAX):
                    found.extend(_COPY_FLAGS.rows(conn, {"box": box_id, "uids": asked[i:i + _IN_LIST_MAX]}))
                writes = []
                for uid, text, _ in found:
                    old = flags_set(text)
                    new = wanted if mode == "set" else (old | wanted if mode == "add" else old - wanted)
                    if new != old:
                        highest += 1
                        writes.append({"box": box_id, "u": uid, "f": flags_text(new), "m": highest})
                        changed.append(uid)
                    out[uid] = new
                if writes:
                    conn.execute(_SET_COPY_FLAGS, writes)
                    conn.execute(_SET_HIGHEST, {"box": box_id, "hm": highest})
                event = audit_event([pid for _, _, pid in found]) if audit_event is not None and found else None
                if event is not None:
                    audit.record_many(conn, [event])
        self._publish(Change(session.account_id, box_name, "flags", tuple(changed)))
        return out

    def copy(self, session: AccountSession, mailbox: str, uids: Sequence[int], dest: str) -> CopyResult:
        return self._copy(session, mailbox, uids, dest, move=False)

    def move(self, session: AccountSession, mailbox: str, uids: Sequence[int], dest: str) -> CopyResult:
        return self._copy(session, mailbox, uids, dest, move=True)

    def _copy(self, session: AccountSession, mailbox: str, uids: Sequence[int], dest: str, *, move: bool) -> CopyResult:
        self.check_access(session, write=True)
        # The wrapped key is bound to the account and message, not the
        # mailbox, so a copy inside one account re-uses it: no private key,
        # no re-encryption.
        pairs = []
        with unit_of_work(self._sessions) as s:
            # Both rows locked in one order (by name, as delivery does), so
            # a COPY one way and one the other way cannot deadlock.
            order = sorted({mailbox, dest}, key=lambda n: "INBOX" if n.upper() == "INBOX" else n)
            locked = {name: self._mailbox(s, session.account_id, name, lock=True) for name in order}
            src, dst = locked[mailbox], locked[dest]
            copies = list(
                s.scalars(
                    select(MessageCopy)
                    .where(MessageCopy.mailbox_id == src.id, MessageCopy.uid.in_(list(uids)))
                    .order_by(MessageCopy.uid)
                )
            )
            # The search index and header cache entries go along
            # (searchindex.py, headercache.py): bound to the account and
            # message, like the wrapped key. Read apart, as the columns are
            # deferred (one query per _IN_LIST_MAX copies).
            entries: dict[int, tuple[bytes | None, bytes | None]] = {}
            ids = [c.id for c in copies]
            for i in range(0, len(ids), _IN_LIST_MAX):
                for copy_id, entry, head in s.execute(
                    select(MessageCopy.id, MessageCopy.sealed_search, MessageCopy.sealed_header)
                    .where(MessageCopy.id.in_(ids[i:i + _IN_LIST_MAX]),
                           or_(MessageCopy.sealed_search.is_not(None), MessageCopy.sealed_header.is_not(None)))
                ):
                    entries[copy_id] = (entry, head)
            for c in copies:
                msg = s.get(Message, c.message_id)
                assert msg is not None
                flags = flags_set(c.flags)
                entry, head = entries.get(c.id, (None, None))
                pairs.append((c.uid, self._add_copy(s, dst, msg, c.wrapped_key, flags, c.internal_date, c.size,
                                                    entry, head)))
                if move:
                    s.delete(c)
            if move and copies:
                src.highestmodseq += 1
            validity = dst.uidvalidity
        # Into the destination first: an observer of both never sees the
        # message nowhere.
        self._publish(Change(session.account_id, dst.name, "exists", tuple(d for _, d in pairs)))
        if move:
            self._publish(Change(session.account_id, src.name, "expunge", tuple(u for u, _ in pairs)))
        return CopyResult(validity, tuple(pairs))

    def expunge(self, session: AccountSession, mailbox: str, uids: Sequence[int] | None = None) -> list[int]:
        """Remove messages flagged \\Deleted (only among ``uids`` if given,
        as UID EXPUNGE, RFC 4315 §2.1); returns the removed UIDs ascending."""
        return [uid for uid, _ in self.expunge_messages(session, mailbox, uids)]

    def expunge_messages(
        self, session: AccountSession, mailbox: str, uids: Sequence[int] | None = None
    ) -> list[tuple[int, str]]:
        """``expunge``, returning (UID, message public id) of each removed
        copy: the audit log names what went, and afterwards nothing can
        look it up any more."""
        self.check_access(session, write=True)
        with unit_of_work(self._sessions) as s:
            box = self._mailbox(s, session.account_id, mailbox, lock=True)
            q = (
                select(MessageCopy, Message.public_id)
                .join(Message, Message.id == MessageCopy.message_id)
                .where(MessageCopy.mailbox_id == box.id)
                .order_by(MessageCopy.uid)
            )
            if uids is not None:
                q = q.where(MessageCopy.uid.in_(list(uids)))
            doomed = [(c, pid) for c, pid in s.execute(q) if "\\Deleted" in flags_set(c.flags)]
            orphan_blobs = self._remove_copies(s, [c for c, _ in doomed])
            if doomed:
                box.highestmodseq += 1
        for blob_id in orphan_blobs:
            self._discard_blob(blob_id)
        self._publish(Change(session.account_id, box.name, "expunge", tuple(c.uid for c, _ in doomed)))
        return [(c.uid, pid) for c, pid in doomed]

    def _remove_copies(self, s: Session, copies: Sequence[MessageCopy]) -> list[str]:
        """Delete these copies, and each message no copy uses any more;
        returns the blobs the caller discards after the commit (EXPUNGE and
        DELETE both go through here)."""
        message_ids = {c.message_id for c in copies}
        for c in copies:
            s.delete(c)
        s.flush()
        return self._drop_orphans(s, message_ids)

    @staticmethod
    def _drop_orphans(s: Session, message_ids: set[int]) -> list[str]:
        """Delete the messages no copy uses; a blob kept in the blob table
        (``smallblobs``) goes in the same transaction, the others' ids are
        returned for the caller to discard after the commit."""
        blobs = []
        for mid in message_ids:
            if s.scalar(select(MessageCopy.id).where(MessageCopy.message_id == mid).limit(1)) is None:
                msg = s.get(Message, mid)
                if msg is not None:
                    blob_id = msg.blob_id
                    s.execute(delete(Message).where(Message.id == mid))
                    if s.scalar(select(Message.id).where(Message.blob_id == blob_id).limit(1)) is not None:
                        continue
                    if not s.execute(delete(BlobChunk).where(BlobChunk.blob_id == blob_id)).rowcount:  # type: ignore[attr-defined]
                        blobs.append(blob_id)
        return blobs
