"""The cheap mailbox reads IMAP uses (``mailbox_state``, ``message_flags``,
``mailbox_changes``, ``snapshot(uids=...)``) against the rows themselves, on
a mailbox of a few thousand messages with holes, keywords and mixed flags
(more UIDs than one IN list takes, so the range path runs too)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from postvault.store.api import Store
from postvault.store.models import Mailbox, Message, MessageCopy
from postvault.store.types import flags_set
from tests.conftest import PASSWORD

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases

FLAG_CHOICES = [(), ("\\Seen",), ("\\Seen", "\\Answered"), ("\\Flagged",), ("\\Seen", "$Label1"), ("NonJunk",)]


def raw(n: int) -> bytes:
    return f"From: a@dental.test\r\nTo: b@dental.test\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode()


def truth(store: Store, account_id: int, name: str) -> list[tuple[int, frozenset[str], int, datetime, int, str]]:
    with store._sessions() as s:
        box = s.scalar(select(Mailbox).where(Mailbox.account_id == account_id, Mailbox.name == name))
        assert box is not None
        rows = s.execute(
            select(MessageCopy.uid, MessageCopy.flags, MessageCopy.size, MessageCopy.internal_date,
                   MessageCopy.modseq, Message.public_id)
            .join(Message, Message.id == MessageCopy.message_id)
            .where(MessageCopy.mailbox_id == box.id).order_by(MessageCopy.uid)
        ).all()
    return [(u, flags_set(f), size, date, modseq, pid) for u, f, size, date, modseq, pid in rows]


def test_cheap_reads_agree_with_the_rows(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    old = datetime(2024, 1, 2, tzinfo=timezone.utc)
    for n in range(12):
        store.append(session, "Drafts", raw(n), internal_date=old)
    # Grow to 12 * 2**8 = 3,072 copies cheaply (COPY re-uses the sealed message).
    for _ in range(8):
        uids = [m.uid for m in store.snapshot(session, "Drafts").messages]
        store.copy(session, "Drafts", uids, "Drafts")
    rng = random.Random(7)
    uids = [m.uid for m in store.snapshot(session, "Drafts").messages]
    assert len(uids) == 3072
    for flags in FLAG_CHOICES:
        chosen = rng.sample(uids, 400)
        store.set_flags(session, "Drafts", chosen, flags, "set")
    before = store.mailbox_state(session, "Drafts").mailbox.highestmodseq
    store.set_flags(session, "Drafts", rng.sample(uids, 300), ["\\Deleted"], "add")
    store.expunge(session, "Drafts")
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    recent = [store.append(session, "Drafts", raw(100 + n)).uid for n in range(3)]
    store.set_flags(session, "Drafts", [uids[5]], ["\\Seen", "$Late"], "set")

    rows = truth(store, session.account_id, "Drafts")
    state = store.mailbox_state(session, "Drafts", since=since)
    assert list(state.uids) == [r[0] for r in rows]
    assert state.exists == len(rows)
    unseen = [r[0] for r in rows if "\\Seen" not in r[1]]
    assert state.unseen == len(unseen) and state.first_unseen == unseen[0]
    assert state.keywords == {f for r in rows for f in r[1] if not f.startswith("\\")}
    assert {"$Late", "NonJunk"} <= state.keywords
    assert state.first_since == recent[0]
    assert store.mailbox_state(session, "Drafts").first_since is None  # not asked

    flags = store.message_flags(session, "Drafts")
    assert list(flags.uids) == [r[0] for r in rows]
    assert [flags.sets[i] for i in flags.index] == [r[1] for r in rows]
    assert len(flags.sets) <= len(FLAG_CHOICES) + 3  # shared, not one per message

    full = store.snapshot(session, "Drafts")
    assert [(m.uid, m.flags, m.size, m.internal_date, m.modseq, m.message_id) for m in full.messages] == rows
    some = sorted(rng.sample([r[0] for r in rows], 700)) + [10**6]  # more than one IN list, and a stranger
    part = store.snapshot(session, "Drafts", uids=some)
    assert [m.uid for m in part.messages] == some[:-1]
    few = store.snapshot(session, "Drafts", uids=[rows[3][0], rows[-1][0]])
    assert [m.uid for m in few.messages] == [rows[3][0], rows[-1][0]]
    assert store.snapshot(session, "Drafts", uids=[]).messages == ()

    changes = store.mailbox_changes(session, "Drafts", before)
    assert changes.count == len(rows)
    assert changes.mailbox.highestmodseq == full.mailbox.highestmodseq
    assert [m.uid for m in changes.messages] == [r[0] for r in rows if r[4] > before]
    assert {uids[5], *recent} <= {m.uid for m in changes.messages}
    assert store.mailbox_changes(session, "Drafts", full.mailbox.highestmodseq).messages == ()


def test_empty_mailbox(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    state = store.mailbox_state(session, "Trash", since=datetime.now(timezone.utc))
    assert (list(state.uids), state.unseen, state.first_unseen, state.keywords, state.first_since) == \
        ([], 0, None, frozenset(), None)
    flags = store.message_flags(session, "Trash")
    assert list(flags.uids) == [] and flags.sets == ()
    assert store.mailbox_changes(session, "Trash", 0).count == 0
