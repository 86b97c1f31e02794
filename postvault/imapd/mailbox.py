"""The selected mailbox as one session sees it (RFC 3501 §2.3.1.2, §7.4.1).

A ``SelectedMailbox`` is built from one ``store.snapshot`` call on a worker
thread and then answers every synchronous question Twisted's ``IMailbox``
asks (counts, UID of a sequence number, flags) from memory. It is the
session's view, not the store's: other sessions and SMTP delivery change
the store, and the view catches up only when the server *applies* a fresh
snapshot at a point where RFC 3501 allows the announcements that follow.

Invariants:
- ``uids`` ascends; sequence number n is ``uids[n - 1]``. Between two
  applied snapshots it only grows at the end (EXISTS) or loses entries
  that are announced with ``* n EXPUNGE`` in the same breath.
- A message removed by someone else stays in ``uids`` (a "ghost") until an
  EXPUNGE may be sent, so sequence numbers never shift under a FETCH,
  STORE or SEARCH (RFC 3501 §7.4.1). Fetching a ghost yields nothing and
  the command ends ``NO [EXPUNGEISSUED]`` (RFC 5530, RFC 2180 §4.1.2).
- EXPUNGE responses go out highest sequence number first, so each number
  is valid when the client reads it.
- \\Recent (RFC 3501 §2.3.2) is per process: the first session that selects
  a mailbox read-write after new mail arrived claims it (``RecentClaims``);
  EXAMINE and STATUS look without claiming.
"""

from __future__ import annotations

import bisect
import threading
from datetime import datetime, timezone
from dataclasses import dataclass, field

from twisted.mail import imap4
from zope.interface import implementer

from ..store.types import MailboxSnapshot, MessageMeta
from .parse import SeqSet

# Flags a client may set (RFC 3501 §2.3.2); \* says keywords may be made.
FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


