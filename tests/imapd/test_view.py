"""The selected-mailbox view catching up incrementally (``mailbox_changes``
plus the expunged UIDs the bus names) ends where a fresh read of the
mailbox is, and its untagged responses keep a client's sequence numbers
right (RFC 3501 §7.4.1: EXPUNGE highest first, EXISTS only grows without
EXPUNGE, no EXPUNGE while one is not allowed). Real store, random changes
by another session and by "another process" (changes the bus never hears)."""

from __future__ import annotations

import random
import re

from postvault.imapd.mailbox import SelectedMailbox
from postvault.store.api import Store
from postvault.store.notify import Change
from tests.conftest import PASSWORD

LINE = re.compile(rb"(\d+) (EXPUNGE|EXISTS|RECENT|FETCH \(UID (\d+) FLAGS \(([^)]*)\)\))\Z")


def raw(n: int) -> bytes:
    return f"From: a@dental.test\r\nTo: b@dental.test\r\nSubject: v{n}\r\n\r\nbody {n}\r\n".encode()


class ClientModel:
    """What a client knows: UIDs by sequence number, learnt from responses."""

    def __init__(self, uids: list[int]) -> None:
        self.uids: list[int | None] = list(uids)
        self.flags: dict[int, set[str]] = {}

    def read(self, lines: list[bytes], view: SelectedMailbox, allow_expunge: bool) -> None:
        last_expunge = None
        for line in lines:
            m = LINE.match(line)
            assert m, line
            n, what = int(m[1]), m[2]
            if what == b"EXPUNGE":
                assert allow_expunge, line
                assert last_expunge is None or n < last_expunge, "EXPUNGE must go highest first"
                last_expunge = n
                del self.uids[n - 1]
            elif what == b"EXISTS":
                assert n >= len(self.uids), "EXISTS never decreases without EXPUNGE"
                self.uids += [None] * (n - len(self.uids))
            elif what.startswith(b"FETCH"):
                uid = int(m[3])
                assert self.uids[n - 1] == uid, (line, self.uids[n - 1])
                self.flags[uid] = set(m[4].decode().split()) - {"\\Recent"}
        # New messages: the client would FETCH their UIDs now.
        self.uids = [u if u is not None else view.uids[i] for i, u in enumerate(self.uids)]


def catch_up(store: Store, session: object, view: SelectedMailbox, heard: list[Change],
             allow_expunge: bool) -> list[bytes]:
    """What ``IMAPServer._updates`` does, minus the network."""
    for change in heard:
        if change.mailbox != view.name:
            continue
        if change.kind == "expunge":
            view.pending_expunge.update(change.uids)
        elif change.kind == "flags":
            view.pending_flags.update(change.uids)
    heard.clear()
    if not view.flags_loaded:
        view.load_flags(store.message_flags(session, view.name))  # type: ignore[arg-type]
    changes = store.mailbox_changes(session, view.name, view.highestmodseq)  # type: ignore[arg-type]
    present = None
    if not view.counts_agree(changes):
        present = store.mailbox_state(session, view.name).uids  # type: ignore[arg-type]
    return view.apply(changes, allow_expunge, present=present).lines


