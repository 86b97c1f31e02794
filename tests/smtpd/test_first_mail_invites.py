"""A member's first message to an address-book colleague without an account
invites the colleague (pending account, key pair, sign-up email queued); the
message waits sealed and opens after sign-up. Every delivery queues a
new-mail notification that carries no PHI."""

from __future__ import annotations

import secrets

from postvault.outbound.queue import OutboundQueue

from .client import PASSWORD
from .conftest import MEMBER, Server, World


def test_first_mail_invites_and_waits_sealed(server: Server, world: World) -> None:
    colleague = f"first-{secrets.token_hex(4)}@newortho.test"
    world.store.add_contact(MEMBER, colleague, name="Dr. New", practice="New Ortho")
    marker = f"canary-{secrets.token_hex(6)}"
    raw = (f"From: {MEMBER}\r\nTo: {colleague}\r\nSubject: Patient {marker}\r\n\r\n"
           f"Findings {marker}\r\n").encode()
    with server.smtps() as smtp:
        assert smtp.sendmail(MEMBER, [colleague], raw) == {}

    status = world.store.invitation_status(colleague)
    assert status.state == "pending" and status.waiting == 1 and MEMBER in status.escrow_members
    queue = OutboundQueue(world.store.engine)
    kinds = {(e.kind, e.recipient) for e in queue.entries()}
    assert ("invitation", colleague) in kinds

    # The queued invitation holds the sign-up link and no message text.
    bodies = [row for row in _bodies(world) if colleague.encode() in row]
    assert bodies and all(marker.encode() not in b for b in bodies)

    # The link in the invitation signs the colleague up, and the message that
    # waited sealed to the pending key opens with the new password.
    import re

    token = re.search(rb"/signup/([A-Za-z0-9_-]{43})", b"".join(bodies))
    assert token, "no sign-up link in the invitation"
    world.store.sign_up(token[1].decode(), "New Ortho", "Europe/Berlin", "another long passphrase 42")
    session = world.store.login(colleague, "another long passphrase 42")
    with world.store.open_message(session, "INBOX", 1) as reader:
        assert marker.encode() in reader.read()

    # A second message to the same colleague sends no second invitation.
    with server.smtps() as smtp:
        smtp.sendmail(MEMBER, [colleague], raw)
    assert sum(1 for e in queue.entries() if e.kind == "invitation" and e.recipient == colleague) == 1


def test_delivery_queues_a_notification_without_phi(server: Server, world: World) -> None:
    from .conftest import COLLEAGUE

    marker = f"canary-{secrets.token_hex(6)}"
    raw = (f"From: {MEMBER}\r\nTo: {COLLEAGUE}\r\nSubject: Patient {marker}\r\n\r\nBody {marker}\r\n").encode()
    before = {e.id for e in OutboundQueue(world.store.engine).entries()}
    with server.smtps() as smtp:
        smtp.sendmail(MEMBER, [COLLEAGUE], raw)
    entries = OutboundQueue(world.store.engine).entries()
    # A new one, or (OutboundQueue.add_notifications) the same notice still
    # waiting untried from an earlier test's delivery.
    waiting = [e for e in entries if e.kind == "notification" and e.recipient == COLLEAGUE
               and (e.id not in before or (e.state == "queued" and e.attempts == 0))]
    assert waiting, entries
    assert all(marker.encode() not in b for b in _bodies(world))
    assert PASSWORD  # the shared accounts keep their password


def _bodies(world: World) -> list[bytes]:
    from sqlalchemy import select

    from postvault.store.models import OutboundMail

    with world.store._sessions() as s:
        return [bytes(b) for b in s.scalars(select(OutboundMail.body)) if b]
