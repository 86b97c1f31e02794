"""Login throttling and lockout over plain lists of failure times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from postvault.policy.auth_limits import AuthLimit, auth_limit, history
from postvault.policy.schema import AuthPolicy, Policy

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
DEFAULT = Policy()  # throttle 5, lockout 10 for 15 min, window 60 min, ip 20, delay 1..60 s


def at(*seconds: float) -> list[datetime]:
    return [T0 + timedelta(seconds=s) for s in seconds]


def every(n: int, step: float = 1.0, start: float = 0.0) -> list[datetime]:
    return at(*(start + i * step for i in range(n)))


def limit(account: list[datetime], ip: list[datetime], now_s: float, policy: Policy = DEFAULT) -> AuthLimit:
    return auth_limit(account, ip, T0 + timedelta(seconds=now_s), policy)


def test_no_failures() -> None:
    assert limit([], [], 0).allowed
    assert limit([], [], 0).decision.allowed


def test_below_the_threshold_is_never_delayed() -> None:
    assert limit(every(4), [], 3.01).allowed  # four failures, just now


@pytest.mark.parametrize(
    "failures, wait",
    [(5, 1), (6, 2), (7, 4), (8, 8), (9, 16)],
)
def test_delay_doubles_from_the_threshold(failures: int, wait: int) -> None:
    fails = every(failures)
    last = failures - 1
    d = limit(fails, [], last)
    assert d.verdict == "delay" and d.scope == "account"
    assert d.until == T0 + timedelta(seconds=last + wait)
    assert d.seconds == wait
    # Twin: once the wait is over, the next attempt goes ahead.
    assert limit(fails, [], last + wait).allowed


def test_delay_is_capped() -> None:
    policy = Policy(auth=AuthPolicy(lockout_after=1000, max_delay_seconds=30))
    d = limit(every(40), [], 39, policy)
    assert d.verdict == "delay" and d.seconds == 30
    assert limit(every(40), [], 69, policy).allowed


def test_huge_counts_do_not_overflow() -> None:
    policy = Policy(auth=AuthPolicy(lockout_after=1000, max_delay_seconds=3600))
    d = limit(every(999, 0.001), [], 1, policy)
    assert d.verdict == "delay" and d.seconds <= 3600


def test_seconds_round_up() -> None:
    d = limit(every(5), [], 4.2)
    assert d.verdict == "delay" and d.seconds == 1  # 0.8 s left


def test_lockout_at_the_threshold_for_lockout_minutes() -> None:
    fails = every(10)
    d = limit(fails, [], 9)
    assert d.verdict == "locked" and d.scope == "account"
    assert d.until == T0 + timedelta(seconds=9, minutes=15)
    assert d.decision.rule == "auth.lockout" and "15 more minutes" in d.decision.text
    # Twin: nine failures only delay.
    assert limit(every(9), [], 8).verdict == "delay"


def test_lock_ends_and_the_count_starts_afresh() -> None:
    fails = every(10)
    end = 9 + 15 * 60
    assert limit(fails, [], end - 1).verdict == "locked"
    assert limit(fails, [], end).allowed
    # After the lock, one more failure is the first of a new count, not the 11th.
    assert limit([*fails, T0 + timedelta(seconds=end + 1)], [], end + 1).allowed


def test_failures_during_a_lock_do_not_extend_it() -> None:
    # Recorded by mistake (the server shouldn't check passwords while locked).
    fails = [*every(10), *at(100, 200, 300)]
    assert limit(fails, [], 9 + 15 * 60).allowed


def test_a_second_lock_after_a_fresh_run() -> None:
    start = 9 + 15 * 60
    fails = [*every(10), *every(10, start=start)]
    d = limit(fails, [], start + 9)
    assert d.verdict == "locked" and d.until == T0 + timedelta(seconds=start + 9, minutes=15)


def test_failures_older_than_the_window_do_not_count() -> None:
    # Ten failures spread over more than an hour never reach the lock...
    spread = every(10, step=7 * 60)  # 63 minutes from first to last
    assert limit(spread, [], 9 * 7 * 60).verdict == "delay"
    # ...twin: the same ten within the hour lock.
    close = every(10, step=6 * 60)  # 54 minutes
    assert limit(close, [], 9 * 6 * 60).verdict == "locked"
    # And an old burst is forgotten after the window.
    assert limit(every(8), [], 60 * 60 + 8).allowed
    assert limit(every(8), [], 60 * 60 - 10).allowed  # its delay is long over, too


def test_future_failures_are_ignored() -> None:
    # A clock step backwards must not lock anybody out.
    assert limit(at(*(1000 + i for i in range(10))), [], 0).allowed


def test_order_does_not_matter() -> None:
    fails = every(10)
    assert limit(list(reversed(fails)), [], 9) == limit(fails, [], 9)


def test_address_is_throttled_from_its_own_threshold() -> None:
    ip = every(20)
    d = limit([], ip, 19)
    assert d.verdict == "delay" and d.scope == "address" and d.seconds == 1
    assert d.decision.rule == "auth.throttle-address"
    # Twin: 19 failures from one address (a busy practice) are not delayed.
    assert limit([], every(19), 18).allowed


def test_address_is_never_locked() -> None:
    d = limit([], every(500, 0.01), 5)
    assert d.verdict == "delay" and d.seconds == 60


def test_the_stricter_answer_wins() -> None:
    # Account locked, address only delayed: locked.
    assert limit(every(10), every(25), 24).verdict == "locked"
    # Account delayed 1 s, address 32 s: the address's wait.
    d = limit(every(5, start=20), every(25), 24)
    assert d.scope == "address" and d.seconds == 32
    # Account delayed 16 s, address 1 s: the account's.
    d = limit(every(9, start=12), every(20, start=1), 20)
    assert d.scope == "account" and d.seconds == 16


def test_decisions_are_temporary_failures() -> None:
    for d in (limit(every(5), [], 4).decision, limit(every(10), [], 9).decision):
        assert not d.allowed and d.code == 454 and d.enhanced == "4.7.0" and d.imap_code == "UNAVAILABLE"
    assert limit(every(5), [], 4).decision.text == "Too many failed logins; wait 1 second before trying again."
    assert "wait 2 seconds" in limit(every(6), [], 5).decision.text


def test_lock_message_counts_down_in_minutes() -> None:
    d = limit(every(10), [], 9 + 14 * 60 + 30)
    assert d.verdict == "locked" and d.seconds == 30
    assert "1 more minute;" in d.decision.text


def test_history_covers_window_and_lock() -> None:
    assert history(DEFAULT) == timedelta(minutes=75)
    # Failures older than history() can't change the answer.
    fails = every(10)
    now = 9 + 75 * 60
    assert limit(fails, [], now) == limit([t for t in fails if T0 + timedelta(seconds=now) - t < history(DEFAULT)],
                                          [], now)
