"""The delivery path of ``MailStore.deliver``, in two halves.

``PreparedDelivery`` is everything that needs no write lock, made on the
caller's thread: the accounts read once, the message sealed (a large one's
blob durably written; a small one's kept for the filing transaction,
``smallblobs``), the content key wrapped for each owner, the Message-ID and
the cited ids hashed for the thread index.

``write_deliveries`` files any number of prepared messages inside ONE write
transaction the caller opened and will commit, with SQLAlchemy Core
statements (no ORM unit of work) and few round trips per message:

- the UIDs: per mailbox the batch files into, one ``UPDATE mailboxes SET
  uidnext = uidnext + n, highestmodseq = highestmodseq + n ... RETURNING``
  (n: that batch's copies there). That statement is the row lock (inside
  SQLite's BEGIN IMMEDIATE; a row lock on PostgreSQL) and hands out n
  consecutive UIDs, given to the messages in batch order, so UIDs stay
  strictly ascending and never reused (RFC 3501 §2.3.1.1) and each copy
  gets a modseq of its own, exactly as one transaction per message would;
  both engines support RETURNING (SQLite >= 3.35);
- the blobs of the small messages, in one multi-row insert;
- per message: the thread (the cited ids the sender holds, else a new
  thread row; the participants it lacks, in one multi-row insert) and the
  message row;
- the copies of the whole batch, in one multi-row insert;
- the audit events of the whole batch: the previous hash read once, the
  chain computed exactly as ``audit.record`` does, one multi-row insert;
- per message with a ``then`` hook (the SMTP server's new-mail
  notifications), the hook, inside a SAVEPOINT of the same transaction
  (one for the batch; one per message only after a failure):
  the claims and the queued emails commit with the message (one commit,
  one fsync, for both), and a hook that fails is rolled back alone and
  costs neither its message nor the rest of the batch anything.

Messages in one batch are written in order, so a reply later in the batch
finds the thread of an earlier one, as it would one transaction later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, bindparam, func, insert, select, update

from ..errors import MailboxNotFound, NoSuchAccount
from . import audit, smallblobs, threads
from .fastread import FastSelect, FastWrite
from .models import Account, Mailbox, Message, MessageCopy, Thread, ThreadParticipant
from .notify import Change
from .sqlcompat import insert_ignoring_duplicates
from .types import DeliveryResult, flags_text

log = logging.getLogger(__name__)

_MAILBOXES = Mailbox.__table__
_MESSAGES = Message.__table__
_COPIES = MessageCopy.__table__
_THREADS = Thread.__table__
_PARTICIPANTS = ThreadParticipant.__table__

# Built once: a statement object made per call costs more CPU (SQLAlchemy's
# coercions and cache keys) than SQLite takes to run it.
_OWNERS = FastSelect(select(
    Account.id, Account.email, Account.public_key, Account.key_owner, Account.practice_name,
).where(func.lower(Account.email).in_(bindparam("emails", expanding=True))))
_HELD = (
    select(Message.thread_id)
    .join(MessageCopy, MessageCopy.message_id == Message.id)
    .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
    .where(Mailbox.account_id == bindparam("holder"), Message.origin == "submission",
           Message.thread_id.is_not(None), Message.mid_hash == bindparam("hash"))
    .limit(1)
)
_NEW_THREAD = insert(_THREADS)
_PARTICIPANTS_OF = select(_PARTICIPANTS.c.email).where(_PARTICIPANTS.c.thread_id == bindparam("thread"))
_NEW_MESSAGE = insert(_MESSAGES)
_NEXT_UIDS = (
    update(_MAILBOXES)
    .where(_MAILBOXES.c.account_id == bindparam("owner"), _MAILBOXES.c.name == bindparam("box"))
    .values(uidnext=_MAILBOXES.c.uidnext + bindparam("n"), highestmodseq=_MAILBOXES.c.highestmodseq + bindparam("n"))
    .returning(_MAILBOXES.c.id, _MAILBOXES.c.uidnext, _MAILBOXES.c.highestmodseq)
)
_ADD_COPIES = insert(_COPIES)
# The per-message writes on the sqlite3 connection (fastread.FastWrite):
# through Core each cost more CPU than SQLite takes to run it.
_NEW_THREAD_W = FastWrite(_NEW_THREAD, ["created_at"])
_NEW_MESSAGE_W = FastWrite(_NEW_MESSAGE, ["public_id", "blob_id", "size", "mid_hash", "thread_id", "created_at",
                                          "origin", "sealed_summary"])
_ADD_COPIES_W = FastWrite(_ADD_COPIES, ["mailbox_id", "uid", "message_id", "flags", "internal_date", "size",
                                        "modseq", "wrapped_key"])
_NEXT_UIDS_W = FastWrite(_NEXT_UIDS, ["owner", "box", "n"])
_ADD_PARTICIPANTS_SQLITE = FastWrite(insert_ignoring_duplicates(_PARTICIPANTS, "sqlite"), ["thread_id", "email"])


@dataclass(frozen=True)
class Owner:
    """What delivery needs of an account: no secrets, the public key only."""

    id: int
    email: str
    public_key: bytes
    key_owner: str
    practice_name: str = ""


def load_owners(conn: Connection, emails: Sequence[str]) -> list[Owner]:
    """The accounts of ``emails``, in that order, in one query; the first
    unknown one raises ``NoSuchAccount``."""
    wanted = [e.strip().lower() for e in emails]
    rows = _OWNERS.rows(conn, {"emails": sorted(set(wanted))})
    found = {r.email.lower(): Owner(r.id, r.email, r.public_key, r.key_owner, r.practice_name) for r in rows}
    out = []
    for given, key in zip(emails, wanted):
        owner = found.get(key)
        if owner is None:
            raise NoSuchAccount(f"no account for {given.strip()}")
        out.append(owner)
    return out


@dataclass(frozen=True)
class Copy:
    """One copy to file: the owner, its mailbox, the content key wrapped to it."""

    owner: Owner
    mailbox: str
    wrapped_key: bytes
    flags: tuple[str, ...]


AfterFiling = Callable[[Connection, "PreparedDelivery", DeliveryResult], object]


@dataclass
class PreparedDelivery:
    """A sealed message, ready to be filed: its blob on disk, or in
    ``inline`` for the filing transaction to write."""

    public_id: str
    blob_id: str
    size: int
    sealed_summary: bytes
    sender: Owner
    inboxes: list[Copy]
    sent: Copy | None
    participants: frozenset[str]
    mid_hash: bytes | None
    ref_hashes: tuple[bytes, ...]
    stamp: datetime
    client_ip: str | None
    protocol: str | None
    # The sealed blob, for a small message: written as a row of the blob
    # table by the transaction that files it (smallblobs).
    inline: bytes | None = None
    changes: list[Change] = field(default_factory=list)
    # Run inside the transaction that files this message, after it is
    # filed (see the module docstring); what it writes commits with it.
    then: AfterFiling | None = None

    def copies(self) -> list[Copy]:
        return [*self.inboxes, *([self.sent] if self.sent is not None else [])]


def _held_thread(conn: Connection, holder_id: int, hashes: Sequence[bytes]) -> int | None:
    """As ``MailStore._held_thread``: the thread of the first cited message
    the holder holds as delivered mail (In-Reply-To first)."""
    for h in hashes:
        found = conn.scalar(_HELD, {"holder": holder_id, "hash": h})
        if found is not None:
            return int(found)
    return None


def _thread(conn: Connection, p: PreparedDelivery) -> int:
    """The thread this message joins (see ``MailStore._index_thread``), with
    its participants brought up to date."""
    thread_id = _held_thread(conn, p.sender.id, p.ref_hashes)
    if thread_id is None:
        thread_id = _NEW_THREAD_W.run(conn, {"created_at": p.stamp})
        assert thread_id is not None
        known: set[str] = set()
    else:
        known = set(conn.scalars(_PARTICIPANTS_OF, {"thread": thread_id}))
    new = sorted(p.participants - known)
    if new:
        # Skips a participant another process added meanwhile (PostgreSQL).
        rows = [{"thread_id": thread_id, "email": e} for e in new]
        if conn.dialect.name == "sqlite":
            _ADD_PARTICIPANTS_SQLITE.run_many(conn, rows)
        else:
            conn.execute(insert_ignoring_duplicates(_PARTICIPANTS, conn.dialect.name), rows)
    return thread_id


def _mailbox_key(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name  # RFC 3501 §5.1


def _allocate(conn: Connection, wanted: dict[tuple[int, str], int]) -> dict[tuple[int, str], tuple[int, int, int]]:
    """For each (account, mailbox) the number of UIDs wanted: one UPDATE
    per mailbox that takes them all (and locks the row) and returns
    (mailbox id, first UID, modseq before). A mailbox that does not exist
    raises ``MailboxNotFound``. Mailboxes are locked in one order (account,
    name), so two writers on PostgreSQL cannot deadlock on them."""
    out = {}
    for owner, box in sorted(wanted):
        n = wanted[(owner, box)]
        rows = _NEXT_UIDS_W.returning(conn, {"owner": owner, "box": _mailbox_key(box), "n": n})
        if not rows:
            raise MailboxNotFound(f"no mailbox named {box!r}")
        row = rows[0]  # (account, name) is unique
        out[(owner, box)] = (int(row[0]), int(row[1]) - n, int(row[2]) - n)
    return out


def write_deliveries(conn: Connection, batch: Sequence[PreparedDelivery]) -> list[DeliveryResult]:
    """File every message of ``batch``, in order, inside the caller's write
    transaction; fills each one's ``changes`` (to publish after the commit).

    A message citing the Message-ID of an earlier one in the batch must see
    that one filed first (the thread index asks whether its sender holds
    it), so the batch is cut before such a message and the parts written
    one after the other.
    """
    seen: set[bytes] = set()
    for i, p in enumerate(batch):
        if i and seen.intersection(p.ref_hashes):
            return write_deliveries(conn, batch[:i]) + write_deliveries(conn, batch[i:])
        if p.mid_hash is not None:
            seen.add(p.mid_hash)

    # UIDs for the whole batch: one UPDATE per mailbox, in (account, name)
    # order; then handed out in batch order, so they ascend with it.
    wanted: dict[tuple[int, str], int] = {}
    for p in batch:
        for copy in p.copies():
            key = (copy.owner.id, _mailbox_key(copy.mailbox))
            wanted[key] = wanted.get(key, 0) + 1
    boxes = _allocate(conn, wanted)
    taken = {key: 0 for key in boxes}

    smallblobs.write_rows(conn, [(p.blob_id, p.inline) for p in batch if p.inline is not None])
    results = []
    events = []
    copies = []
    for p in batch:
        thread_id = _thread(conn, p)
        message_id = _NEW_MESSAGE_W.run(conn, {
            "public_id": p.public_id, "blob_id": p.blob_id, "size": p.size, "mid_hash": p.mid_hash,
            "thread_id": thread_id, "created_at": p.stamp, "origin": "submission",
            "sealed_summary": p.sealed_summary,
        })
        delivered = []
        p.changes = []
        sent_uid = None
        for copy in p.copies():
            key = (copy.owner.id, _mailbox_key(copy.mailbox))
            mailbox_id, first_uid, modseq = boxes[key]
            k = taken[key]
            taken[key] = k + 1
            uid = first_uid + k
            copies.append({
                "mailbox_id": mailbox_id, "uid": uid, "message_id": message_id, "flags": flags_text(copy.flags),
                "internal_date": p.stamp, "size": p.size, "modseq": modseq + k + 1, "wrapped_key": copy.wrapped_key,
            })
            p.changes.append(Change(copy.owner.id, key[1], "exists", (uid,)))
            if copy is p.sent:
                sent_uid = uid
            else:
                delivered.append((copy.owner.email, uid))
        results.append(DeliveryResult(p.public_id, tuple(delivered), sent_uid))
        events.append(audit.Event(
            "message.deliver", actor=p.sender.email, account=p.sender.email, message=p.public_id,
            client_ip=p.client_ip, protocol=p.protocol, detail=f"recipients={len(delivered)}",
        ))
    _ADD_COPIES_W.run_many(conn, copies)
    audit.record_many(conn, events)
    _run_hooks(conn, [(p, r) for p, r in zip(batch, results) if p.then is not None])
    return results


def _run_hooks(conn: Connection, hooked: Sequence[tuple[PreparedDelivery, DeliveryResult]]) -> None:
    """Each message's ``then``, all in one SAVEPOINT (two statements per
    batch rather than per message); if any raises, that SAVEPOINT is rolled
    back and each hook runs again in one of its own, so that a failing hook
    is undone alone (and logged without content) and its message, filed
    before, stays filed. So a hook may run twice: it must write only
    through ``conn``.

    The SAVEPOINT statements are sent as they are (standard SQL, on SQLite
    and PostgreSQL alike) rather than through ``Connection.begin_nested``,
    whose bookkeeping cost more CPU than the statements themselves; nothing
    else uses savepoints on this connection inside a delivery batch."""
    if not hooked:
        return
    if len(hooked) > 1 and _in_savepoint(conn, lambda: [p.then(conn, p, r) for p, r in hooked]) is None:  # type: ignore[misc]
        return
    for p, result in hooked:
        failed = _in_savepoint(conn, lambda: p.then(conn, p, result))  # type: ignore[misc]
        if failed is not None:
            log.error("after-filing hook for message %s failed; rolled back alone", p.public_id, exc_info=failed)


def _in_savepoint(conn: Connection, work: Callable[[], object]) -> Exception | None:
    """Run ``work`` inside ``SAVEPOINT``; on an exception roll back to it
    (the enclosing transaction goes on) and return that exception."""
    conn.exec_driver_sql("SAVEPOINT pv_after_filing")
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - returned to the caller; the hook's writes are undone here
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT pv_after_filing")
        conn.exec_driver_sql("RELEASE SAVEPOINT pv_after_filing")
        return exc
    conn.exec_driver_sql("RELEASE SAVEPOINT pv_after_filing")
    return None


def hash_thread_ids(key: bytes, head: bytes) -> tuple[bytes | None, tuple[bytes, ...]]:
    """Keyed hashes of the Message-ID and of the cited ids, as the thread
    index keeps them."""
    parsed = threads.parse_thread_headers(head)
    own = threads.mid_hash(key, parsed.message_id) if parsed.message_id else None
    return own, tuple(threads.mid_hash(key, ref) for ref in parsed.references)
