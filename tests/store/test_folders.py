"""DELETE, RENAME and SUBSCRIBE of folders in the store (RFC 3501
§6.3.4-7): messages, blobs, UIDs, UIDVALIDITY, subscriptions and audit."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from postvault.errors import InvalidInput, MailboxExists, MailboxHasChildren, MailboxNotFound
from postvault.store.api import Store
from postvault.store.models import AuditEvent, Message
from postvault.store.notify import Change
from tests.conftest import PASSWORD
from tests.support import stored_blobs

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def raw(n: int) -> bytes:
    return f"From: a@dental.test\r\nTo: b@dental.test\r\nSubject: secret {n}\r\n\r\nbody {n}\r\n".encode()


def names(store: Store, session: object) -> list[str]:
    return sorted(b.name for b in store.list_mailboxes(session))  # type: ignore[arg-type]


def messages(store: Store) -> int:
    with store._sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Message)) or 0)


def events(store: Store, kind: str) -> list[AuditEvent]:
    with store._sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == kind).order_by(AuditEvent.id)))


def test_delete_removes_messages_blobs_and_audits_ids_only(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    box = store.create_mailbox(session, "Patients")
    before = messages(store)
    for n in range(3):
        store.append(session, "Patients", raw(n))
    # One of them also in Drafts: its message (and blob) must stay.
    store.copy(session, "Patients", [1], "Drafts")
    blobs_before = len(stored_blobs(store))
    seen: list[Change] = []
    store.bus.subscribe(session.account_id, seen.append)
    removed = store.delete_mailbox(session, "Patients", client_ip="127.0.0.1", protocol="imap")
    assert [u for u, _ in removed] == [1, 2, 3]
    assert "Patients" not in names(store, session)
    assert messages(store) == before + 1  # the Drafts copy's message stays
    assert store.open_message(session, "Drafts", store.snapshot(session, "Drafts").messages[0].uid).read() == raw(0)
    assert len(stored_blobs(store)) == blobs_before - 2
    assert seen == [Change(session.account_id, "Patients", "deleted", ())]
    [ev] = events(store, "mailbox.delete")
    assert f"folder_id={box.id}" in ev.detail and "count=3" in ev.detail
    assert all(pid in ev.detail for _, pid in removed)
    assert "Patients" not in ev.detail and "secret" not in ev.detail
    with pytest.raises(MailboxNotFound):
        store.delete_mailbox(session, "Patients")


def test_delete_refuses_special_folders_and_parents(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    for name in ("INBOX", "inbox", "Drafts", "Sent", "Trash"):
        with pytest.raises(InvalidInput):
            store.delete_mailbox(session, name)
    store.create_mailbox(session, "A")
    store.create_mailbox(session, "A/B")
    with pytest.raises(MailboxHasChildren):
        store.delete_mailbox(session, "A")
    store.delete_mailbox(session, "A/B")
    store.delete_mailbox(session, "A")
    assert names(store, session) == ["Drafts", "INBOX", "Sent", "Trash"]


def test_a_name_back_after_delete_gets_another_uidvalidity(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    seen = set()
    for _ in range(3):  # within one second: the clock alone would repeat
        box = store.create_mailbox(session, "Again")
        assert box.uidvalidity not in seen
        seen.add(box.uidvalidity)
        store.append(session, "Again", raw(1))
        store.delete_mailbox(session, "Again")
    box = store.create_mailbox(session, "Other")
    store.rename_mailbox(session, "Other", "Again")
    again = {b.name: b for b in store.list_mailboxes(session)}["Again"]
    assert again.uidvalidity not in seen and again.uidvalidity != box.uidvalidity


def test_rename_keeps_uids_messages_children_and_subscription(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    old = store.create_mailbox(session, "Cases")
    store.create_mailbox(session, "Cases/2024")
    store.create_mailbox(session, "Casesx")  # not a child: a prefix only
    store.set_subscribed(session, "Cases/2024", False)
    for n in range(3):
        store.append(session, "Cases", raw(n))
    store.append(session, "Cases/2024", raw(9))
    store.set_flags(session, "Cases", [2], ["\\Deleted"], "add")
    store.expunge(session, "Cases")
    old = store.mailbox_state(session, "Cases").mailbox
    seen: list[Change] = []
    store.bus.subscribe(session.account_id, seen.append)
    info = store.rename_mailbox(session, "Cases", "Archive/Cases")
    assert info.name == "Archive/Cases" and info.id == old.id
    assert info.uidvalidity != old.uidvalidity and info.uidnext == old.uidnext
    assert names(store, session) == ["Archive/Cases", "Archive/Cases/2024", "Casesx", "Drafts", "INBOX", "Sent",
                                     "Trash"]
    assert [m.uid for m in store.snapshot(session, "Archive/Cases").messages] == [1, 3]
    assert store.open_message(session, "Archive/Cases", 3).read() == raw(2)
    assert store.open_message(session, "Archive/Cases/2024", 1).read() == raw(9)
    subs = {b.name: b.subscribed for b in store.list_mailboxes(session)}
    assert subs["Archive/Cases"] and not subs["Archive/Cases/2024"]
    assert sorted(c.mailbox for c in seen) == ["Cases", "Cases/2024"] and {c.kind for c in seen} == {"renamed"}
    # New mail keeps ascending from the old UIDNEXT.
    assert store.append(session, "Archive/Cases", raw(5)).uid == 4
    [ev] = events(store, "mailbox.rename")
    assert "Cases" not in ev.detail and str(old.id) in ev.detail


def test_rename_errors(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    store.create_mailbox(session, "A")
    store.create_mailbox(session, "A/x")
    store.create_mailbox(session, "B")
    store.create_mailbox(session, "C/x")
    with pytest.raises(MailboxExists):
        store.rename_mailbox(session, "A", "B")
    with pytest.raises(MailboxExists):  # A/x would become C/x, which exists
        store.rename_mailbox(session, "A", "C")
    with pytest.raises(MailboxNotFound):
        store.rename_mailbox(session, "Nope", "D")
    for special in ("Sent", "Drafts", "Trash"):
        with pytest.raises(InvalidInput):
            store.rename_mailbox(session, special, "D")
    with pytest.raises(InvalidInput):
        store.rename_mailbox(session, "A", "inbox")
    assert names(store, session) == ["A", "A/x", "B", "C/x", "Drafts", "INBOX", "Sent", "Trash"]


def test_rename_inbox_moves_its_messages_and_keeps_it(store: Store, people: dict[str, str]) -> None:
    store.deliver(raw(1), people["member2"], [people["member"]])
    store.deliver(raw(2), people["member2"], [people["member"]])
    session = store.login(people["member"], PASSWORD)
    inbox = store.mailbox_state(session, "INBOX").mailbox
    store.create_mailbox(session, "INBOX/kept")
    seen: list[Change] = []
    store.bus.subscribe(session.account_id, seen.append)
    info = store.rename_mailbox(session, "inbox", "Old mail")
    assert info.name == "Old mail" and info.uidnext == inbox.uidnext
    assert [m.uid for m in store.snapshot(session, "Old mail").messages] == [1, 2]
    assert store.open_message(session, "Old mail", 2).read() == raw(2)
    after = store.mailbox_state(session, "INBOX")
    assert after.exists == 0 and after.mailbox.uidvalidity == inbox.uidvalidity
    assert after.mailbox.uidnext == inbox.uidnext  # INBOX's UIDs are never reused
    assert "INBOX/kept" in names(store, session)
    assert seen == [Change(session.account_id, "INBOX", "expunge", (1, 2))]
    store.deliver(raw(3), people["member2"], [people["member"]])
    assert [m.uid for m in store.snapshot(session, "INBOX").messages] == [3]


def test_subscriptions(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    store.create_mailbox(session, "Mine")
    store.set_subscribed(session, "Mine", False)
    assert not {b.name: b.subscribed for b in store.list_mailboxes(session)}["Mine"]
    store.set_subscribed(session, "Mine", True)
    assert {b.name: b.subscribed for b in store.list_mailboxes(session)}["Mine"]
    for name in ("INBOX", "Sent", "Drafts", "Trash"):
        with pytest.raises(InvalidInput):
            store.set_subscribed(session, name, False)
        store.set_subscribed(session, name, True)
    with pytest.raises(MailboxNotFound):
        store.set_subscribed(session, "Nope", True)
    assert all(b.subscribed for b in store.list_mailboxes(session))


def test_other_accounts_folders_untouched(store: Store, people: dict[str, str]) -> None:
    one = store.login(people["member"], PASSWORD)
    two = store.login(people["member2"], PASSWORD)
    store.create_mailbox(one, "Same")
    store.create_mailbox(two, "Same")
    store.append(two, "Same", raw(1))
    store.delete_mailbox(one, "Same")
    assert store.mailbox_state(two, "Same").exists == 1
    with pytest.raises(MailboxNotFound):
        store.rename_mailbox(one, "Same", "Other")
