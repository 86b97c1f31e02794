"""Logins through the auth limits: throttle, then lock, all audited, and
the same for an unknown name as for a real one."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from postvault.errors import AuthenticationFailed, LoginLimited
from postvault.login import authenticate
from postvault.policy.schema import AuthPolicy, Policy
from postvault.store.api import Store
from postvault.store.models import AuditEvent
from tests.conftest import PASSWORD

POLICY = Policy(auth=AuthPolicy(throttle_after=2, lockout_after=3, lockout_minutes=5, delay_seconds=30,
                                max_delay_seconds=60))


def attempt(store: Store, email: str, password: str) -> str:
    try:
        authenticate(store, POLICY, email, password, client_ip="127.0.0.5", protocol="smtp", unwrap=False)
    except LoginLimited as exc:
        return f"limited:{exc.decision.code} {exc.decision.enhanced}"  # type: ignore[attr-defined]
    except AuthenticationFailed:
        return "failed"
    return "ok"


@pytest.mark.parametrize("email", ["office@dental.test", "nobody@dental.test"])
def test_throttle_then_lock_alike_for_known_and_unknown(store: Store, people: dict[str, str], email: str) -> None:
    assert attempt(store, email, "wrong password 1") == "failed"
    assert attempt(store, email, "wrong password 2") == "failed"
    # Throttled now: even the right password is not checked.
    assert attempt(store, email, PASSWORD) == "limited:454 4.7.0"
    with store._sessions() as s:
        events = list(s.scalars(select(AuditEvent.event)))
    assert events.count("login.failed") == 2 and "login.limited" in events


def test_lockout_is_audited(store: Store, people: dict[str, str]) -> None:
    policy = Policy(auth=AuthPolicy(throttle_after=10, lockout_after=3, lockout_minutes=5))
    for i in range(3):
        with pytest.raises(AuthenticationFailed):
            authenticate(store, policy, people["member"], f"wrong {i}", client_ip="127.0.0.6", protocol="imap",
                         unwrap=True)
    with pytest.raises(LoginLimited) as info:
        authenticate(store, policy, people["member"], PASSWORD, client_ip="127.0.0.7", protocol="imap", unwrap=True)
    assert "locked" in str(info.value)
    with store._sessions() as s:
        locked = s.scalar(select(AuditEvent).where(AuditEvent.event == "account.locked"))
    assert locked is not None and locked.account == people["member"]


def test_success_below_the_limits(store: Store, people: dict[str, str]) -> None:
    assert attempt(store, people["member"], "wrong once") == "failed"
    session = authenticate(store, POLICY, people["member"], PASSWORD, client_ip="127.0.0.5", protocol="imap",
                           unwrap=True)
    assert session.email == people["member"] and len(session.private_key) == 32
