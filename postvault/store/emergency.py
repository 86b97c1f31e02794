"""Emergency access, "break-glass" (issue 7 item 3; HIPAA 45 CFR
164.312(a)(2)(ii)): a named person gets time-limited, read-only access to
one account, using that account's recovery escrow.

Key handling (second look required on every change here):

- A grant needs the account's private key, so it needs the decrypted
  escrow (the recovery officer takes part, as for a password recovery);
  the escrow is checked against the account exactly as recovery does.
- The key is wrapped once more, under Argon2id of a random password
  (192 bits, shown once, never stored) with the owner bound in as
  ``key_owner + "/emergency/" + grant id``: the wrap opens for this grant
  only, and never as the account's own wrap.
- The IMAP user name is ``emergency-<grant id>`` (no "@", so it can never be
  an account's address). Only IMAP accepts it (``postvault.login``); SMTP
  and the web pages do not know it.
- The session it opens is ``read_only`` (the store refuses every change,
  ``ReadOnlyAccess``), carries the person as ``actor`` (every read is
  audited under their name) and ends at ``expires_at``: the IMAP server
  closes it then, and every content read (message bytes, summaries) checks
  the grant again, so a revoked grant reads nothing more. Folder listings
  and flags (what the server can read anyway) are not re-checked: a
  refusal there could leave an IMAP command without its answer.
- When a grant has expired or is revoked its wrap is erased (NULL), so
  the password opens nothing afterwards even with a copy of the database.
  Expired grants are erased lazily: at the next grant, list, revoke or
  emergency login (``_end_grants``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from ..errors import (
    AccessExpired,
    AuthenticationFailed,
    InvalidInput,
    ReadOnlyAccess,
    WrongSecret,
)
from . import audit, crypto, passwords
from .db import unit_of_work
from .escrow import EscrowDocument
from .models import Account, AuthFailure, EmergencyGrant
from .types import AccountInfo, AccountSession, KdfSettings, now

USERNAME_PREFIX = "emergency-"
_USERNAME = re.compile(r"emergency-([0-9a-f]{16})\Z")
MAX_HOURS_LIMIT = 720


@dataclass(frozen=True)
class EmergencyCredential:
    """What the person is given, once. ``password`` is a secret."""

    grant_id: str
    account: str
    person: str
    username: str
    password: str = field(repr=False)
    expires_at: datetime


@dataclass(frozen=True)
class GrantInfo:
    grant_id: str
    account: str
    person: str
    reason: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    first_used_at: datetime | None

    def state(self, at: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= at else "active"


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def is_emergency_username(name: str) -> bool:
    """Whether ``name`` is an emergency-access user name."""
    return _USERNAME.match(name.strip().lower()) is not None


def _grant_owner(key_owner: str, grant_id: str) -> bytes:
    return f"{key_owner}/emergency/{grant_id}".encode()


def _check_text(value: str, what: str, limit: int) -> str:
    value = " ".join(value.split())
    if not value or not value.isprintable() or len(value) > limit:
        raise InvalidInput(f"{what} must be 1-{limit} printable characters")
    return value


def _info(g: EmergencyGrant, account: str) -> GrantInfo:
    return GrantInfo(
        g.grant_id, account, g.person, g.reason, g.created_by, _aware(g.created_at), _aware(g.expires_at),
        _aware(g.revoked_at) if g.revoked_at else None, _aware(g.first_used_at) if g.first_used_at else None,
    )


class EmergencyStore:
    """The emergency-access half of ``Store``."""

    _sessions: sessionmaker[Session]
    kdf: KdfSettings
    _account: Callable[[Session, str], Account]
    _info: Callable[[Account], AccountInfo]
    _failure_key: Callable[[Session, str], str]
    _escrowed_key: Callable[[str, bytes], tuple[int, EscrowDocument]]

    @staticmethod
    def is_emergency_username(name: str) -> bool:
        return is_emergency_username(name)

    def _new_kdf(self) -> crypto.KdfParams:
        return crypto.KdfParams.for_password(self.kdf.memory_kib, self.kdf.iterations, self.kdf.lanes)

    @staticmethod
    def _end_grants(s: Session) -> None:
        """Erase the wraps of grants that have ended (see the module docstring)."""
        stamp = now()
        ended = s.scalars(select(EmergencyGrant).where(
            EmergencyGrant.wrapped_private_key.is_not(None),
            or_(EmergencyGrant.expires_at <= stamp, EmergencyGrant.revoked_at.is_not(None)),
        ))
        for g in ended:
            g.wrapped_private_key, g.kdf_params = None, None
            acct = s.get(Account, g.account_id)
            audit.record(s, "emergency.expired", actor="postvault", account=acct.email if acct else None,
                         detail=f"grant={g.grant_id}")

    def grant_emergency_access(
        self, email: str, escrow: bytes, *, person: str, reason: str, duration: timedelta,
        max_duration: timedelta = timedelta(hours=72), actor: str = "admin",
    ) -> EmergencyCredential:
        """Give ``person`` read-only access to ``email`` for ``duration``
        (at most ``max_duration``), with the account's decrypted escrow.
        Audited ``emergency.grant`` with the person and the reason."""
        person = _check_text(person, "the person's name", 200)
        reason = _check_text(reason, "the reason", 500)
        if duration <= timedelta(0) or duration > max_duration:
            hours = max_duration.total_seconds() / 3600
            raise InvalidInput(f"emergency access lasts more than 0 and at most {hours:g} hours")
        account_id, doc = self._escrowed_key(email, escrow)
        grant_id = secrets.token_hex(8)
        password = secrets.token_urlsafe(24)
        kdf = self._new_kdf()
        wrapped = crypto.wrap_private_key(
            doc.private_key, crypto.derive_wrapping_key(passwords.password_bytes(password), kdf),
            _grant_owner(doc.key_owner, grant_id))
        stamp = now()
        with unit_of_work(self._sessions) as s:
            self._end_grants(s)
            acct = s.get(Account, account_id)
            if acct is None or acct.public_key != doc.public_key or acct.state != "active":
                raise InvalidInput(f"{email} changed meanwhile; run the grant again")
            s.add(EmergencyGrant(
                grant_id=grant_id, account_id=account_id, person=person, reason=reason, created_by=actor,
                created_at=stamp, expires_at=stamp + duration, revoked_at=None, first_used_at=None,
                wrapped_private_key=wrapped, kdf_params=kdf.to_json(),
            ))
            audit.record(s, "emergency.grant", actor=actor, account=acct.email,
                         detail=f"grant={grant_id} person={person!r} until={(stamp + duration).isoformat()} "
                                f"reason={reason!r}")
            account = acct.email
        return EmergencyCredential(grant_id, account, person, USERNAME_PREFIX + grant_id, password, stamp + duration)

    def revoke_emergency_access(self, grant_id: str, *, actor: str = "admin") -> GrantInfo:
        """End a grant now; its wrap is erased. Audited ``emergency.revoke``."""
        with unit_of_work(self._sessions) as s:
            g = s.scalar(select(EmergencyGrant).where(EmergencyGrant.grant_id == grant_id.strip().lower()))
            if g is None:
                raise InvalidInput(f"no emergency access grant {grant_id!r} (see postvault emergency list)")
            acct = s.get(Account, g.account_id)
            assert acct is not None
            if g.revoked_at is None:
                g.revoked_at = now()
                g.wrapped_private_key, g.kdf_params = None, None
                audit.record(s, "emergency.revoke", actor=actor, account=acct.email, detail=f"grant={g.grant_id}")
            self._end_grants(s)
            return _info(g, acct.email)

    def emergency_grants(self) -> list[GrantInfo]:
        """Every grant, newest first (ended ones too: they are the record)."""
        with unit_of_work(self._sessions) as s:
            self._end_grants(s)
            rows = s.execute(
                select(EmergencyGrant, Account.email).join(Account, Account.id == EmergencyGrant.account_id)
                .order_by(EmergencyGrant.id.desc())
            ).all()
            return [_info(g, email) for g, email in rows]

    def emergency_login(
        self, username: str, password: str, *, client_ip: str | None = None, protocol: str | None = None
    ) -> AccountSession:
        """Open a read-only session with an emergency credential, or raise
        ``AuthenticationFailed`` (failure recorded and audited like any)."""
        match = _USERNAME.match(username.strip().lower())
        grant_id = match.group(1) if match else ""
        with unit_of_work(self._sessions) as s:
            self._end_grants(s)
        with self._sessions() as s:
            row = s.execute(
                select(EmergencyGrant, Account).join(Account, Account.id == EmergencyGrant.account_id)
                .where(EmergencyGrant.grant_id == grant_id)
            ).first()
        grant, acct = (row[0], row[1]) if row is not None else (None, None)
        why = "unknown"
        private: bytes | None = None
        if grant is not None and acct is not None:
            if grant.revoked_at is not None:
                why = "revoked"
            elif _aware(grant.expires_at) <= now() or grant.wrapped_private_key is None or grant.kdf_params is None:
                why = "expired"
            elif acct.state != "active":
                why = "account-" + acct.state
            else:
                kdf = crypto.KdfParams.from_json(grant.kdf_params)
                try:
                    private = crypto.unwrap_private_key(
                        grant.wrapped_private_key,
                        crypto.derive_wrapping_key(passwords.password_bytes(password), kdf),
                        _grant_owner(acct.key_owner, grant.grant_id))
                except WrongSecret:
                    why = "password"
        if private is None:
            if why != "password":
                # About the time a wrong password takes, so that the answer
                # does not tell a live grant from an ended or unknown one.
                crypto.derive_wrapping_key(b"-", self._new_kdf())
            with unit_of_work(self._sessions) as w:
                w.add(AuthFailure(account=self._failure_key(w, username), client_ip=client_ip or "", at=now()))
                audit.record(w, "emergency.refused", actor=grant.person if grant else "unknown-user",
                             account=acct.email if acct else None, client_ip=client_ip, protocol=protocol,
                             detail=f"grant={grant_id or '-'} why={why}")
            raise AuthenticationFailed("authentication failed")
        assert grant is not None and acct is not None
        if crypto.public_key_of(private) != acct.public_key:
            raise AccessExpired("the account's key pair changed since this emergency access was granted")
        with unit_of_work(self._sessions) as w:
            g = w.get(EmergencyGrant, grant.id)
            if g is not None and g.first_used_at is None:
                g.first_used_at = now()
            audit.record(w, "emergency.login", actor=grant.person, account=acct.email, client_ip=client_ip,
                         protocol=protocol, detail=f"grant={grant.grant_id}")
        return AccountSession(
            acct.id, acct.email, acct.role, acct.key_owner.encode(), acct.public_key, private,
            read_only=True, actor=grant.person, expires_at=_aware(grant.expires_at), grant_id=grant.grant_id,
        )

    def check_access(self, session: AccountSession, *, write: bool) -> None:
        """The store's guard for restricted sessions: ``ReadOnlyAccess`` on
        a change, ``AccessExpired`` once an emergency grant has ended (looked
        up again each time: a revocation from the CLI reaches a running
        server). A normal session passes without a database read."""
        if write and session.read_only:
            raise ReadOnlyAccess("This is read-only emergency access; nothing can be changed.")
        if session.grant_id is None:
            return
        if session.expires_at is not None and session.expires_at <= now():
            raise AccessExpired("Emergency access to this mailbox has ended.")
        with self._sessions() as s:
            g = s.scalar(select(EmergencyGrant).where(EmergencyGrant.grant_id == session.grant_id))
        if g is None or g.revoked_at is not None or _aware(g.expires_at) <= now():
            raise AccessExpired("Emergency access to this mailbox has ended.")
