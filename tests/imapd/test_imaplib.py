"""Python's imaplib against the real server: IDLE wake-ups from SMTP
delivery and from other sessions (RFC 2177, RFC 3501 §7.4.1), the read
audit, a large message streamed whole and in part, limits."""

from __future__ import annotations

import imaplib
import smtplib
import socket
import time
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from postvault.store.models import AuditEvent

from .client import Client
from .conftest import PASSWORD, Server

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def imaps(server: Server, user: str) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=server.context(), timeout=30)
    client.login(user, PASSWORD)
    return client


def send(server: Server, sender: str, to: str, subject: str = "Hello", body: str = "Hi there.\n",
         attachment: bytes | None = None) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="scan.pdf")
    with smtplib.SMTP_SSL("127.0.0.1", server.submissions, context=server.context(), timeout=30) as smtp:
        smtp.login(sender, PASSWORD)
        smtp.send_message(msg)


def raw_session(server: Server, user: str) -> Client:
    c = Client("127.0.0.1", server.imaps, server.context())
    c.response()
    assert c.command("l", f'LOGIN {user} "{PASSWORD}"')[-1].startswith(b"l OK")
    return c


def read_until(c: Client, wanted: bytes, seconds: float) -> list[bytes]:
    """Untagged lines until one contains ``wanted``; fails after ``seconds``."""
    c.sock.settimeout(seconds)
    seen = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            line = c.response()
            seen.append(line)
            if wanted in line:
                return seen
    except (socket.timeout, TimeoutError):
        pass
    finally:
        c.sock.settimeout(15)
    raise AssertionError(f"no {wanted!r} within {seconds} s; got {seen!r}")


def test_idle_sees_smtp_delivery_flags_and_expunge(server: Server) -> None:
    member, other = server.account("member"), server.account("member")
    watcher = raw_session(server, member)
    assert watcher.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
    watcher.send(b"i IDLE\r\n")
    assert watcher.response() == b"+ idling"
    started = time.monotonic()
    send(server, other, member, subject="Lab results")
    lines = read_until(watcher, b"EXISTS", 5)
    sent_at = time.monotonic()
    assert b"* 1 EXISTS" in lines
    # "within one second" of the delivery being acknowledged (send() returns
    # after the 250); the whole SMTP exchange is included here.
    assert sent_at - started < 5

    # Another session of the same account changes flags, then expunges.
    actor = imaps(server, member)
    actor.select("INBOX")
    actor.store("1", "+FLAGS", "(\\Flagged)")
    assert any(b"\\Flagged" in line for line in read_until(watcher, b"FETCH", 2))
    actor.store("1", "+FLAGS", "(\\Deleted)")
    actor.expunge()
    assert b"* 1 EXPUNGE" in read_until(watcher, b"EXPUNGE", 2)
    watcher.send(b"DONE\r\n")
    assert read_until(watcher, b"i OK", 5)[-1] == b"i OK IDLE terminated"
    actor.logout()
    watcher.close()


def test_expunge_waits_for_a_command_that_may_carry_it(server: Server) -> None:
    member = server.account("member")
    for n in range(2):
        server.store.deliver(f"Subject: m{n}\r\n\r\nbody\r\n".encode(), server.sender, [member])
    a = raw_session(server, member)
    a.command("s", "SELECT INBOX")
    b = imaps(server, member)
    b.select("INBOX")
    b.store("1", "+FLAGS", "(\\Deleted)")
    b.expunge()
    time.sleep(0.3)
    # RFC 3501 §7.4.1: no EXPUNGE during FETCH, even though A's view is stale.
    lines = a.command("f", "FETCH 1:2 (FLAGS)")
    assert not any(line.startswith(b"* ") and line.endswith(b" EXPUNGE") for line in lines), lines
    assert lines[-1].startswith(b"f NO [EXPUNGEISSUED]") or lines[-1].startswith(b"f OK")
    lines = a.command("n", "NOOP")
    assert b"* 1 EXPUNGE" in lines
    assert a.command("f2", "FETCH 1 (UID)")[0] == b"* 1 FETCH (UID 2)"
    b.logout()
    a.close()


def test_read_audit_one_event_per_fetch(server: Server) -> None:
    member = server.account("member")
    for n in range(3):
        server.store.deliver(f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode(), server.sender, [member])
    c = raw_session(server, member)
    c.command("id", 'ID ("name" "AuditClient")')
    c.command("s", "SELECT INBOX")
    c.command("f1", "FETCH 1:3 (FLAGS UID)")  # no content: no event
    c.command("f2", "FETCH 1:3 (BODY.PEEK[])")
    c.command("f3", "FETCH 2 (ENVELOPE)")
    c.close()
    with server.store._sessions() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.account == member,
                                                         AuditEvent.event == "message.read")
                                .order_by(AuditEvent.id)))  # PostgreSQL gives no order unless asked
    assert len(events) == 2
    many, one = events
    assert many.message is None and "count=3" in many.detail and "client=AuditClient" in many.detail
    assert one.message is not None and one.detail == "client=AuditClient" and one.protocol == "imap"
    assert one.client_ip == "127.0.0.1"


def test_large_message_round_trip_and_partial(server: Server) -> None:
    member = server.account("member")
    line = b"".join(bytes([33 + (i % 90)]) for i in range(76)) + b"\r\n"
    body = b"".join(b"%06d" % n + line for n in range(3 * 1024 * 1024 // 84))  # ~3 MiB
    msg = b"Subject: big\r\nContent-Type: text/plain\r\n\r\n" + body
    client = imaps(server, member)
    typ, data = client.append("Drafts", None, None, msg)
    assert typ == "OK" and b"APPENDUID" in data[0]
    client.select("Drafts")
    typ, data = client.fetch("1", "(RFC822.SIZE BODY.PEEK[])")
    assert data[0][1] == msg
    typ, data = client.fetch("1", f"(BODY.PEEK[TEXT]<{2 * 1024 * 1024}.10>)")
    start = 2 * 1024 * 1024
    assert data[0][1] == body[start:start + 10]
    client.logout()


def test_connections_per_address_are_limited(server: Server) -> None:
    # The shipped limit is 50; hold that many and the next is told BYE.
    held = []
    try:
        for _ in range(50):
            c = Client("127.0.0.1", server.imaps, server.context())
            assert c.response().startswith(b"* OK")
            held.append(c)
        extra = Client("127.0.0.1", server.imaps, server.context())
        assert extra.response().startswith(b"* BYE Too many connections")
        extra.close()
    finally:
        for c in held:
            c.close()


def test_logs_carry_no_passwords_or_content(server: Server) -> None:
    member = server.account("member")
    server.store.deliver(b"Subject: Secret diagnosis 7Q\r\n\r\nConfidential body 7Q\r\n", server.sender, [member])
    c = raw_session(server, member)
    c.command("a", 'LOGIN nobody@x.test "Wrong-Password-7Q"')
    c.command("s", "SELECT INBOX")
    c.command("f", "FETCH 1 (BODY[] ENVELOPE)")
    c.command("b", "FETCH 1 (BOGUS[)")
    c.close()
    time.sleep(0.2)
    log = server.log.read_text()
    for secret in (PASSWORD, "Wrong-Password-7Q", "Secret diagnosis", "Confidential body"):
        assert secret not in log
