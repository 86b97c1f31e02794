"""Helpers shared by the abuse modules: hostile messages from the member
to its colleague, sent through the real submission service, and the rule
id the server audited for a refusal."""

from __future__ import annotations

from sqlalchemy import select

from postvault.store.models import AuditEvent
from tests.policy.test_attachments import multipart
from tests.smtpd.client import transaction
from tests.smtpd.conftest import COLLEAGUE, MEMBER, Server, World

TOP = (f"From: Smile Dental <{MEMBER}>\r\nTo: Dr Ortho <{COLLEAGUE}>\r\nSubject: Referral\r\n"
       "Date: Mon, 01 Jan 2024 09:00:00 +0000\r\nMIME-Version: 1.0\r\n")
TEXT = b"Content-Type: text/plain; charset=utf-8\r\n\r\nPlease see the attached referral.\r\n"


def mail(*parts: bytes) -> bytes:
    """A multipart/mixed message from the member to the colleague: a text part, then ``parts``."""
    return multipart(TEXT, *parts, headers=TOP)


def submit(smtp: Server, world: World, raw: bytes) -> tuple[int, list[str], str]:
    """Send ``raw`` (CRLF, not yet dot-stuffed) as the member; (code, lines,
    audited rule id or ""). A refusal must leave every mailbox unchanged."""
    before = world.count(COLLEAGUE), world.count(MEMBER, "Sent")
    c = smtp.session(MEMBER)
    body = (b"\r\n" + raw.rstrip(b"\r\n") + b"\r\n").replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"
    code, lines = transaction(c, [COLLEAGUE], body, sender=MEMBER)
    after = world.count(COLLEAGUE), world.count(MEMBER, "Sent")
    if code == 250:
        assert after == (before[0] + 1, before[1] + 1)
        return code, lines, ""
    assert after == before, "a refused message was stored"
    return code, lines, last_rule(world)


def last_rule(world: World) -> str:
    """The rule id of the member's latest audited refusal."""
    with world.store._sessions() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.account == MEMBER, AuditEvent.event == "message.refused")
                          .order_by(AuditEvent.id.desc()).limit(1)).first()
    assert event is not None
    return dict(kv.split("=", 1) for kv in event.detail.split())["rule"]
