"""User enumeration and password guessing, over SMTP AUTH and IMAP LOGIN.

An unknown user and a wrong password get the same reply and take about the
same time (both pay for bcrypt); guessing is throttled, then locked, and
every step is audited. A throttle or lock applies to unknown names alike,
so its message tells nothing either.

Sources: OWASP Web Security Testing Guide WSTG-IDNT-04 (account
enumeration, including by response time) and WSTG-ATHN-03 (weak lockout);
OWASP ASVS 4.0 V2.2.1 (anti-automation) and V7.1 (log auth events); NIST SP
800-63B §5.2.2 (rate limiting); CWE-203/CWE-208 (observable discrepancy,
timing); CWE-307 (excessive authentication attempts); RFC 4954 §4 and RFC
5530 (AUTHENTICATIONFAILED, UNAVAILABLE). Timing is compared as a ratio of
medians with a generous band, never as an absolute time.
"""

from __future__ import annotations

import base64
import re
import statistics
import time

from sqlalchemy import select

from postvault.store.models import AuditEvent
from tests.smtpd.client import PASSWORD
from tests.smtpd.conftest import Server, World

from .conftest import LOCKOUT_AFTER, THROTTLE_AFTER, Serve

WRONG = "not the password at all"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def events(store: object, email: str) -> list[tuple[str, str | None]]:
    with store._sessions() as s:  # type: ignore[attr-defined]
        return [(e.event, e.protocol) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.account == email).order_by(AuditEvent.id))]


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b)


# --- SMTP ------------------------------------------------------------------------------


def test_smtp_unknown_user_and_wrong_password_look_and_time_the_same(smtp: Server, world: World) -> None:
    # WSTG-IDNT-04; CWE-203/208. Two fresh accounts take one wrong password
    # each per round (TEST_POLICY locks at 3), unknown names one each.
    known = [f"enum{i}@dental.test" for i in range(2)]
    for email in known:
        world.store.create_account(email, "member", "Enum Dental", PASSWORD)
    replies: set[tuple[int, tuple[str, ...]]] = set()
    prompts: set[tuple[str, ...]] = set()
    t_known: list[float] = []
    t_unknown: list[float] = []
    for n in range(4):
        for user, password, times in ((known[n % 2], WRONG, t_known), (f"ghost{n}@dental.test", PASSWORD, t_unknown)):
            c = smtp.raw()
            c.ehlo()
            if n % 2:  # AUTH LOGIN: the prompts must not differ either
                code, first = c.cmd("AUTH LOGIN " + b64(user))
                prompts.add(tuple(first))
                started = time.monotonic()
                code, lines = c.cmd(b64(password))
            else:
                started = time.monotonic()
                code, lines = c.login(user, password)
            times.append(time.monotonic() - started)
            replies.add((code, tuple(lines)))
            c.close()
    assert len(replies) == 1, replies
    code, lines = replies.pop()
    assert code == 535 and lines[0].startswith("535 5.7.8 "), lines
    assert len(prompts) == 1
    assert 0.5 < ratio(t_known, t_unknown) < 2.0, (t_known, t_unknown)


def test_smtp_lock_is_the_same_for_known_and_unknown_names(smtp: Server, world: World) -> None:
    # WSTG-IDNT-04: a lockout that only real accounts get is an oracle.
    real = "lockme@dental.test"
    world.store.create_account(real, "member", "Lock Dental", PASSWORD)
    answers = []
    for user in (real, "lockghost@dental.test"):
        c = smtp.raw()
        c.ehlo()
        for _ in range(3):  # TEST_POLICY: the third failure locks
            assert c.login(user, WRONG)[0] == 535
        answers.append(c.login(user, PASSWORD))
        c.close()
    assert answers[0] == answers[1], answers
    assert answers[0][0] == 454 and "locked" in answers[0][1][0]
    trail = events(world.store, real)
    assert trail.count(("login.failed", "smtp")) == 3
    assert ("account.locked", "smtp") in trail and ("login.limited", "smtp") in trail
    assert ("login.ok", "smtp") not in trail


# --- IMAP ------------------------------------------------------------------------------


