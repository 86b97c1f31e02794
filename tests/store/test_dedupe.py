"""APPEND to Sent of what SMTP already filed there (issue 5 item 6): the
client's copy is answered with the delivered copy's UID and not stored; every
near miss is stored as usual."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from postvault.store.api import AccountSession, Store
from postvault.store.mail import SENT_DEDUPE_WINDOW
from postvault.store.models import AuditEvent, Message
from postvault.store.types import now
from tests.conftest import PASSWORD

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def raw(msgid: str | None = "<sent-1@dental.test>", subject: str = "Referral") -> bytes:
    head = f"From: office@dental.test\r\nTo: dr@ortho.test\r\nSubject: {subject}\r\n"
    if msgid is not None:
        head += f"Message-ID: {msgid}\r\n"
    return (head + "\r\nbody\r\n").encode()


def messages(store: Store) -> int:
    with store._sessions() as s:
        return s.scalar(select(func.count()).select_from(Message)) or 0


@pytest.fixture
def member(store: Store, people: dict[str, str]) -> AccountSession:
    return store.login(people["member"], PASSWORD)


def test_clients_copy_of_a_delivered_message_is_not_stored_twice(
    store: Store, people: dict[str, str], member: AccountSession
) -> None:
    sent = store.deliver(raw(), people["member"], [people["colleague"]])
    before = messages(store)
    heard: list[object] = []
    store.bus.subscribe(member.account_id, heard.append)
    # Thunderbird saves its own copy in "Sent" (special-use \Sent) after SMTP.
    result = store.append(member, "Sent", raw(), ["\\Seen"])
    assert result.duplicate and result.uid == sent.sent_uid and result.message_id == sent.message_id
    assert result.uidvalidity == store.snapshot(member, "Sent").mailbox.uidvalidity
    assert [m.uid for m in store.snapshot(member, "Sent").messages] == [1]
    assert messages(store) == before and heard == []
    with store._sessions() as s:
        event = s.scalar(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1))
    assert event is not None and event.event == "message.append" and event.message == sent.message_id
    assert "Referral" not in event.detail


def test_a_different_message_id_is_stored(store: Store, people: dict[str, str], member: AccountSession) -> None:
    store.deliver(raw(), people["member"], [people["colleague"]])
    result = store.append(member, "Sent", raw("<other@dental.test>"))
    assert not result.duplicate and result.uid == 2


def test_no_message_id_is_stored(store: Store, people: dict[str, str], member: AccountSession) -> None:
    store.deliver(raw(None), people["member"], [people["colleague"]])
    assert not store.append(member, "Sent", raw(None)).duplicate


def test_older_than_the_window_is_stored(store: Store, people: dict[str, str], member: AccountSession) -> None:
    store.deliver(raw(), people["member"], [people["colleague"]])
    with store._sessions() as s, s.begin():
        s.execute(update(Message).values(created_at=now() - SENT_DEDUPE_WINDOW - timedelta(seconds=5)))
    result = store.append(member, "Sent", raw())
    assert not result.duplicate and result.uid == 2
    # Just inside the window it is a duplicate again (the twin of the above).
    with store._sessions() as s, s.begin():
        s.execute(update(Message).values(created_at=now() - SENT_DEDUPE_WINDOW + timedelta(seconds=30)))
    assert store.append(member, "Sent", raw()).duplicate


def test_another_mailbox_is_stored(store: Store, people: dict[str, str], member: AccountSession) -> None:
    store.deliver(raw(), people["member"], [people["colleague"]])
    assert not store.append(member, "Drafts", raw()).duplicate
    assert not store.append(member, "INBOX", raw()).duplicate


def test_another_account_is_stored(store: Store, people: dict[str, str]) -> None:
    store.deliver(raw(), people["member"], [people["colleague"], people["member2"]])
    # The recipients hold it in INBOX; their own Sent has no delivered copy.
    for who in (people["colleague"], people["member2"]):
        session = store.login(who, PASSWORD)
        result = store.append(session, "Sent", raw())
        assert not result.duplicate and result.uid == 1


def test_only_a_delivered_copy_counts(store: Store, people: dict[str, str], member: AccountSession) -> None:
    # An APPENDed message proves nothing was sent: a second APPEND is stored.
    first = store.append(member, "Sent", raw())
    second = store.append(member, "Sent", raw())
    assert not first.duplicate and not second.duplicate and second.uid == 2
    # Nor does a delivery that kept no copy in Sent, or one expunged since.
    store.deliver(raw("<kept-none@dental.test>"), people["member"], [people["colleague"]], save_sent=False)
    assert not store.append(member, "Sent", raw("<kept-none@dental.test>")).duplicate
    sent = store.deliver(raw("<gone@dental.test>"), people["member"], [people["colleague"]])
    assert sent.sent_uid is not None
    store.set_flags(member, "Sent", [sent.sent_uid], ["\\Deleted"], "add")
    store.expunge(member, "Sent")
    assert not store.append(member, "Sent", raw("<gone@dental.test>")).duplicate
