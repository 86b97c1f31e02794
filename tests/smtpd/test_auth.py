"""AUTH PLAIN and LOGIN against the store: one answer for every wrong
credential, the policy's auth limits with their audit trail, and MAIL
before AUTH."""

from __future__ import annotations

import base64
import time

from sqlalchemy import select

from postvault.store.models import AuditEvent

from .client import PASSWORD
from .conftest import MEMBER, Server, World


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_plain_with_initial_response_and_after_a_challenge(server: Server) -> None:
    c = server.raw()
    c.ehlo()
    code, lines = c.cmd("AUTH PLAIN")
    assert (code, lines) == (334, ["334 "])
    code, lines = c.cmd(b64(f"\0{MEMBER}\0{PASSWORD}"))
    assert lines == ["235 2.7.0 Authentication successful"]
    code, lines = c.cmd("AUTH PLAIN " + b64(f"\0{MEMBER}\0{PASSWORD}"))
    assert code == 503 and lines[0].startswith("503 5.5.1 Already authenticated")
    c.close()
    c = server.raw()
    c.ehlo()
    # The authorization identity may repeat the user name (RFC 4616).
    code, lines = c.cmd("AUTH PLAIN " + b64(f"{MEMBER}\0{MEMBER}\0{PASSWORD}"))
    assert code == 235, lines
    c.close()


def test_login_in_both_forms(server: Server) -> None:
    for implicit in (True, False):
        c = server.raw(implicit=implicit)
        if not implicit:
            c.ehlo()
            c.starttls()
        c.ehlo()
        code, lines = c.cmd("AUTH LOGIN")
        assert lines == ["334 " + b64("Username:")]
        code, lines = c.cmd(b64(MEMBER))
        assert lines == ["334 " + b64("Password:")]
        code, lines = c.cmd(b64(PASSWORD))
        assert code == 235, lines
        c.close()
    c = server.raw()
    c.ehlo()
    code, lines = c.cmd("AUTH LOGIN " + b64(MEMBER))
    assert lines == ["334 " + b64("Password:")]
    assert c.cmd(b64(PASSWORD))[0] == 235
    c.close()


def test_unknown_user_and_wrong_password_look_the_same(server: Server) -> None:
    answers, times = [], []
    for user, password in ((MEMBER, "wrong password here"), ("nobody@dental.test", PASSWORD)):
        c = server.raw()
        c.ehlo()
        started = time.monotonic()
        code, lines = c.login(user, password)
        times.append(time.monotonic() - started)
        answers.append((code, lines))
        c.close()
    assert answers[0] == answers[1]
    code, lines = answers[0]
    assert code == 535 and lines[0].startswith("535 5.7.8 Authentication failed: the user name or password is wrong")
    # Both ran bcrypt (cost 12: a few hundred milliseconds here).
    assert min(times) > 0.05
    assert max(times) < 5 * min(times)
    # The right password still works: two failures are below the limits.
    c = server.raw(user=MEMBER)
    c.close()


def test_acting_for_someone_else_is_refused(server: Server) -> None:
    c = server.raw()
    c.ehlo()
    code, lines = c.cmd("AUTH PLAIN " + b64(f"front@clinic.test\0{MEMBER}\0{PASSWORD}"))
    assert code == 535 and "on behalf of another user" in lines[0]
    c.close()


def test_malformed_auth_data(server: Server) -> None:
    c = server.raw()
    c.ehlo()
    code, lines = c.cmd("AUTH PLAIN not-base64!")
    assert code == 501 and lines[0].startswith("501 5.5.2 ")
    code, lines = c.cmd("AUTH PLAIN " + b64("no-nul-bytes"))
    assert code == 501 and lines[0].startswith("501 5.5.2 ")
    code, lines = c.cmd("AUTH LOGIN")
    code, lines = c.cmd("*")  # the client cancels (RFC 4954 section 4)
    assert code == 501 and lines[0].startswith("501 5.7.0 ")
    # A user name that is not UTF-8 matches no account.
    code, lines = c.cmd("AUTH PLAIN " + base64.b64encode(b"\0\xff\xfe@x.test\0pw").decode())
    assert code == 535
    c.close()


def test_lockout_after_failures_is_refused_and_audited(world: World, server: Server) -> None:
    email = "locked@dental.test"
    world.store.create_account(email, "member", "Locked Dental", PASSWORD)
    c = server.raw()
    c.ehlo()
    # TEST_POLICY: the third failure locks the account.
    for _ in range(3):
        assert c.login(email, "not the password")[0] == 535
    code, lines = c.login(email, PASSWORD)
    assert code == 454 and lines[0].startswith("454 4.7.0 Too many failed logins; this login is locked"), lines
    c.close()
    with world.store._sessions() as s:
        events = [(e.event, e.account, e.protocol) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.account == email).order_by(AuditEvent.id))]
    assert events.count(("login.failed", email, "smtp")) == 3
    assert ("account.locked", email, "smtp") in events
    assert ("login.limited", email, "smtp") in events
    assert ("login.ok", email, "smtp") not in events


def test_mail_before_auth_is_refused(server: Server) -> None:
    for implicit in (True, False):
        c = server.raw(implicit=implicit)
        if not implicit:
            c.ehlo()
            c.starttls()
        c.ehlo()
        for command in ("MAIL FROM:<office@dental.test>", "RCPT TO:<dr@ortho.test>", "DATA"):
            code, lines = c.cmd(command)
            assert code == 530 and lines[0].startswith("530 5.7.0 Authentication required"), (command, lines)
        assert c.login(MEMBER)[0] == 235
        assert c.cmd("MAIL FROM:<office@dental.test>")[0] == 250
        c.close()


def test_starttls_forgets_what_came_before(server: Server) -> None:
    """RFC 3207 section 4.2: after TLS the client starts over with EHLO."""
    c = server.raw(implicit=False)
    c.ehlo()
    c.starttls()
    code, lines = c.cmd("AUTH PLAIN " + b64(f"\0{MEMBER}\0{PASSWORD}"))
    assert code == 503 and "EHLO" in lines[0]
    c.close()
