"""The selected mailbox as one session sees it (RFC 3501 §2.3.1.2, §7.4.1).

A ``SelectedMailbox`` starts from one ``store.mailbox_state`` call (counts
and the UIDs as a compact array: no object per message, so SELECT of
100,000 messages is cheap) and answers every synchronous question
Twisted's ``IMailbox`` asks from memory. Flags are read once, when a
command first needs them (``load_flags``), and kept as an index per
message into a few shared frozensets; other metadata (size, date, public
id) is read per command for the messages it names.

It is the session's view, not the store's: other sessions and SMTP
delivery change the store, and the view catches up only when the server
*applies* their changes (``apply``, from ``store.mailbox_changes``: rows
whose modseq is above the view's, plus the expunged UIDs the change bus
named) at a point where RFC 3501 allows the announcements that follow.

Invariants:
- ``uids`` ascends; sequence number n is ``uids[n - 1]``. Between two
  applied changes it only grows at the end (EXISTS) or loses entries
  that are announced with ``* n EXPUNGE`` in the same breath.
- Once loaded, ``_flag_index`` runs parallel to ``uids``.
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
from array import array
from collections.abc import Iterable
from datetime import datetime, timezone
from dataclasses import dataclass, field

from twisted.mail import imap4
from zope.interface import implementer

from ..store.types import UID_TYPECODE, MailboxChanges, MailboxFlags, MailboxState, first_position
from .parse import SeqSet

# Flags a client may set (RFC 3501 §2.3.2); \* says keywords may be made.
FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
NO_FLAGS: frozenset[str] = frozenset()


class RecentClaims:
    """Which UIDs of a mailbox some session has already seen as \\Recent:
    (account id, mailbox name) -> the first UID nobody has claimed yet.

    Kept in memory: before any session of this process claims a mailbox,
    what arrived since the process started counts as recent (the store
    finds the first such UID: ``mailbox_state(..., since=started)``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claimed: dict[tuple[int, str], int] = {}
        self.started = datetime.now(timezone.utc)

    def claimed(self, account_id: int, mailbox: str) -> bool:
        """Whether some session of this process has claimed the mailbox."""
        with self._lock:
            return (account_id, mailbox) in self._claimed

    @staticmethod
    def first_new(state: MailboxState) -> int:
        """The first UID that arrived since start-up (uidnext if none)."""
        return state.first_since if state.first_since is not None else state.mailbox.uidnext

    def peek(self, account_id: int, state: MailboxState) -> int:
        """The first recent UID, claiming nothing (EXAMINE, STATUS)."""
        with self._lock:
            return self._claimed.get((account_id, state.mailbox.name), self.first_new(state))

    def claim(self, account_id: int, state: MailboxState) -> int:
        """Like ``peek``, and take everything below uidnext for the caller."""
        key = (account_id, state.mailbox.name)
        with self._lock:
            first = self._claimed.get(key, self.first_new(state))
            self._claimed[key] = max(first, state.mailbox.uidnext)
            return first

    def forget(self, account_id: int, mailbox: str) -> None:
        """DELETE: a folder made later under this name starts afresh."""
        with self._lock:
            self._claimed.pop((account_id, mailbox), None)

    def rename(self, account_id: int, old: str, new: str) -> None:
        """RENAME (the folder and those below it): the claims follow the
        UIDs, which the renamed folders keep."""
        with self._lock:
            for (acct, name) in list(self._claimed):
                if acct == account_id and (name == old or name.startswith(old + "/")):
                    self._claimed[(acct, new + name[len(old):])] = self._claimed.pop((acct, name))

    def claim_to(self, account_id: int, mailbox: str, uidnext: int) -> None:
        """A session that has the mailbox selected read-write took what
        arrived up to ``uidnext``."""
        key = (account_id, mailbox)
        with self._lock:
            self._claimed[key] = max(self._claimed.get(key, uidnext), uidnext)


@dataclass
class Updates:
    """Untagged responses a refresh produced, in the order to send them."""

    lines: list[bytes] = field(default_factory=list)
    expunged: int = 0


@implementer(imap4.IMailboxInfo, imap4.IMailbox)
class SelectedMailbox:
    """One session's view of its selected mailbox."""

    def __init__(self, state: MailboxState, writable: bool, recent_from: int) -> None:
        box = state.mailbox
        self.name = box.name
        self.special_use = box.special_use
        self.writable = writable
        self.uidvalidity = box.uidvalidity
        self.uidnext = box.uidnext
        self.highestmodseq = box.highestmodseq
        self.uids: array[int] = array(UID_TYPECODE, state.uids)
        # Until flags are loaded, what SELECT reported stands.
        self._state_unseen = state.unseen
        self._state_first_unseen = state.first_unseen
        self._keywords = state.keywords
        self._flag_index: array[int] | None = None
        self._flag_sets: list[frozenset[str]] = []
        self._flag_ids: dict[frozenset[str], int] = {}
        self.recent: set[int] = set(self.uids[bisect.bisect_left(self.uids, recent_from):])
        self.ghosts: set[int] = set()
        # Set when the store may have changed this mailbox in ways the
        # change bus did not name (another process): catch up by modseq.
        self.dirty = False
        # UIDs the bus said were expunged, or re-flagged by another
        # session, since the view last caught up.
        self.pending_expunge: set[int] = set()
        self.pending_flags: set[int] = set()

    # -- what SELECT reports ----------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def flags_loaded(self) -> bool:
        return self._flag_index is not None

    def first_unseen(self) -> int | None:
        if self._flag_index is None:
            uid = self._state_first_unseen
            return None if uid is None else self.seq_of(uid)
        # Per flag set without \Seen, its first position: a byte search
        # of the index's 4-byte entries (``array.index`` made a Python int
        # of every entry it passed: a fifth of a SELECT of 10,000 messages).
        data = self._flag_index.tobytes()
        size = self._flag_index.itemsize
        first: int | None = None
        for k, fs in enumerate(self._flag_sets):
            if "\\Seen" not in fs:
                at = first_position(data, size, k)
                if at is not None and (first is None or at < first):
                    first = at
        return None if first is None else first + 1

    def unseen_count(self) -> int:
        if self._flag_index is None:
            return self._state_unseen
        return sum(1 for seq in range(1, len(self.uids) + 1) if "\\Seen" not in self.flags_at(seq))

    def keywords(self) -> list[str]:
        found = set(self._keywords)
        for flags in self._flag_sets:
            found.update(f for f in flags if not f.startswith("\\"))
        return sorted(found)

    # -- flags --------------------------------------------------------------------

    def load_flags(self, loaded: MailboxFlags) -> None:
        """Take the store's flags; a message of the view the store no longer
        has was expunged by someone else: it becomes a ghost (the bus
        names it too, or the next catch-up finds it)."""
        mine = self.uids
        if loaded.uids == mine:
            ids: dict[frozenset[str], int] = {}
            for k, fs in enumerate(loaded.sets):
                ids.setdefault(fs, k)
            if len(ids) == len(loaded.sets):
                # Distinct sets (the usual case): the index is taken as it
                # is, one C-level copy (SELECT of a cached view is little
                # more than this).
                self._flag_sets = list(loaded.sets)
                self._flag_ids = ids
                self._flag_index = array("I", loaded.index)
                return
        self._flag_sets = [NO_FLAGS]
        self._flag_ids = {NO_FLAGS: 0}
        if loaded.uids == mine:
            # The same UIDs (read with the view, at SELECT): no ghosts, and
            # the index maps over in one C-level pass.
            remap = [self._intern(fs) for fs in loaded.sets]
            self._flag_index = array("I", map(remap.__getitem__, loaded.index))
            return
        index = array("I", bytes(4 * len(self.uids)))
        i = 0
        n = len(mine)
        for uid, k in zip(loaded.uids, loaded.index):
            while i < n and mine[i] < uid:
                self.ghosts.add(mine[i])
                i += 1
            if i < n and mine[i] == uid:
                index[i] = self._intern(loaded.sets[k])
                i += 1
        while i < n:
            self.ghosts.add(mine[i])
            i += 1
        self._flag_index = index

    def _intern(self, flags: frozenset[str]) -> int:
        n = self._flag_ids.get(flags)
        if n is None:
            n = self._flag_ids[flags] = len(self._flag_sets)
            self._flag_sets.append(flags)
        return n

    def flags_at(self, seq: int) -> frozenset[str]:
        assert self._flag_index is not None, "flags not loaded"
        return self._flag_sets[self._flag_index[seq - 1]]

    def flags_of(self, uid: int) -> frozenset[str]:
        """The flags of a message of the view (empty for one it lacks)."""
        seq = self.seq_of(uid)
        return NO_FLAGS if seq is None else self.flags_at(seq)

    def set_flags(self, new: dict[int, frozenset[str]]) -> None:
        assert self._flag_index is not None, "flags not loaded"
        for uid, flags in new.items():
            seq = self.seq_of(uid)
            if seq is not None:
                self._flag_index[seq - 1] = self._intern(flags)

    def search_view(self) -> tuple[array[int], array[int], list[frozenset[str]], frozenset[int], frozenset[int]]:
        """Copies of the UIDs, the flag index, the flag sets, the \\Recent
        UIDs and the ghosts, for a SEARCH on a worker thread (the view
        itself may change meanwhile). Flags must be loaded."""
        assert self._flag_index is not None, "flags not loaded"
        return (array(UID_TYPECODE, self.uids), array("I", self._flag_index), list(self._flag_sets),
                frozenset(self.recent), frozenset(self.ghosts))

    def live(self, uid: int) -> bool:
        return uid not in self.ghosts

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
        ranges: list[tuple[int, int]] = []
        if uid:
            largest = self.uids[-1]
            for lo, hi in seqset.resolve(largest):
                a = bisect.bisect_left(self.uids, lo)
                b = bisect.bisect_right(self.uids, hi)
                if a < b:
                    ranges.append((a + 1, b))
        else:
            largest = len(self.uids)
            for lo, hi in seqset.resolve(largest):
                if hi > largest:
                    raise ValueError(f"There are only {largest} messages in this mailbox.")
                ranges.append((lo, hi))
        if len(ranges) == 1:
            lo, hi = ranges[0]
            return list(zip(range(lo, hi + 1), self.uids[lo - 1:hi]))
        out: set[int] = set()
        for lo, hi in ranges:
            out.update(range(lo, hi + 1))
        return [(s, self.uids[s - 1]) for s in sorted(out)]

    # -- catching up ----------------------------------------------------------

    def apply(self, changes: MailboxChanges, allow_expunge: bool, claim_recent: bool = True,
              present: Iterable[int] | None = None) -> Updates:
        """Bring the view up to ``changes`` (rows with modseq above the
        view's) and the expunges the bus named (``pending_expunge``);
        ``present``, when given, is every UID the mailbox holds now (read
        because the counts did not add up: someone the bus can't hear
        expunged). Returns what to tell the client. Flags must be loaded."""
        assert self._flag_index is not None, "flags not loaded"
        out = Updates()
        gone = {u for u in self.pending_expunge if self.seq_of(u) is not None}
        self.pending_expunge.clear()
        if present is not None:
            keep = set(present)
            gone.update(u for u in self.uids if u not in keep)
        if allow_expunge:
            gone |= self.ghosts
            if gone:
                for seq in range(len(self.uids), 0, -1):
                    if self.uids[seq - 1] in gone:
                        out.lines.append(b"%d EXPUNGE" % seq)
                self._remove(gone)
                out.expunged = len(gone)
            self.ghosts.clear()
        else:
            self.ghosts |= gone
        # Flag changes of messages the client knows; a change another
        # session announced is repeated even if the flags were read after
        # it (the client may hold older ones).
        announce, self.pending_flags = self.pending_flags, set()
        last = self.uids[-1] if self.uids else 0
        new = []
        for m in changes.messages:
            if m.uid > last:
                new.append(m)
                continue
            seq = self.seq_of(m.uid)
            if seq is None or m.uid in self.ghosts:
                continue
            if m.flags != self.flags_at(seq) or m.uid in announce:
                self._flag_index[seq - 1] = self._intern(m.flags)
                out.lines.append(b"%d FETCH (UID %d FLAGS (%s))" % (seq, m.uid,
                                                                    flag_text(m.flags, m.uid in self.recent)))
        # New messages (RFC 3501 §7.3.1: EXISTS never decreases without EXPUNGE).
        if new:
            for m in new:
                self.uids.append(m.uid)
                self._flag_index.append(self._intern(m.flags))
                if claim_recent:
                    self.recent.add(m.uid)
            out.lines.append(b"%d EXISTS" % len(self.uids))
            out.lines.append(b"%d RECENT" % len(self.recent))
        top = max((m.modseq for m in changes.messages), default=0)
        self.uidnext = max(self.uidnext, changes.mailbox.uidnext, (self.uids[-1] + 1) if self.uids else 1)
        self.highestmodseq = max(self.highestmodseq, changes.mailbox.highestmodseq, top)
        return out

    def counts_agree(self, changes: MailboxChanges) -> bool:
        """Whether the store's message count is what the view expects once
        ``changes`` and the named expunges are applied; if not, someone the
        bus can't hear expunged, and the caller reads the UIDs."""
        last = self.uids[-1] if self.uids else 0
        named = sum(1 for u in self.pending_expunge if u not in self.ghosts and self.seq_of(u) is not None)
        added = sum(1 for m in changes.messages if m.uid > last)
        return len(self.uids) - len(self.ghosts) - named + added == changes.count

    def _remove(self, doomed: set[int]) -> None:
        keep = [i for i, u in enumerate(self.uids) if u not in doomed]
        self.uids = array(UID_TYPECODE, (self.uids[i] for i in keep))
        if self._flag_index is not None:
            self._flag_index = array("I", (self._flag_index[i] for i in keep))
        for u in doomed:
            self.recent.discard(u)
            self.ghosts.discard(u)

    def forget(self, uids: list[int]) -> list[bytes]:
        """Our own EXPUNGE/MOVE removed ``uids``: the EXPUNGE lines, highest first."""
        doomed = set(uids)
        lines = []
        for seq in range(len(self.uids), 0, -1):
            if self.uids[seq - 1] in doomed:
                lines.append(b"%d EXPUNGE" % seq)
        self._remove(doomed)
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
