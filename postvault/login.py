"""Logins for every protocol (SMTP AUTH, IMAP LOGIN/AUTHENTICATE, the web
pages): the auth limits of policy.toml first, then the password.

An attempt the limits refuse is answered without checking the password and
without counting as a failure: a guess made during a delay or a lock costs
the attacker time and teaches nothing (policy/auth_limits.py). Synchronous;
servers run it on a worker thread (bcrypt and Argon2id are slow on purpose).

Logins that open the private key (``unwrap=True``: IMAP, web) go through a
``LoginCache``: Thunderbird opens several IMAP connections at once and
reconnects often, and each full login costs bcrypt plus Argon2id (about half
a second of CPU and 64 MiB). Within a minute of a successful login, the same
address with the same password gets the same session back for the price of
one database read. Issue 5 item 2; the safety argument is on ``LoginCache``.

Emergency-access credentials (user name ``emergency-<id>``, see
``store/emergency.py``) are accepted over IMAP only, after the same auth
limits, and never cached: expiry and revocation are checked at every login.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, overload

from .errors import AuthenticationFailed, LoginLimited
from .policy.auth_limits import auth_limit, history
from .policy.schema import Policy
from .store.api import AccountInfo, AccountSession, Store
from .store.passwords import password_bytes

CACHE_SIZE = 256
CACHE_TTL_SECONDS = 60.0


@dataclass(frozen=True)
class _Entry:
    session: AccountSession = field(repr=False)
    fingerprint: bytes
    created: float


class LoginCache:
    """Recent successful key-opening logins, so that a burst of logins by
    one user pays for Argon2id once.

    Bounded (``max_entries``, the oldest goes first) and expiring: an entry
    lives ``ttl`` seconds from the full login that made it, however often it
    is used (not sliding), so a password checked once opens at most a
    minute's worth of sessions without being checked again.

    Keyed by HMAC-SHA256, under a random key made per process, of the
    lower-cased address and the exact password bytes. Only the same address
    with the same password finds an entry; the password is never stored,
    and a wrong one misses and takes the full path (bcrypt, failure counted
    and audited). A hit must also (in ``authenticate``): pass the auth
    limits, which are checked before the cache; find the account unchanged
    since the entry was made (``Store.login_fingerprint``: a password change,
    a re-wrap, a swapped public key or a disabled account all change it); and
    it is audited as ``login.ok`` like any login.

    Why a hit skips bcrypt too, not only Argon2id: bcrypt here answers "is
    this the password", and a hit already proves that (an HMAC match under a
    secret key, made only after bcrypt and Argon2id both accepted it). Its
    only other job, equal timing, protects nothing on this path: a hit is
    fast only for someone who typed the right password, and the answer OK
    tells them that anyway. Every wrong password, and every unknown
    address, still pays the full cost, so guessing is not made cheaper.

    What someone who can read this process's memory gets from it: for
    logins of the last minute, the unwrapped private keys (which every open
    IMAP session holds anyway, for its whole life) and an HMAC of each
    password under a key also in memory, against which passwords can be
    guessed offline at HMAC speed instead of Argon2id speed. That is the
    price of a fast re-login; it is bounded to accounts that logged in
    within the last minute, whose passwords such an attacker could as well
    read as they arrive (protocol buffers are not wiped either). Nothing of
    this reaches disk: no entry is written anywhere, and a restart empties
    the cache and draws a new HMAC key.
    """

    def __init__(
        self,
        *,
        max_entries: int = CACHE_SIZE,
        ttl: float = CACHE_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl <= 0:
            raise ValueError("a login cache needs room for an entry and a positive lifetime")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        # Logins in progress, per key: a second identical login waits for the
        # first instead of paying Argon2id alongside it (Thunderbird's burst).
        self._inflight: dict[bytes, tuple[threading.Lock, int]] = {}

    def key(self, email: str, password: str) -> bytes:
        parts = (email.strip().lower().encode("utf-8", "surrogatepass"), password_bytes(password))
        # Length-prefixed, so no (address, password) pair reads as another.
        msg = b"".join(struct.pack(">I", len(p)) + p for p in parts)
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _expire(self) -> None:
        # Entries are in creation order, so expired ones are at the front.
        cutoff = self._clock() - self.ttl
        while self._entries:
            k, entry = next(iter(self._entries.items()))
            if entry.created > cutoff:
                break
            del self._entries[k]

    def get(self, key: bytes) -> _Entry | None:
        with self._lock:
            self._expire()
            return self._entries.get(key)

    def put(self, key: bytes, session: AccountSession, fingerprint: bytes) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = _Entry(session, fingerprint, self._clock())
            self._expire()
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, key: bytes) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @contextmanager
    def single_flight(self, key: bytes) -> Iterator[None]:
        """Serialize logins with the same key (same address and password)."""
        with self._lock:
            lock, users = self._inflight.get(key, (threading.Lock(), 0))
            self._inflight[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._inflight[key]
                if users == 1:
                    del self._inflight[key]
                else:
                    self._inflight[key] = (lock, users - 1)


# One cache per store (tests open many stores in one process; account ids
# repeat between them).
_caches: weakref.WeakKeyDictionary[Store, LoginCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def login_cache(store: Store) -> LoginCache:
    """The login cache ``authenticate`` uses for ``store`` by default."""
    with _caches_lock:
        cache = _caches.get(store)
        if cache is None:
            cache = _caches[store] = LoginCache()
        return cache


def _limit(store: Store, policy: Policy, email: str, client_ip: str | None):  # type: ignore[no-untyped-def]
    now = datetime.now(timezone.utc)
    by_account, by_ip = store.recent_auth_failures(email, client_ip, now - history(policy))
    return auth_limit(by_account, by_ip, now, policy)


@overload
def authenticate(store: Store, policy: Policy, email: str, password: str, *, client_ip: str | None,
                 protocol: str, unwrap: Literal[True], cache: LoginCache | None = None) -> AccountSession: ...
@overload
def authenticate(store: Store, policy: Policy, email: str, password: str, *, client_ip: str | None,
                 protocol: str, unwrap: Literal[False], cache: LoginCache | None = None) -> AccountInfo: ...
def authenticate(store: Store, policy: Policy, email: str, password: str, *, client_ip: str | None,
                 protocol: str, unwrap: bool, cache: LoginCache | None = None) -> AccountInfo | AccountSession:
    """Check limits, then the password; with ``unwrap`` also open the private
    key into a session (IMAP, web), without it only verify (SMTP).

    With ``unwrap``, a login that repeats a recent one (same address and
    password, account unchanged) is answered from ``cache`` (by default the
    store's ``login_cache``) without bcrypt or Argon2id; see ``LoginCache``.

    Raises ``LoginLimited`` (throttled or locked) or ``AuthenticationFailed``.
    """
    # The limits come first, for cache hits too: a locked account stays
    # locked for whoever holds its password.
    limit = _limit(store, policy, email, client_ip)
    if not limit.allowed:
        _audit(store, "login.limited", email, client_ip, protocol, f"verdict={limit.verdict} scope={limit.scope}")
        raise LoginLimited(limit.decision)
    try:
        if unwrap and protocol == "imap" and store.is_emergency_username(email):
            # Break-glass credentials (store/emergency.py): IMAP only, never
            # cached, so expiry and revocation are checked at every login.
            return store.emergency_login(email, password, client_ip=client_ip, protocol=protocol)
        if unwrap:
            return _login(store, cache if cache is not None else login_cache(store), email, password,
                          client_ip, protocol)
        return store.verify_password(email, password, client_ip=client_ip, protocol=protocol)
    except AuthenticationFailed:
        after = _limit(store, policy, email, client_ip)
        if after.verdict == "locked":
            _audit(store, "account.locked", email, client_ip, protocol, f"seconds={after.seconds}")
        raise


def _login(store: Store, cache: LoginCache, email: str, password: str, client_ip: str | None,
           protocol: str) -> AccountSession:
    key = cache.key(email, password)
    with cache.single_flight(key):
        entry = cache.get(key)
        if entry is not None:
            if store.resume_login(entry.session, entry.fingerprint, client_ip=client_ip, protocol=protocol):
                return entry.session
            cache.discard(key)  # the account changed: the full check decides
        # Read before the full login, not after: if the password changes in
        # between, the entry carries the old fingerprint and its next use is
        # refused, instead of the old password being cached as current.
        fingerprint = store.login_fingerprint(email)
        session = store.login(email, password, client_ip=client_ip, protocol=protocol)
        if fingerprint is not None:
            cache.put(key, session, fingerprint)
        return session


def _audit(store: Store, event: str, email: str, client_ip: str | None, protocol: str, detail: str) -> None:
    # Only a real account's address is named (see AccountStore._check_password).
    known = store.accounts([email]).get(email.strip().lower())
    store.record_event(event, actor=known.email if known else "unknown-user", account=known.email if known else None,
                       client_ip=client_ip, protocol=protocol, detail=detail)
