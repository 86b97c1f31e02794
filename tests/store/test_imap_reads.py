"""The IMAP hot paths' store calls (issue 9, IMAP per-command CPU):
``read_copies`` and ``mailbox_marks`` on the sqlite3 connection give what
the ORM reads give, ``open_messages(rows=...)`` opens what it opens without
them, ``submit_event`` commits many sessions' audit events together and
resolves each caller only after the commit, and ``set_flags`` appends its
audit event in the transaction that changes the flags."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from postvault.errors import MailboxNotFound
from postvault.store import audit
from postvault.store.api import Store
from postvault.store.mail import _CHANGED, _COPIES, _COUNT, _MARKS, _SUMMARY_ROWS
from postvault.store.models import AuditEvent

from ..conftest import PASSWORD
from .test_groupcommit import chain_is_valid, held_writer

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def raw(n: int) -> bytes:
    return (f"From: office@dental.test\r\nTo: front@clinic.test\r\nSubject: read {n}\r\n"
            f"Message-ID: <ir-{n}@dental.test>\r\n\r\nbody {n}\r\n").encode()


def _fill(store: Store, session: object, copies: int) -> list[int]:
    for n in range(8):
        store.append(session, "Drafts", raw(n), ["\\Seen"] if n % 3 == 0 else [])  # type: ignore[arg-type]
    while True:
        uids = [m.uid for m in store.snapshot(session, "Drafts").messages]  # type: ignore[arg-type]
        if len(uids) >= copies:
            return uids
        store.copy(session, "Drafts", uids, "Drafts")  # type: ignore[arg-type]


def test_read_copies_gives_what_snapshot_and_the_core_statement_give(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    uids = _fill(store, session, 640)  # more than one IN list (500)
    store.set_flags(session, "Drafts", uids[::7], ["\\Flagged", "$Label1"], "add")
    asked = uids[::2] + [max(uids) + 5, 10**6]  # two UIDs that do not exist
    got = store.read_copies(session, "Drafts", asked)
    want = store.snapshot(session, "Drafts", asked).messages
    assert [c.meta for c in got] == list(want)
    assert len(got) == len(uids[::2]) > 500
    # The raw statement's rows are the Core statement's, column by column.
    box = next(b for b in store.list_mailboxes(session) if b.name == "Drafts")
    params = {"account": session.account_id, "name": "Drafts", "uids": uids[:40] + [10**6]}
    with store.engine.connect() as conn:
        core = [tuple(r) for r in conn.execute(_COPIES.stmt, params)]
    fast = [tuple(r) for r in _COPIES.run(store.engine, params)]
    assert fast == core and len(fast) == 40
    with store.engine.connect() as conn:
        core = sorted(tuple(r) for r in conn.execute(_SUMMARY_ROWS.stmt, params))
    fast = sorted(tuple(r) for r in _SUMMARY_ROWS.run(store.engine, params))
    assert fast == core and len(fast) == 40 and all(r[-1] for r in fast)  # each has its sealed summary
    since = box.highestmodseq - 30
    for q, p, n in ((_CHANGED, {"box": box.id, "since": since}, 30), (_COUNT, {"box": box.id}, 1)):
        with store.engine.connect() as conn:
            core = [tuple(r) for r in conn.execute(q.stmt, p)]
        assert [tuple(r) for r in q.run(store.engine, p)] == core and len(core) == n
    changes = store.mailbox_changes(session, "Drafts", since)
    assert changes.mailbox == box and changes.count == len(uids)
    assert list(changes.messages) == [m for m in store.snapshot(session, "Drafts").messages if m.modseq > since]
    assert [tuple(r) for r in _MARKS.run(store.engine, params)] == [(box.uidnext, box.highestmodseq)]
    # INBOX in any case; an existing mailbox without these UIDs; a missing one.
    store.deliver(raw(99), people["member2"], [people["member"]])
    assert [c.meta for c in store.read_copies(session, "inbox", [1])] == \
        list(store.snapshot(session, "INBOX", [1]).messages)
    assert store.read_copies(session, "Drafts", [10**6]) == []
    with pytest.raises(MailboxNotFound):
        store.read_copies(session, "No such folder", [1])


def test_open_messages_with_rows_opens_what_it_opens_without(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    uids = _fill(store, session, 8)
    asked = uids[1:6]
    rows = store.read_copies(session, "Drafts", uids)  # more rows than asked: the rest are ignored

    def contents(**kw: object) -> list[tuple[int, bytes]]:
        out = []
        for uid, reader in store.open_messages(session, "Drafts", asked, **kw):  # type: ignore[arg-type]
            assert not isinstance(reader, Exception)
            with reader:
                out.append((uid, reader.read()))
        return out

    plain = contents()
    assert contents(rows=rows) == plain and [u for u, _ in plain] == asked
    assert plain[0][1] == raw(1)


def test_mailbox_marks_are_the_listing_values(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    _fill(store, session, 8)
    store.set_flags(session, "Drafts", [2], ["\\Flagged"], "add")
    for b in store.list_mailboxes(session):
        assert store.mailbox_marks(session, b.name) == (b.uidnext, b.highestmodseq)
    assert store.mailbox_marks(session, "inbox") == store.mailbox_marks(session, "INBOX")
    assert store.mailbox_marks(session, "No such folder") is None


def _reads(store: Store, actor: str) -> list[AuditEvent]:
    with store._sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.actor == actor, AuditEvent.event == "message.read")
                              .order_by(AuditEvent.id)))


def test_submitted_events_share_a_commit_and_each_resolves_after_it(store: Store, people: dict[str, str]) -> None:
    release, blocker = held_writer(store)
    futures = [store.submit_event(audit.Event("message.read", "reader@x.test", "reader@x.test", f"m{n}",
                                              "127.0.0.1", "imap", "client=-")) for n in range(20)]
    # Queued behind the held writer: none is resolved, none is stored.
    assert not any(f.done() for f in futures)
    assert _reads(store, "reader@x.test") == []
    release.set()
    blocker.result(30)
    for f in futures:
        assert f.result(30) is None
    rows = _reads(store, "reader@x.test")
    assert [r.message for r in rows] == [f"m{n}" for n in range(20)]
    chain_is_valid(store)


def test_events_from_many_threads_are_all_recorded_in_a_valid_chain(store: Store, people: dict[str, str]) -> None:
    def one(n: int) -> None:
        store.submit_event(audit.Event("message.read", "many@x.test", "many@x.test", f"id{n}", None, "imap",
                                       "")).result(30)
        # Resolved means committed: another connection sees it at once.
        assert any(r.message == f"id{n}" for r in _reads(store, "many@x.test"))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(80)))
    assert sorted(r.message for r in _reads(store, "many@x.test")) == sorted(f"id{n}" for n in range(80))
    assert chain_is_valid(store) >= 80


def test_set_flags_audits_in_its_own_transaction(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    uids = _fill(store, session, 8)
    pids = {c.meta.uid: c.meta.message_id for c in store.read_copies(session, "Drafts", uids)}
    seen: list[list[str]] = []

    def event(ids: list[str]) -> audit.Event:
        seen.append(ids)
        return audit.Event("message.flags", "o@x.test", "o@x.test", None, None, "imap", "n=" + ",".join(ids))

    new = store.set_flags(session, "Drafts", [uids[4], uids[2], 10**6], ["\\Flagged"], "add", audit_event=event)
    assert set(new) == {uids[2], uids[4]} and seen == [[pids[uids[2]], pids[uids[4]]]]
    with store._sessions() as s:
        details = list(s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "message.flags")))
    assert details == ["n=" + ",".join(seen[0])]

    # If the audit entry can't be made, the flags don't change either.
    def broken(ids: list[str]) -> audit.Event:
        raise RuntimeError("no audit")

    before = store.mailbox_marks(session, "Drafts")
    with pytest.raises(RuntimeError):
        store.set_flags(session, "Drafts", [uids[3]], ["\\Answered"], "add", audit_event=broken)
    assert store.mailbox_marks(session, "Drafts") == before
    assert "\\Answered" not in store.snapshot(session, "Drafts", [uids[3]]).messages[0].flags
    # No message found: no event asked for, none written.
    store.set_flags(session, "Drafts", [10**6], ["\\Flagged"], "add", audit_event=event)
    assert len(seen) == 1
    with store._sessions() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.event == "message.flags")) == 1


def test_audit_rows_inserted_raw_are_those_core_inserts(store: Store) -> None:
    from sqlalchemy import text

    from postvault.store.audit import _INSERT, _rows

    events = [audit.Event("message.read", "a@x.test", "a@x.test", None, "::1", "imap", "count=2 messages=p,q"),
              audit.Event("server.start", "postvault")]
    fast = _rows(1000, audit.GENESIS, events)
    core = [{**r, "id": r["id"] + 1000} for r in fast]
    with store.engine.begin() as conn:
        _INSERT.insert(conn, fast)
        conn.execute(_INSERT.stmt, core)
    with store.engine.connect() as conn:
        got = {r[0]: tuple(r[1:]) for r in conn.execute(text(
            "SELECT id, at, event, actor, account, message, client_ip, protocol, detail, prev_hash, hash "
            "FROM audit_events WHERE id >= 1000 ORDER BY id"))}
    assert sorted(got) == [1001, 1002, 2001, 2002]  # _rows numbers on from the head's id
    assert got[1001] == got[2001] and got[1002] == got[2002]
    assert got[1001][1:4] == ("message.read", "a@x.test", "a@x.test") and got[1002][3] is None


def test_select_reads_every_flag_with_the_uids(store: Store, people: dict[str, str]) -> None:
    from postvault.imapd.mailbox import SelectedMailbox

    session = store.login(people["member"], PASSWORD)
    uids = _fill(store, session, 64)
    store.set_flags(session, "Drafts", uids[::3], ["\\Flagged", "$Work"], "add")
    store.set_flags(session, "Drafts", uids[:10], ["\\Seen"], "add")
    state = store.mailbox_state(session, "Drafts", with_flags=True)
    assert state.flags is not None and store.mailbox_state(session, "Drafts").flags is None
    apart = store.message_flags(session, "Drafts")

    def per_uid(f: object) -> dict[int, frozenset[str]]:
        return {u: f.sets[k] for u, k in zip(f.uids, f.index)}  # type: ignore[attr-defined]

    assert list(state.flags.uids) == list(state.uids) == list(apart.uids)
    assert per_uid(state.flags) == per_uid(apart)
    # A view loaded from SELECT's read answers as one loaded later.
    early, late = SelectedMailbox(state, True, 10**9), SelectedMailbox(state, True, 10**9)
    early.load_flags(state.flags)
    late.load_flags(apart)
    unseen = [n for n, u in enumerate(uids, 1) if "\\Seen" not in per_uid(apart)[u]]
    assert unseen[0] > 10 and len(unseen) < len(uids) - 10
    for box in (early, late):
        assert box.first_unseen() == unseen[0] and box.unseen_count() == len(unseen) and not box.ghosts
        assert box.keywords() == ["$Work"]
        assert [box.flags_at(n) for n in range(1, len(uids) + 1)] == [per_uid(apart)[u] for u in uids]


def test_select_reuses_a_view_only_while_the_mailbox_is_unchanged(store: Store, people: dict[str, str]) -> None:
    """SELECT's view is kept between sessions (``_ViewCache``) and used only
    while the mailbox's UIDNEXT, HIGHESTMODSEQ and message count are those
    it was read at: every kind of change, by this process or another (a
    row removed behind the store's back), gives a fresh read."""
    from postvault.store.models import MessageCopy

    session = store.login(people["member"], PASSWORD)
    uids = _fill(store, session, 16)

    View = tuple[list[int], dict[int, frozenset[str]], int, int | None, frozenset[str]]

    def view() -> View:
        st = store.mailbox_state(session, "Drafts", with_flags=True)
        assert st.flags is not None and len(st.uids) == st.exists
        assert list(st.flags.uids) == list(st.uids)
        flags = {u: st.flags.sets[k] for u, k in zip(st.flags.uids, st.flags.index)}
        return list(st.uids), flags, st.unseen, st.first_unseen, st.keywords

    def truth() -> View:
        metas = store.snapshot(session, "Drafts").messages
        unseen = [m.uid for m in metas if "\\Seen" not in m.flags]
        keywords = frozenset(f for m in metas for f in m.flags if not f.startswith("\\"))
        return ([m.uid for m in metas], {m.uid: m.flags for m in metas}, len(unseen), min(unseen, default=None),
                keywords)

    first = store.mailbox_state(session, "Drafts", with_flags=True)
    again = store.mailbox_state(session, "Drafts", with_flags=True)
    assert again.uids is first.uids and again.flags is first.flags  # the kept view
    assert store.mailbox_state(session, "Drafts").flags is None  # as asked, from the same view
    assert view() == truth()

    store.set_flags(session, "Drafts", uids[:5], ["\\Seen", "$Later"], "add")
    changed = store.mailbox_state(session, "Drafts", with_flags=True)
    assert changed.uids is not first.uids and "$Later" in changed.keywords
    assert view() == truth()

    store.append(session, "Drafts", raw(99), [])
    assert view() == truth() and len(view()[0]) == len(uids) + 1
    # Brought up to date from the kept view (rows above its modseq only):
    # the same as a read of every message, keywords gone when unused.
    store.set_flags(session, "Drafts", uids[:5], ["$Later"], "remove")
    store.set_flags(session, "Drafts", uids[3:9], ["\\Seen"], "remove")
    store.append(session, "Drafts", raw(100), ["\\Seen", "$New"])
    advanced = view()
    store._views = None  # type: ignore[attr-defined]
    assert advanced == view() == truth() and "$Later" not in advanced[4] and "$New" in advanced[4]

    store.set_flags(session, "Drafts", uids[-2:], ["\\Deleted"], "add")
    store.expunge(session, "Drafts")
    assert view() == truth() and len(view()[0]) == len(uids)  # two appended, two expunged

    # A removal that moves neither UIDNEXT nor HIGHESTMODSEQ (as an
    # invitation's discarded mail, or another node's work the bus missed).
    with store._sessions() as s:
        box_id = store.mailbox_state(session, "Drafts").mailbox.id
        s.execute(MessageCopy.__table__.delete().where(MessageCopy.mailbox_id == box_id,
                                                      MessageCopy.uid == uids[0]))
        s.commit()
    assert uids[0] not in view()[0]
    assert view() == truth()

    # Another account's folder of the same name is never this one's view.
    other = store.login(people["member2"], PASSWORD)
    with pytest.raises(MailboxNotFound):
        store.mailbox_state(other, "NoSuchFolder", with_flags=True)
    theirs = store.mailbox_state(other, "INBOX", with_flags=True)
    assert theirs.mailbox.id != box_id
