"""Invitation life cycle through the store and the notices glue: one live
link, renewal through the member's escrow, discarding, several members."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from postvault.conf.schema import Config
from postvault.errors import AuthenticationFailed, InvalidInput
from postvault.notices.hooks import invite_and_send, outbound_queue
from postvault.store.accounts import InvitationNeedsKey
from postvault.store.api import Store
from postvault.store.models import Account, InvitationEscrow, Invitation
from tests.conftest import PASSWORD
from tests.store.test_store_api import mail

COLLEAGUE = "new@ortho.test"


def test_reinvite_carries_waiting_mail_to_the_new_link(store: Store, people: dict[str, str]) -> None:
    member = people["member"]
    first = store.invite_colleague(member, COLLEAGUE)
    assert first.status == "invited" and first.token
    store.deliver(mail("Waiting", "Body before sign-up\n"), member, [COLLEAGUE])

    session = store.login(member, PASSWORD)
    second = store.invite_colleague(member, COLLEAGUE, member_session=session)
    assert second.status == "reinvited" and second.waiting == 1 and second.token != first.token

    with pytest.raises(InvalidInput, match="replaced by a newer invitation"):
        store.sign_up(first.token, "New Ortho", "UTC", PASSWORD)
    store.sign_up(second.token, "New Ortho", "Europe/Berlin", PASSWORD)
    colleague = store.login(COLLEAGUE, PASSWORD)
    assert store.open_message(colleague, "INBOX", 1).read() == mail("Waiting", "Body before sign-up\n")
    # The escrow is gone once the colleague's password protects the key.
    with store._sessions() as s:
        assert s.scalars(select(InvitationEscrow)).all() == []
        states = sorted(s.scalars(select(Invitation.state)))
    assert states == ["revoked", "used"]


def test_old_link_fails_even_with_its_row_reset(store: Store, people: dict[str, str]) -> None:
    """Revocation is cryptographic too: nothing is wrapped under an old token."""
    member = people["member"]
    first = store.invite_colleague(member, COLLEAGUE)
    store.invite_colleague(member, COLLEAGUE, member_session=store.login(member, PASSWORD))
    with store._sessions() as s, s.begin():
        for inv in s.scalars(select(Invitation)):
            inv.state = "pending"  # someone with write access undoes the revocation
    with pytest.raises(Exception) as err:
        store.sign_up(first.token, "New Ortho", "UTC", PASSWORD)  # type: ignore[arg-type]
    assert type(err.value).__name__ == "WrongSecret"


def test_expired_link_is_refused_and_renewable_by_the_member(store: Store, people: dict[str, str]) -> None:
    member = people["member"]
    first = store.invite_colleague(member, COLLEAGUE, ttl=timedelta(seconds=-1))
    store.deliver(mail(), member, [COLLEAGUE])
    with pytest.raises(InvalidInput, match="expired"):
        store.sign_up(first.token, "New Ortho", "UTC", PASSWORD)  # type: ignore[arg-type]
    # Without the member's key: refused, and it says why and what to do.
    with pytest.raises(InvitationNeedsKey, match="--member-password-stdin|--discard-waiting-mail"):
        store.invite_colleague(member, COLLEAGUE)
    fresh = store.invite_colleague(member, COLLEAGUE, member_session=store.login(member, PASSWORD))
    store.sign_up(fresh.token, "New Ortho", "UTC", PASSWORD)  # type: ignore[arg-type]
    assert store.open_message(store.login(COLLEAGUE, PASSWORD), "INBOX", 1).read() == mail()


def test_second_member_gives_one_account_listing_both(store: Store, people: dict[str, str]) -> None:
    member, member2 = people["member"], people["member2"]
    first = store.invite_colleague(member, COLLEAGUE)
    again = store.invite_colleague(member2, COLLEAGUE)
    assert again.status == "already_pending" and again.token is None and again.expires_at == first.expires_at
    store.deliver(mail(msgid="<a@dental.test>"), member, [COLLEAGUE])
    store.deliver(mail(msgid="<b@clinic.test>"), member2, [COLLEAGUE])
    store.sign_up(first.token, "New Ortho", "UTC", PASSWORD)  # type: ignore[arg-type]
    assert store.contacts(COLLEAGUE) == sorted([member, member2])
    with store._sessions() as s:
        assert len(s.scalars(select(Account).where(Account.email == COLLEAGUE)).all()) == 1
    snapshot = store.snapshot(store.login(COLLEAGUE, PASSWORD), "INBOX")
    assert len(snapshot.messages) == 2
    assert COLLEAGUE in store.contacts(member) and COLLEAGUE in store.contacts(member2)


def test_second_member_cannot_renew_without_an_escrow(store: Store, people: dict[str, str]) -> None:
    member, member2 = people["member"], people["member2"]
    store.invite_colleague(member, COLLEAGUE, ttl=timedelta(seconds=-1))
    store.deliver(mail(), member, [COLLEAGUE])
    session2 = store.login(member2, PASSWORD)
    with pytest.raises(InvitationNeedsKey, match="only a member who invited them"):
        store.invite_colleague(member2, COLLEAGUE, member_session=session2)
    status = store.invitation_status(COLLEAGUE)
    assert status.escrow_members == (member,) and status.waiting == 1 and status.link_expires_at is None


def test_discarding_waiting_mail_gives_a_new_key_pair(store: Store, people: dict[str, str]) -> None:
    member, member2 = people["member"], people["member2"]
    store.invite_colleague(member, COLLEAGUE, ttl=timedelta(seconds=-1))
    store.deliver(mail(), member, [COLLEAGUE])
    with store._sessions() as s:
        old_key = s.scalar(select(Account.public_key).where(Account.email == COLLEAGUE))
    result = store.invite_colleague(member2, COLLEAGUE, discard_waiting_mail=True)
    assert result.status == "reinvited" and result.discarded == 1
    with store._sessions() as s:
        assert s.scalar(select(Account.public_key).where(Account.email == COLLEAGUE)) != old_key
        # The old escrow held the old key: gone; the new one is member2's.
        assert [e.member_id for e in s.scalars(select(InvitationEscrow))] == [
            s.scalar(select(Account.id).where(Account.email == member2))
        ]
    store.sign_up(result.token, "New Ortho", "UTC", PASSWORD)  # type: ignore[arg-type]
    colleague = store.login(COLLEAGUE, PASSWORD)
    assert store.snapshot(colleague, "INBOX").messages == ()
    # The sender still has the message in Sent.
    assert len(store.snapshot(store.login(member, PASSWORD), "Sent").messages) == 1
    # New mail reaches the new key.
    store.deliver(mail(msgid="<new@dental.test>"), member, [COLLEAGUE])
    [new] = store.snapshot(colleague, "INBOX").messages
    assert new.uid == 2  # UIDs are never reused (RFC 3501 §2.3.1.1)
    assert store.open_message(colleague, "INBOX", new.uid).read() == mail(msgid="<new@dental.test>")


def test_wrong_member_session_and_wrong_roles(store: Store, people: dict[str, str]) -> None:
    store.invite_colleague(people["member"], COLLEAGUE)
    with pytest.raises(InvalidInput, match="not the inviting member"):
        store.invite_colleague(people["member"], COLLEAGUE, member_session=store.login(people["member2"], PASSWORD))
    with pytest.raises(InvalidInput, match="only members invite"):
        store.invite_colleague(people["colleague"], "x@ortho.test")
    with pytest.raises(AuthenticationFailed):
        store.login(COLLEAGUE, PASSWORD)


def test_invite_and_send_queues_the_link_email(store: Store, config: Config, people: dict[str, str]) -> None:
    result = invite_and_send(store, config, people["member"], COLLEAGUE, actor=people["member"])
    [entry] = outbound_queue(store, config).entries()
    assert (entry.kind, entry.recipient, entry.account) == ("invitation", COLLEAGUE, COLLEAGUE)
    body = outbound_queue(store, config).body(entry.id)
    assert f"https://mail.example.test/signup/{result.token}".encode() in body.replace(b"=\r\n", b"")
    assert b"Subject: Smile Dental invites you to Secure Messaging" in body
    # An already pending colleague gets no second email without a new link.
    invite_and_send(store, config, people["member2"], COLLEAGUE)
    assert len(outbound_queue(store, config).entries()) == 1