def _imap_login(serve: Serve, user: str, password: str) -> tuple[bytes, float]:
    c = serve.imaps()
    c.response()
    started = time.monotonic()
    line = c.command("a", f'LOGIN "{user}" "{password}"')[-1]
    took = time.monotonic() - started
    c.close()
    return line, took


def test_imap_unknown_user_and_wrong_password_look_and_time_the_same(serve: Serve) -> None:
    # WSTG-IDNT-04; CWE-208. One failure per name stays under the throttle.
    known = [serve.account() for _ in range(4)]
    answers: set[bytes] = set()
    t_known: list[float] = []
    t_unknown: list[float] = []
    for n, email in enumerate(known):
        line, took = _imap_login(serve, email, WRONG)
        answers.add(line)
        t_known.append(took)
        line, took = _imap_login(serve, f"ghost{n}@{email.split('@')[1]}", PASSWORD)
        answers.add(line)
        t_unknown.append(took)
    assert answers == {b"a NO [AUTHENTICATIONFAILED] Authentication failed."}, answers
    assert 0.5 < ratio(t_known, t_unknown) < 2.0, (t_known, t_unknown)


def test_imap_guessing_is_throttled_then_locked_and_audited(serve: Serve) -> None:
    # CWE-307; NIST SP 800-63B §5.2.2; WSTG-ATHN-03. serve's policy:
    # throttle from the 2nd failure (2 s each time), lock at the
    # 4th. An unknown name walks the same steps beside the real account and
    # must see exactly the same answers (WSTG-IDNT-04).
    email = serve.account()
    ghost = "ghost-lock@" + email.split("@")[1]
    for step in range(1, LOCKOUT_AFTER + 1):
        for user in (email, ghost):
            assert _imap_login(serve, user, WRONG)[0] == b"a NO [AUTHENTICATIONFAILED] Authentication failed.", step
            if THROTTLE_AFTER <= step < LOCKOUT_AFTER:
                # Throttled for 2 s now: even the right password is not checked.
                line = _imap_login(serve, user, PASSWORD)[0]
                assert line.startswith(b"a NO [UNAVAILABLE] Too many failed logins; wait"), (step, user, line)
        if THROTTLE_AFTER <= step < LOCKOUT_AFTER:
            time.sleep(2.1)  # the delay is over
    seen = {_imap_login(serve, user, PASSWORD)[0] for user in (email, ghost)}
    assert len(seen) == 1, seen
    assert seen.pop().startswith(b"a NO [UNAVAILABLE] Too many failed logins; this login is locked")
    trail = events(serve.store, email)
    assert trail.count(("login.failed", "imap")) == LOCKOUT_AFTER
    assert trail.count(("login.limited", "imap")) == LOCKOUT_AFTER - THROTTLE_AFTER + 1
    assert ("account.locked", "imap") in trail
    assert ("login.ok", "imap") not in trail


# --- the web sign-in page --------------------------------------------------------------


def test_web_login_unknown_user_and_wrong_password_look_and_time_the_same(serve: Serve) -> None:
    # WSTG-IDNT-04 on the HTTPS sign-in form (same status, same page but for
    # the address typed and the form's fresh CSRF token; time ratio in band).
    from tests.web.conftest import Client as WebClient

    known = [serve.account() for _ in range(3)]
    pages: set[tuple[int, str]] = set()
    t_known: list[float] = []
    t_unknown: list[float] = []
    for n, email in enumerate(known):
        for user, password, times in ((email, WRONG, t_known), (f"ghost{n}@{email.split('@')[1]}", PASSWORD, t_unknown)):
            web = WebClient(serve.ports["https"], serve.context())
            token = web.get("/login").csrf()
            started = time.monotonic()
            reply = web.post("/login", {"email": user, "password": password}, token)
            times.append(time.monotonic() - started)
            text = reply.text.replace(user, "USER")
            text = re.sub(r'name="csrf" value="[^"]+"', "CSRF", text)
            pages.add((reply.status, text))
            assert "__Host-pv_session" not in web.cookies
    assert len(pages) == 1, [p[1][:300] for p in pages]
    assert pages.pop()[0] == 422
    assert 0.5 < ratio(t_known, t_unknown) < 2.0, (t_known, t_unknown)