def test_incremental_view_matches_a_fresh_read(store: Store, people: dict[str, str]) -> None:
    me = store.login(people["member"], PASSWORD)
    other = store.login(people["member"], PASSWORD)  # another session of the same account
    for n in range(20):
        store.append(other, "Drafts", raw(n), ["\\Seen"] if n % 3 else [])
    heard: list[Change] = []
    store.bus.subscribe(me.account_id, heard.append)
    view = SelectedMailbox(store.mailbox_state(me, "Drafts"), writable=True, recent_from=10**9)
    client = ClientModel(list(view.uids))
    rng = random.Random(11)
    n = 100
    bus_blind = 0
    for step in range(60):
        uids = [m.uid for m in store.snapshot(other, "Drafts").messages]
        for _ in range(rng.randint(1, 3)):
            op = rng.choice(["append", "flags", "expunge", "move", "copy-in", "blind"])
            if op == "append":
                n += 1
                store.append(other, "Drafts", raw(n), rng.choice([[], ["\\Seen"], ["$Work"]]))
            elif op == "flags" and uids:
                store.set_flags(other, "Drafts", rng.sample(uids, min(len(uids), 3)),
                                rng.choice([["\\Seen"], ["\\Flagged"], ["$Work", "\\Seen"]]), rng.choice(["add", "set"]))
            elif op == "expunge" and uids:
                store.set_flags(other, "Drafts", rng.sample(uids, min(len(uids), 2)), ["\\Deleted"], "add")
                store.expunge(other, "Drafts")
            elif op == "move" and uids:
                store.move(other, "Drafts", [rng.choice(uids)], "Trash")
            elif op == "copy-in":
                trash = [m.uid for m in store.snapshot(other, "Trash").messages]
                if trash:
                    store.copy(other, "Trash", trash[:2], "Drafts")
            elif op == "blind" and uids:
                # Another process: the change is committed, the bus is silent.
                bus_blind += 1
                listeners = store.bus._subs.pop(me.account_id)
                try:
                    store.set_flags(other, "Drafts", [rng.choice(uids)], ["\\Deleted"], "add")
                    store.expunge(other, "Drafts")
                    n += 1
                    store.append(other, "Drafts", raw(n))
                finally:
                    store.bus._subs[me.account_id] = listeners
        allow = rng.random() < 0.6
        lines = catch_up(store, me, view, heard, allow)
        client.read(lines, view, allow)
        assert client.uids == list(view.uids)
        fresh = store.mailbox_state(me, "Drafts")
        truth = store.message_flags(me, "Drafts")
        flags = {u: truth.sets[i] for u, i in zip(truth.uids, truth.index)}
        if allow:
            assert list(view.uids) == list(fresh.uids) and not view.ghosts, step
        else:
            # Expunged messages wait as ghosts; nothing else differs.
            assert set(view.uids) - view.ghosts == set(fresh.uids)
            assert view.ghosts <= set(view.uids) and not set(fresh.uids) - set(view.uids)
        for seq, uid in enumerate(view.uids, 1):
            if uid not in view.ghosts:
                assert view.flags_at(seq) == flags[uid], (step, uid)
        assert view.uidnext == fresh.mailbox.uidnext
    assert bus_blind > 3  # the count check ran
    # Every flag change another session made was told to the client.
    lines = catch_up(store, me, view, heard, True)
    client.read(lines, view, True)
    for uid, told in client.flags.items():
        if uid in set(view.uids):
            assert told == set(view.flags_of(uid))


def test_flags_read_late_still_announce_changes_heard_meanwhile(store: Store, people: dict[str, str]) -> None:
    me = store.login(people["member"], PASSWORD)
    other = store.login(people["member"], PASSWORD)
    for n in range(3):
        store.append(other, "Drafts", raw(n))
    heard: list[Change] = []
    store.bus.subscribe(me.account_id, heard.append)
    view = SelectedMailbox(store.mailbox_state(me, "Drafts"), writable=True, recent_from=10**9)
    assert not view.flags_loaded  # SELECT read no flags
    store.set_flags(other, "Drafts", [2], ["\\Seen"], "add")
    # The flags are read after the change; the client may hold older ones
    # (from an earlier session), so the change is still announced.
    lines = catch_up(store, me, view, heard, True)
    assert lines == [b"2 FETCH (UID 2 FLAGS (\\Seen))"]
    assert view.first_unseen() == 1 and view.unseen_count() == 2


def test_first_unseen_finds_whole_index_entries_only() -> None:
    """``first_unseen`` searches the flag index's bytes: with many flag sets
    an entry's bytes, read across two entries, can look like another's
    (65792 then 0 hold the bytes of 257 one byte in)."""
    from array import array

    from postvault.store.types import MailboxFlags, MailboxInfo, MailboxState

    seen = frozenset({"\\Seen"})
    sets = tuple(frozenset({"k257"}) if k == 257 else frozenset({"\\Seen", f"k{k}"}) for k in range(70000))
    uids = array("I", range(1, 3001))
    index = array("I", [1] * len(uids))
    index[10], index[11] = 65792, 0
    assert index.tobytes().find(array("I", [257]).tobytes()) == 4 * 10 + 1
    index[2500] = 257
    state = MailboxState(MailboxInfo(1, "INBOX", None, 1, 3001, 1, True), uids, 1, 2501, frozenset(),
                         None, MailboxFlags(uids, index, sets))
    view = SelectedMailbox(state, True, 10**9)
    view.load_flags(state.flags)  # type: ignore[arg-type]
    assert view.first_unseen() == 2501
    view.set_flags({2501: seen})
    assert view.first_unseen() is None
