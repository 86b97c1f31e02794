"""Login throttling and lockout (pure), from ``[auth]`` in policy.toml.

Given the recent failed logins of an account and of a client address, and
the time now, :func:`auth_limit` says whether the next attempt may go ahead,
must wait, or is refused because the account is locked.

The model, chosen to be easy to explain to an office that calls:

- A failure counts for ``window_minutes``.
- An account with ``throttle_after`` or more counted failures waits before
  each further attempt: ``delay_seconds`` after the ``throttle_after``-th
  failure, doubling with each further one, never more than
  ``max_delay_seconds``, measured from the latest failure.
- The failure that brings an account's count to ``lockout_after`` locks it
  for ``lockout_minutes``. When the lock ends the count starts afresh, so a
  real user is not locked out again by the failures that caused the first
  lock; an attacker gets ``lockout_after`` guesses per lock period.
- A client address is throttled the same way from ``ip_throttle_after``
  failures, across all accounts (password spraying), but never locked: a
  whole practice often shares one address.

What the caller does (the SMTP and IMAP servers through the store):

- Record a failure for each wrong password, keyed by the lower-cased name
  the client gave, whether or not that account exists, so a lock or delay
  doesn't reveal which accounts exist. Clear the account's failures after a
  successful login.
- Don't check the password, and don't record a failure, for an attempt this
  refuses: a guess made during a lock or delay must cost nothing and teach
  nothing. Answer it with :attr:`AuthLimit.decision` (temporary failure).
- Pass failures newer than ``now - history(policy)``; older ones can't
  change the answer and may be deleted.

Times are timezone-aware datetimes (the store keeps UTC).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from postvault.policy.decision import ALLOW, Decision, refuse
from postvault.policy.schema import AuthPolicy, Policy

Verdict = Literal["allow", "delay", "locked"]


@dataclass(frozen=True)
class AuthLimit:
    """The answer for the next login attempt."""

    verdict: Verdict
    # When the delay or lock ends; None when allowed.
    until: datetime | None = None
    # Whole seconds from now until then, rounded up; 0 when allowed.
    seconds: int = 0
    # What is limited: "account" or "address" (of the client); "" when allowed.
    scope: Literal["", "account", "address"] = ""

    @property
    def allowed(self) -> bool:
        return self.verdict == "allow"

    @property
    def decision(self) -> Decision:
        """The answer to give instead of checking the password.

        SMTP AUTH: 454 4.7.0 (RFC 4954, temporary authentication failure);
        IMAP: NO [UNAVAILABLE] (RFC 5530: temporary, try again later). The
        text is the same whether or not the account exists.
        """
        if self.verdict == "allow":
            return ALLOW
        if self.verdict == "delay":
            return refuse(454, "4.7.0", f"Too many failed logins; wait {self.seconds} second"
                                        f"{'s' if self.seconds != 1 else ''} before trying again.",
                          f"auth.throttle-{self.scope}", "UNAVAILABLE")
        # Minutes, not a clock time: the client's time zone is unknown here.
        minutes = max(1, math.ceil(self.seconds / 60))
        return refuse(454, "4.7.0", f"Too many failed logins; this login is locked for {minutes} more "
                                    f"minute{'s' if minutes != 1 else ''}; if you forgot the password, ask "
                                    "the office you work with or your administrator to reset it.",
                      "auth.lockout", "UNAVAILABLE")


ALLOWED = AuthLimit("allow")


def history(policy: Policy) -> timedelta:
    """How far back failures can matter: a lock that is still on began at
    most ``lockout_minutes`` ago, after failures at most ``window_minutes``
    before that."""
    return timedelta(minutes=policy.auth.window_minutes + policy.auth.lockout_minutes)


def auth_limit(account_failures: Iterable[datetime], ip_failures: Iterable[datetime], now: datetime,
               policy: Policy) -> AuthLimit:
    """Whether the next login attempt may go ahead now.

    ``account_failures``: failed logins for the name being tried, since its
    last successful login; ``ip_failures``: failed logins from the client's
    address, to any account. Any order; duplicates count.
    """
    auth = policy.auth
    account = _account_limit(sorted(account_failures), now, auth)
    address = _throttle(_recent(sorted(ip_failures), now, auth), now, auth, auth.ip_throttle_after, "address")
    # The stricter answer wins: a lock, else the longer wait.
    if account.verdict == "locked":
        return account
    if address.seconds > account.seconds:
        return address
    return account


def _account_limit(failures: list[datetime], now: datetime, auth: AuthPolicy) -> AuthLimit:
    lock = timedelta(minutes=auth.lockout_minutes)
    window = timedelta(minutes=auth.window_minutes)
    run: list[datetime] = []  # the failures counted since the last lock ended
    locked_until: datetime | None = None
    for at in failures:
        if at > now:
            break  # a clock step backwards; judge by what has happened
        if locked_until is not None:
            if at < locked_until:
                continue  # refused during the lock, not a password guess
            locked_until, run = None, []
        run = [t for t in run if at - t < window]
        run.append(at)
        if len(run) >= auth.lockout_after:
            locked_until = at + lock
    if locked_until is not None and now < locked_until:
        return AuthLimit("locked", locked_until, _ceil_seconds(locked_until - now), "account")
    if locked_until is not None:
        return ALLOWED  # the lock has ended, and with it the count
    return _throttle(_recent(run, now, auth), now, auth, auth.throttle_after, "account")


def _recent(failures: list[datetime], now: datetime, auth: AuthPolicy) -> list[datetime]:
    window = timedelta(minutes=auth.window_minutes)
    return [t for t in failures if t <= now and now - t < window]


def _throttle(recent: list[datetime], now: datetime, auth: AuthPolicy, after: int,
              scope: Literal["account", "address"]) -> AuthLimit:
    count = len(recent)
    if count < after:
        return ALLOWED
    # Bounded exponent: 2**big would be a huge int only to be capped.
    exponent = min(count - after, 32)
    wait = timedelta(seconds=min(auth.delay_seconds * 2**exponent, auth.max_delay_seconds))
    until = max(recent) + wait
    if now >= until:
        return ALLOWED
    return AuthLimit("delay", until, _ceil_seconds(until - now), scope)


def _ceil_seconds(delta: timedelta) -> int:
    return max(1, math.ceil(delta.total_seconds()))
