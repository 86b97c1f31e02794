"""Accounts: password checks, failure records, invitations and sign-up,
key-pair integrity, thread membership by held messages."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from postvault.errors import AuthenticationFailed, IntegrityError, InvalidInput
from postvault.store.api import Store
from postvault.store.models import Account, AuditEvent, AuthFailure, Invitation, Message
from tests.conftest import PASSWORD
from tests.store.test_store_api import mail

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def test_verify_password_needs_no_key_and_records_failures(store: Store, people: dict[str, str]) -> None:
    info = store.verify_password(people["member"], PASSWORD, client_ip="127.0.0.1", protocol="smtp")
    assert info.email == people["member"] and info.role == "member"
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            store.verify_password(people["member"], "wrong password here", client_ip="127.0.0.9")
    with pytest.raises(AuthenticationFailed):
        store.verify_password("my secret password typed as user", "x", client_ip="127.0.0.9")
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    by_account, by_ip = store.recent_auth_failures(people["member"], "127.0.0.9", since)
    assert len(by_account) == 2 and len(by_ip) == 3
    # An unknown name is throttled like a real one (no enumeration)...
    assert len(store.recent_auth_failures("My Secret Password typed as user", None, since)[0]) == 1
    with store._sessions() as s:
        typed = set(s.scalars(select(AuthFailure.account)))
        actors = set(s.scalars(select(AuditEvent.actor).where(AuditEvent.event == "login.failed")))
    # ...but what was typed is kept only as a keyed hash.
    assert len(typed) == 2 and all(len(t) == 64 and "@" not in t and "secret" not in t for t in typed)
    assert actors == {people["member"], "unknown-user"}
    # A success resets the account's count, not other addresses' records.
    store.verify_password(people["member"], PASSWORD, client_ip="127.0.0.1")
    by_account, by_ip = store.recent_auth_failures(people["member"], "127.0.0.9", since)
    assert by_account == [] and len(by_ip) == 1


def test_nfc_and_nfd_passwords_are_the_same(store: Store) -> None:
    composed = unicodedata.normalize("NFC", "Zahnärztin-Genève-2026")
    store.create_account("nfc@dental.test", "member", "NFC", composed)
    store.login("nfc@dental.test", unicodedata.normalize("NFD", composed))


def test_lone_surrogate_password_fails_cleanly(store: Store, people: dict[str, str]) -> None:
    with pytest.raises(AuthenticationFailed):
        store.login(people["member"], "bad\udcffpassword")


def test_swapped_public_key_is_detected_at_login(store: Store, people: dict[str, str]) -> None:
    with store._sessions() as s, s.begin():
        other = s.scalar(select(Account.public_key).where(Account.email == people["member2"]))
        s.execute(update(Account).where(Account.email == people["member"]).values(public_key=other))
    with pytest.raises(IntegrityError):
        store.login(people["member"], PASSWORD)


def test_invited_colleague_reads_waiting_mail_after_sign_up(store: Store, people: dict[str, str]) -> None:
    token = store.invite(people["member"], "new@ortho.test")
    assert token and len(token) >= 43  # 256 bits, URL-safe base64
    with store._sessions() as s:
        acct = s.scalar(select(Account).where(Account.email == "new@ortho.test"))
        inv = s.scalar(select(Invitation))
    assert acct.state == "pending" and acct.password_hash is None
    assert token.encode() not in inv.token_hash and len(inv.token_hash) == 32
    # Mail can be delivered before sign-up; nobody can log in yet.
    store.deliver(mail(), people["member"], ["new@ortho.test"])
    with pytest.raises(AuthenticationFailed):
        store.login("new@ortho.test", PASSWORD)
    with pytest.raises(InvalidInput):
        store.sign_up(token[:-2] + "AA", "New Ortho", "Europe/Berlin", PASSWORD)
    info = store.sign_up(token, "New Ortho", "Europe/Berlin", PASSWORD)
    assert (info.state, info.practice_name, info.timezone) == ("active", "New Ortho", "Europe/Berlin")
    s = store.login("new@ortho.test", PASSWORD)
    assert store.open_message(s, "INBOX", 1).read() == mail()
    assert store.contacts("new@ortho.test") == [people["member"]]
    with pytest.raises(InvalidInput, match="already been used"):
        store.sign_up(token, "Again", "UTC", PASSWORD)


def test_expired_invitation_is_refused(store: Store, people: dict[str, str]) -> None:
    token = store.invite(people["member"], "late@ortho.test", ttl=timedelta(seconds=-1))
    assert token is not None
    with pytest.raises(InvalidInput, match="expired"):
        store.sign_up(token, "Late", "UTC", PASSWORD)


def test_inviting_an_active_colleague_only_adds_the_contact(store: Store, people: dict[str, str]) -> None:
    assert store.invite(people["member2"], people["colleague"]) is None
    assert store.contacts(people["colleague"]) == sorted([people["member"], people["member2"]])


def test_citing_a_message_you_do_not_hold_does_not_join_its_thread(store: Store, people: dict[str, str]) -> None:
    store.deliver(mail(msgid="<secret-thread@dental.test>"), people["member"], [people["member2"]])
    # The colleague never received that message, but knows its Message-ID.
    intruder = mail("Re: x", msgid="<intruder@ortho.test>", In_Reply_To="<secret-thread@dental.test>")
    store.deliver(intruder, people["colleague"], [people["member"]])
    with store._sessions() as s:
        t1, t2 = s.scalars(select(Message.thread_id).order_by(Message.id)).all()
    assert t1 != t2


def test_thread_facts_count_only_delivered_mail(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    store.deliver(mail(msgid="<start@dental.test>"), member, [colleague])
    reply_head = b"Message-ID: <r@ortho.test>\r\nIn-Reply-To: <start@dental.test>\r\n\r\n"
    cited, held, participants = store.thread_facts(colleague, reply_head)
    assert cited == ("<start@dental.test>",) and held and participants == {member, colleague}
    assert store.conversation_partners(colleague) == {member}
    # A message the colleague APPENDed itself proves nothing.
    s = store.login(colleague, PASSWORD)
    store.append(s, "Sent", mail(msgid="<made-up@ortho.test>"))
    fake_head = b"In-Reply-To: <made-up@ortho.test>\r\n\r\n"
    assert store.thread_facts(colleague, fake_head) == (("<made-up@ortho.test>",), False, frozenset())
    # Nor does a message someone else holds.
    store.deliver(mail(msgid="<other@dental.test>"), member, [people["member2"]])
    assert store.thread_facts(colleague, b"References: <other@dental.test>\r\n\r\n")[1] is False
    assert store.thread_facts(colleague, b"Subject: none\r\n\r\n") == ((), False, frozenset())


def test_accounts_lookup(store: Store, people: dict[str, str]) -> None:
    found = store.accounts([people["member"].upper(), "ghost@x.test"])
    assert list(found) == [people["member"]] and found[people["member"]].role == "member"
