"""Web sessions: server-side, in memory only.

A browser holds a random 256-bit session id in a cookie (HttpOnly, Secure,
SameSite=Strict, ``__Host-`` prefix so no subdomain can set it). The server
keeps, keyed by the SHA-256 of that id (a memory dump or a log line with a
key shows no usable cookie), the ``AccountSession`` with the unwrapped
private key (members need it to renew an invitation), the CSRF token and
the times that bound the session:

- idle: ``[sessions] web_idle_minutes`` after the last request (30 min);
- absolute: ``web_absolute_hours`` after the login (12 h), however busy.

Both are read from the policy in force at each request, so a SIGHUP that
shortens them applies to open sessions too. Nothing is written to disk: a
restart logs everyone out, which is the safe way round.

The clock is injected (tests move it); it is ``time.time`` otherwise.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..policy.schema import SessionPolicy
from ..store.types import AccountSession

Clock = Callable[[], float]
# Bounds on memory: sessions in all, and per account (the oldest go first).
MAX_SESSIONS = 10_000
MAX_PER_ACCOUNT = 20


def new_id() -> str:
    return secrets.token_urlsafe(32)


def _key(raw_id: str) -> bytes:
    return hashlib.sha256(raw_id.encode("utf-8", "surrogatepass")).digest()


@dataclass
class WebSession:
    """One logged-in browser."""

    key: bytes  # SHA-256 of the cookie value
    account_id: int
    email: str
    role: str
    account: AccountSession = field(repr=False)
    csrf: str = field(repr=False)
    created: float
    last_seen: float


class SessionStore:
    """The logged-in browsers of this process (thread-safe)."""

    def __init__(self, clock: Clock, policy: Callable[[], SessionPolicy]) -> None:
        self._clock = clock
        self._policy = policy
        self._lock = threading.Lock()
        self._sessions: OrderedDict[bytes, WebSession] = OrderedDict()

    def create(self, account: AccountSession) -> tuple[str, WebSession]:
        """A new session for a fresh login; returns (cookie value, session)."""
        raw = new_id()
        now = self._clock()
        session = WebSession(_key(raw), account.account_id, account.email, account.role, account,
                             secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._sessions[session.key] = session
            mine = [s.key for s in self._sessions.values() if s.account_id == account.account_id]
            for old in mine[:-MAX_PER_ACCOUNT]:
                del self._sessions[old]
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return raw, session

    def _expired(self, session: WebSession, now: float) -> bool:
        policy = self._policy()
        return (now - session.last_seen > policy.web_idle_minutes * 60
                or now - session.created > policy.web_absolute_hours * 3600)

    def get(self, raw_id: str | None) -> WebSession | None:
        """The live session of a cookie value (its idle timer restarted),
        or None; an expired one is dropped on the way."""
        if not raw_id:
            return None
        key = _key(raw_id)
        now = self._clock()
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[key]
                return None
            session.last_seen = now
            return session

    def rotate(self, session: WebSession) -> str:
        """A new cookie value for the same session (after a password
        change: a copied cookie of before stops working)."""
        raw = new_id()
        with self._lock:
            self._sessions.pop(session.key, None)
            session.key = _key(raw)
            session.csrf = secrets.token_urlsafe(32)
            self._sessions[session.key] = session
        return raw

    def drop(self, session: WebSession) -> None:
        with self._lock:
            self._sessions.pop(session.key, None)

    def drop_account(self, account_id: int, keep: WebSession | None = None) -> int:
        """End every session of an account but ``keep``; how many ended."""
        with self._lock:
            doomed = [k for k, s in self._sessions.items() if s.account_id == account_id and s is not keep]
            for k in doomed:
                del self._sessions[k]
        return len(doomed)

    def sweep(self) -> int:
        """Drop expired sessions (the service runs this every minute, so an
        abandoned session's private key does not stay in memory)."""
        now = self._clock()
        with self._lock:
            doomed = [k for k, s in self._sessions.items() if self._expired(s, now)]
            for k in doomed:
                del self._sessions[k]
        return len(doomed)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