class RecentClaims:
    """Which UIDs of a mailbox some session has already seen as \\Recent:
    (account id, mailbox name) -> the first UID nobody has claimed yet.

    Kept in memory: before any session of this process claims a mailbox,
    what arrived since the process started counts as recent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claimed: dict[tuple[int, str], int] = {}
        self.started = datetime.now(timezone.utc)

    def first_new(self, snapshot: MailboxSnapshot) -> int:
        """The first UID that arrived since start-up (uidnext if none)."""
        for m in snapshot.messages:
            when = m.internal_date if m.internal_date.tzinfo else m.internal_date.replace(tzinfo=timezone.utc)
            if when >= self.started:
                return m.uid
        return snapshot.mailbox.uidnext

    def peek(self, account_id: int, snapshot: MailboxSnapshot) -> int:
        """The first recent UID, claiming nothing (EXAMINE, STATUS)."""
        with self._lock:
            return self._claimed.get((account_id, snapshot.mailbox.name), self.first_new(snapshot))

    def claim(self, account_id: int, snapshot: MailboxSnapshot) -> int:
        """Like ``peek``, and take everything below uidnext for the caller."""
        key = (account_id, snapshot.mailbox.name)
        with self._lock:
            first = self._claimed.get(key, self.first_new(snapshot))
            self._claimed[key] = max(first, snapshot.mailbox.uidnext)
            return first


@dataclass
class Updates:
    """Untagged responses a refresh produced, in the order to send them."""

    lines: list[bytes] = field(default_factory=list)
    expunged: int = 0


@implementer(imap4.IMailboxInfo, imap4.IMailbox)
class SelectedMailbox:
    """One session's view of its selected mailbox."""

    def __init__(self, snapshot: MailboxSnapshot, writable: bool, recent_from: int) -> None:
        box = snapshot.mailbox
        self.name = box.name
        self.special_use = box.special_use
        self.writable = writable
        self.uidvalidity = box.uidvalidity
        self.uidnext = box.uidnext
        self.highestmodseq = box.highestmodseq
        self.uids: list[int] = [m.uid for m in snapshot.messages]
        self.meta: dict[int, MessageMeta] = {m.uid: m for m in snapshot.messages}
        self.flags: dict[int, frozenset[str]] = {m.uid: m.flags for m in snapshot.messages}
        self.recent: set[int] = {u for u in self.uids if u >= recent_from}
        self.ghosts: set[int] = set()
        # Set when the store changed this mailbox after our snapshot.
        self.dirty = False

    # -- what SELECT reports ----------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    def first_unseen(self) -> int | None:
        for seq, uid in enumerate(self.uids, 1):
            if "\\Seen" not in self.flags.get(uid, frozenset()):
                return seq
        return None

    def unseen_count(self) -> int:
        return sum(1 for u in self.uids if "\\Seen" not in self.flags.get(u, frozenset()))

    def keywords(self) -> list[str]:
        found = set()
        for flags in self.flags.values():
            found.update(f for f in flags if not f.startswith("\\"))
        return sorted(found)

    # -- numbers ----------------------------------------------------------------

    def seq_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def resolve(self, seqset: SeqSet, uid: bool) -> list[tuple[int, int]]:
        """(seq, uid) pairs a set names, ascending. Sequence numbers beyond
        the mailbox raise ``ValueError`` (RFC 3501 §9: "invalid"); UIDs that
        do not exist are skipped (RFC 3501 §6.4.8)."""
        if not self.uids:
            if uid:
                return []
            raise ValueError("The mailbox is empty.")
        out: set[int] = set()
        if uid:
            largest = self.uids[-1]
            for lo, hi in seqset.resolve(largest):
                a = bisect.bisect_left(self.uids, lo)
                b = bisect.bisect_right(self.uids, hi)
                out.update(range(a + 1, b + 1))
        else:
            largest = len(self.uids)
            for lo, hi in seqset.resolve(largest):
                if hi > largest:
                    raise ValueError(f"There are only {largest} messages in this mailbox.")
                out.update(range(lo, hi + 1))
        return [(s, self.uids[s - 1]) for s in sorted(out)]

    # -- catching up ----------------------------------------------------------

    def set_flags(self, new: dict[int, frozenset[str]]) -> None:
        for uid, flags in new.items():
            if uid in self.flags:
                self.flags[uid] = flags

    def apply(self, snap: MailboxSnapshot, allow_expunge: bool, claim_recent: bool = True) -> Updates:
        """Bring the view to ``snap``; returns what to tell the client."""
        out = Updates()
        current = {m.uid: m for m in snap.messages}
        gone = [u for u in self.uids if u not in current]
        if gone and allow_expunge:
            gone_set = set(gone)
            for seq in range(len(self.uids), 0, -1):
                uid = self.uids[seq - 1]
                if uid in gone_set:
                    out.lines.append(b"%d EXPUNGE" % seq)
                    del self.meta[uid]
                    self.flags.pop(uid, None)
                    self.recent.discard(uid)
            self.uids = [u for u in self.uids if u not in gone_set]
            self.ghosts.clear()
            out.expunged = len(gone)
        elif gone:
            self.ghosts.update(gone)
        # Flag changes of messages the client knows.
        for seq, uid in enumerate(self.uids, 1):
            m = current.get(uid)
            if m is not None and m.flags != self.flags.get(uid):
                self.flags[uid] = m.flags
                self.meta[uid] = m
                out.lines.append(b"%d FETCH (UID %d FLAGS (%s))" % (seq, uid, flag_text(m.flags, uid in self.recent)))
        # New messages (RFC 3501 §7.3.1: EXISTS never decreases without EXPUNGE).
        last = self.uids[-1] if self.uids else 0
        new = [m for m in snap.messages if m.uid > last]
        if new:
            for m in new:
                self.uids.append(m.uid)
                self.meta[m.uid] = m
                self.flags[m.uid] = m.flags
                if claim_recent:
                    self.recent.add(m.uid)
            out.lines.append(b"%d EXISTS" % len(self.uids))
            out.lines.append(b"%d RECENT" % len(self.recent))
        self.uidnext = snap.mailbox.uidnext
        self.highestmodseq = snap.mailbox.highestmodseq
        return out

    def forget(self, uids: list[int]) -> list[bytes]:
        """Our own EXPUNGE/MOVE removed ``uids``: the EXPUNGE lines, highest first."""
        doomed = set(uids)
        lines = []
        for seq in range(len(self.uids), 0, -1):
            if self.uids[seq - 1] in doomed:
                lines.append(b"%d EXPUNGE" % seq)
        self.uids = [u for u in self.uids if u not in doomed]
        for u in doomed:
            self.meta.pop(u, None)
            self.flags.pop(u, None)
            self.recent.discard(u)
            self.ghosts.discard(u)
        return lines

    # -- twisted.mail.imap4.IMailbox (the synchronous getters) ---------------

    def getFlags(self) -> list[str]:
        return list(FLAGS)

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def getUIDValidity(self) -> int:
        return self.uidvalidity

    def getUIDNext(self) -> int:
        return self.uidnext

    def getUID(self, message: int) -> int:
        return self.uids[message - 1]

    def getMessageCount(self) -> int:
        return self.exists

    def getRecentCount(self) -> int:
        return len(self.recent)

    def getUnseenCount(self) -> int:
        return self.unseen_count()

    def isWriteable(self) -> bool:
        return self.writable

    def destroy(self) -> None:
        raise imap4.MailboxException("Folders can't be destroyed this way.")

    def requestStatus(self, names: list[str]) -> dict[str, int]:
        return imap4.statusRequestHelper(self, names)  # type: ignore[no-any-return]

    def addListener(self, listener: object) -> None:
        """Changes reach the session through the store's change bus."""

    def removeListener(self, listener: object) -> None:
        """See addListener."""


def flag_text(flags: frozenset[str], recent: bool = False) -> bytes:
    ordered = sorted(flags)
    if recent:
        ordered.append("\\Recent")
    return " ".join(ordered).encode("ascii")
