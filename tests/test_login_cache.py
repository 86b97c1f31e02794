"""The login cache (issue 5 item 2): a repeated key-opening login within a
minute skips bcrypt and Argon2id, and nothing else: limits, audit, and the
account's current password still decide."""

from __future__ import annotations

import threading

import bcrypt
import pytest
from sqlalchemy import func, select

from postvault.errors import AuthenticationFailed, LoginLimited
from postvault.login import CACHE_TTL_SECONDS, LoginCache, authenticate, login_cache
from postvault.policy.schema import AuthPolicy, Policy
from postvault.store import crypto
from postvault.store.api import AccountSession, Store
from postvault.store.models import AuditEvent, AuthFailure
from tests.conftest import PASSWORD

POLICY = Policy(auth=AuthPolicy(throttle_after=5, lockout_after=3, lockout_minutes=5))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Costs:
    """Counts the slow steps: Argon2id derivations and bcrypt checks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.argon2 = 0
        self.bcrypt = 0
        real_derive, real_check = crypto.derive_wrapping_key, bcrypt.checkpw

        def derive(secret: bytes, kdf: crypto.KdfParams) -> bytes:
            self.argon2 += 1
            return real_derive(secret, kdf)

        def check(pw: bytes, hashed: bytes) -> bool:
            self.bcrypt += 1
            return real_check(pw, hashed)

        monkeypatch.setattr(crypto, "derive_wrapping_key", derive)
        monkeypatch.setattr(bcrypt, "checkpw", check)

    def reset(self) -> None:
        self.argon2 = self.bcrypt = 0


@pytest.fixture
def costs(monkeypatch: pytest.MonkeyPatch) -> Costs:
    return Costs(monkeypatch)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> LoginCache:
    return LoginCache(clock=clock)


def login(store: Store, email: str, password: str = PASSWORD, cache: LoginCache | None = None,
          ip: str = "192.0.2.10") -> AccountSession:
    return authenticate(store, POLICY, email, password, client_ip=ip, protocol="imap", unwrap=True, cache=cache)


def audit_events(store: Store, event: str) -> int:
    with store._sessions() as s:
        return s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.event == event)) or 0


def test_second_login_skips_the_slow_steps_and_is_audited(
    store: Store, people: dict[str, str], cache: LoginCache, costs: Costs
) -> None:
    first = login(store, people["member"], cache=cache)
    assert costs.argon2 == 1 and costs.bcrypt == 1
    costs.reset()
    again = login(store, people["member"].upper(), cache=cache)  # addresses compare case-insensitively
    assert again is first and costs.argon2 == 0 and costs.bcrypt == 0
    assert audit_events(store, "login.ok") == 2


def test_wrong_password_misses_and_counts_as_a_failure(
    store: Store, people: dict[str, str], cache: LoginCache, costs: Costs
) -> None:
    login(store, people["member"], cache=cache)
    costs.reset()
    with pytest.raises(AuthenticationFailed):
        login(store, people["member"], PASSWORD + " ", cache=cache)
    assert costs.bcrypt == 1  # the full check, not the cache
    with store._sessions() as s:
        assert s.scalar(select(func.count()).select_from(AuthFailure)) == 1
    # Another account with the same password does not hit either.
    costs.reset()
    assert login(store, people["member2"], cache=cache).email == people["member2"]
    assert costs.argon2 == 1


def test_entries_expire_from_creation_not_last_use(
    store: Store, people: dict[str, str], cache: LoginCache, clock: Clock, costs: Costs
) -> None:
    login(store, people["member"], cache=cache)
    clock.now += CACHE_TTL_SECONDS - 1
    costs.reset()
    login(store, people["member"], cache=cache)
    assert costs.argon2 == 0  # used just before expiry...
    clock.now += 2
    login(store, people["member"], cache=cache)
    assert costs.argon2 == 1  # ...which did not extend its life
    assert len(cache) == 1  # and the fresh login is cached again


def test_eviction_keeps_the_cache_bounded(
    store: Store, people: dict[str, str], clock: Clock, costs: Costs
) -> None:
    small = LoginCache(max_entries=2, clock=clock)
    for who in ("member", "member2", "colleague"):
        login(store, people[who], cache=small)
        clock.now += 1
    assert len(small) == 2
    costs.reset()
    login(store, people["colleague"], cache=small)
    login(store, people["member2"], cache=small)
    assert costs.argon2 == 0
    login(store, people["member"], cache=small)  # the oldest went first
    assert costs.argon2 == 1


def test_password_change_invalidates(store: Store, people: dict[str, str], cache: LoginCache, costs: Costs) -> None:
    login(store, people["colleague"], cache=cache)
    store.change_password(people["colleague"], PASSWORD, "a brand new passphrase here")
    with pytest.raises(AuthenticationFailed):
        login(store, people["colleague"], cache=cache)
    costs.reset()
    session = login(store, people["colleague"], "a brand new passphrase here", cache=cache)
    assert costs.argon2 == 1 and session.email == people["colleague"]
    costs.reset()
    login(store, people["colleague"], "a brand new passphrase here", cache=cache)
    assert costs.argon2 == 0


def test_limits_apply_to_hits(store: Store, people: dict[str, str], cache: LoginCache) -> None:
    login(store, people["member"], cache=cache)
    for i in range(3):
        with pytest.raises(AuthenticationFailed):
            login(store, people["member"], f"guess {i}", cache=cache, ip="198.51.100.7")
    with pytest.raises(LoginLimited):
        login(store, people["member"], cache=cache)  # locked, cached or not


def test_simultaneous_logins_pay_once(store: Store, people: dict[str, str], cache: LoginCache, costs: Costs) -> None:
    results: list[AccountSession] = []
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            results.append(login(store, people["member"], cache=cache))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4
    assert costs.argon2 == 1 and all(r is results[0] for r in results)
    assert audit_events(store, "login.ok") == 4


def test_default_cache_is_per_store_and_smtp_is_unchanged(store: Store, people: dict[str, str], costs: Costs) -> None:
    assert login_cache(store) is login_cache(store)
    login(store, people["member"])
    login(store, people["member"])
    assert costs.argon2 == 1
    costs.reset()
    for _ in range(2):
        authenticate(store, POLICY, people["member"], PASSWORD, client_ip=None, protocol="smtp", unwrap=False)
    assert costs.bcrypt == 2  # SMTP only verifies; no cache there


def test_the_cache_holds_no_password(store: Store, people: dict[str, str], cache: LoginCache) -> None:
    login(store, people["member"], cache=cache)
    keys = list(cache._entries)
    assert all(len(k) == 32 for k in keys)
    assert PASSWORD.encode() not in b"".join(keys)
    assert PASSWORD not in repr(cache._entries) and "private_key" not in repr(cache._entries)
    # The key is a keyed hash: another process (another key) makes another.
    assert LoginCache().key(people["member"], PASSWORD) != cache.key(people["member"], PASSWORD)
