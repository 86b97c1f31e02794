"""Logins for every protocol (SMTP AUTH, IMAP LOGIN/AUTHENTICATE, the web
pages): the auth limits of policy.toml first, then the password.

An attempt the limits refuse is answered without checking the password and
without counting as a failure: a guess made during a delay or a lock costs
the attacker time and teaches nothing (policy/auth_limits.py). Synchronous;
servers run it on a worker thread (bcrypt and Argon2id are slow on purpose).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal, overload

from .errors import AuthenticationFailed, LoginLimited
from .policy.auth_limits import auth_limit, history
from .policy.schema import Policy
from .store.api import AccountInfo, AccountSession, Store


def _limit(store: Store, policy: Policy, email: str, client_ip: str | None):  # type: ignore[no-untyped-def]
    now = datetime.now(timezone.utc)
    by_account, by_ip = store.recent_auth_failures(email, client_ip, now - history(policy))
    return auth_limit(by_account, by_ip, now, policy)


@overload
def authenticate(store: Store, policy: Policy, email: str, password: str, *, client_ip: str | None,
                 protocol: str, unwrap: Literal[True]) -> AccountSession: ...
@overload
def authenticate(store: Store, policy: Policy, email: str, password: str, *, client_ip: str | None,
                 protocol: str, unwrap: Literal[False]) -> AccountInfo: ...
def authenticate(store: Store, policy: Policy, email: str, password: str, *, client_ip: str | None,
                 protocol: str, unwrap: bool) -> AccountInfo | AccountSession:
    """Check limits, then the password; with ``unwrap`` also open the private
    key into a session (IMAP, web), without it only verify (SMTP).

    Raises ``LoginLimited`` (throttled or locked) or ``AuthenticationFailed``.
    """
    limit = _limit(store, policy, email, client_ip)
    if not limit.allowed:
        _audit(store, "login.limited", email, client_ip, protocol, f"verdict={limit.verdict} scope={limit.scope}")
        raise LoginLimited(limit.decision)
    try:
        if unwrap:
            return store.login(email, password, client_ip=client_ip, protocol=protocol)
        return store.verify_password(email, password, client_ip=client_ip, protocol=protocol)
    except AuthenticationFailed:
        after = _limit(store, policy, email, client_ip)
        if after.verdict == "locked":
            _audit(store, "account.locked", email, client_ip, protocol, f"seconds={after.seconds}")
        raise


def _audit(store: Store, event: str, email: str, client_ip: str | None, protocol: str, detail: str) -> None:
    # Only a real account's address is named (see AccountStore._check_password).
    known = store.accounts([email]).get(email.strip().lower())
    store.record_event(event, actor=known.email if known else "unknown-user", account=known.email if known else None,
                       client_ip=client_ip, protocol=protocol, detail=detail)
