"""Accounts: creation with a key pair, password checks, login into an
``AccountSession``, password changes, invitations and sign-up, contacts and
the failed-login records behind the auth limits.

Key handling (second look required on every change here):
- A private key exists unwrapped only inside an ``AccountSession`` in memory.
- At rest it is wrapped under Argon2id(password) or, while an invited
  colleague has not signed up, under HKDF(256-bit invitation token). The
  token itself is never stored, only its SHA-256.
- A password change or sign-up re-wraps the private key; mail is untouched.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from zoneinfo import available_timezones

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from ..errors import AccountExists, AuthenticationFailed, IntegrityError, InvalidInput, NoSuchAccount
from . import audit, crypto, passwords, serverkeys
from .db import unit_of_work
from .models import Account, AddressBookEntry, AuthFailure, Invitation, Mailbox
from .types import (
    DEFAULT_MAILBOXES,
    AccountInfo,
    AccountSession,
    KdfSettings,
    Role,
    new_uidvalidity,
    normalize_email,
    now,
)


def _check_practice(name: str) -> str:
    name = name.strip()
    if not name or not name.isprintable() or len(name) > 200:
        raise InvalidInput("practice name must be 1-200 printable characters")
    return name


def _check_timezone(name: str) -> None:
    if name not in available_timezones():
        raise InvalidInput(f"unknown time zone {name!r} (expected an IANA name like Europe/Paris)")


def _aware(t: datetime) -> datetime:
    # SQLite hands back naive datetimes even for timezone-aware columns; all
    # we store is UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


class AccountStore:
    """The account half of ``Store``."""

    _sessions: sessionmaker[Session]
    kdf: KdfSettings

    def create_account(
        self,
        email: str,
        role: Role,
        practice_name: str,
        password: str,
        timezone_name: str = "UTC",
        *,
        invited_by: str | None = None,
        actor: str = "admin",
    ) -> AccountInfo:
        """A signed-up account with its key pair and default mailboxes; a
        colleague ``invited_by`` a member lands in that member's address book
        in the same transaction."""
        email = normalize_email(email)
        if role not in ("member", "colleague"):
            raise InvalidInput(f"role must be member or colleague, not {role!r}")
        practice_name = _check_practice(practice_name)
        _check_timezone(timezone_name)
        key_owner = secrets.token_hex(16)
        pair = crypto.generate_keypair()
        kdf = crypto.KdfParams.for_password(self.kdf.memory_kib, self.kdf.iterations, self.kdf.lanes)
        wrapping = crypto.derive_wrapping_key(passwords.password_bytes(password), kdf)
        wrapped = crypto.wrap_private_key(pair.private, wrapping, key_owner.encode())
        pw_hash = passwords.hash_password(password)
        stamp = now()
        with unit_of_work(self._sessions) as s:
            if s.scalar(select(Account.id).where(func.lower(Account.email) == email.lower())) is not None:
                raise AccountExists(f"an account for {email} already exists")
            acct = Account(
                key_owner=key_owner,
                email=email,
                role=role,
                state="active",
                practice_name=practice_name,
                timezone=timezone_name,
                mailbox_name=practice_name,
                notify_enabled=True,
                notify_email=None,
                password_hash=pw_hash,
                public_key=pair.public,
                wrapped_private_key=wrapped,
                kdf_params=kdf.to_json(),
                created_at=stamp,
                updated_at=stamp,
            )
            s.add(acct)
            s.flush()
            self._create_default_mailboxes(s, acct.id)
            if invited_by is not None:
                self._upsert_contact(s, self._account(s, invited_by), email, "", practice_name, acct)
            audit.record(s, "account.create", actor=actor, account=email, detail=f"role={role}")
            return self._info(acct)

    def _create_default_mailboxes(self, s: Session, account_id: int) -> None:
        validity = new_uidvalidity()
        for name, special in DEFAULT_MAILBOXES:
            s.add(
                Mailbox(
                    account_id=account_id,
                    name=name,
                    special_use=special,
                    uidvalidity=validity,
                    uidnext=1,
                    highestmodseq=1,
                    subscribed=True,
                    created_at=now(),
                )
            )

    @staticmethod
    def _info(a: Account) -> AccountInfo:
        return AccountInfo(a.id, a.email, a.role, a.state, a.practice_name, a.timezone, a.mailbox_name)

    def _account(self, s: Session, email: str) -> Account:
        acct = s.scalar(select(Account).where(func.lower(Account.email) == email.strip().lower()))
        if acct is None:
            raise NoSuchAccount(f"no account for {email.strip()}")
        return acct

    def get_account(self, email: str) -> AccountInfo:
        with self._sessions() as s:
            return self._info(self._account(s, email))

    def accounts(self, emails: Iterable[str]) -> dict[str, AccountInfo]:
        """The accounts among ``emails``, keyed by lower-cased address."""
        wanted = {e.strip().lower() for e in emails}
        with self._sessions() as s:
            rows = s.scalars(select(Account).where(func.lower(Account.email).in_(wanted))) if wanted else []
            return {a.email.lower(): self._info(a) for a in rows}

    def add_contact(self, member_email: str, colleague_email: str, name: str = "", practice: str = "") -> None:
        """Put a colleague in a member's address book (idempotent)."""
        colleague_email = normalize_email(colleague_email)
        with unit_of_work(self._sessions) as s:
            colleague = s.scalar(select(Account).where(func.lower(Account.email) == colleague_email.lower()))
            self._upsert_contact(s, self._account(s, member_email), colleague_email, name, practice, colleague)

    @staticmethod
    def _upsert_contact(
        s: Session, member: Account, email: str, name: str, practice: str, colleague: Account | None
    ) -> None:
        if member.role != "member":
            raise InvalidInput(f"{member.email} is not a member; only members have an address book")
        stamp = now()
        entry = s.scalar(
            select(AddressBookEntry).where(
                AddressBookEntry.member_id == member.id, func.lower(AddressBookEntry.email) == email.lower()
            )
        )
        if entry is None:
            entry = AddressBookEntry(member_id=member.id, email=email, extra="{}", created_at=stamp, name="", practice="")
            s.add(entry)
        entry.name = name or entry.name
        entry.practice = practice or entry.practice
        entry.colleague_id = colleague.id if colleague is not None else None
        entry.updated_at = stamp

    def contacts(self, email: str) -> list[str]:
        """A member's address book, or the members who invited a colleague."""
        with self._sessions() as s:
            acct = self._account(s, email)
            if acct.role == "member":
                rows = s.scalars(select(AddressBookEntry.email).where(AddressBookEntry.member_id == acct.id))
            else:
                rows = s.scalars(
                    select(Account.email)
                    .join(AddressBookEntry, AddressBookEntry.member_id == Account.id)
                    .where(AddressBookEntry.colleague_id == acct.id)
                )
            return sorted(rows)

    def _check_password(
        self, email: str, password: str, client_ip: str | None, protocol: str | None
    ) -> Account:
        """The account if ``password`` is right; records and audits a failure.

        Unknown address and wrong password fail alike, in about the same time.
        """
        with self._sessions() as s:
            acct = s.scalar(select(Account).where(func.lower(Account.email) == email.strip().lower()))
        stored = acct.password_hash if acct is not None and acct.state == "active" else None
        # verify_password runs first, always: with "acct is None or ..." an
        # unknown address would skip bcrypt and answer ~250 ms sooner.
        if not passwords.verify_password(password, stored) or acct is None:
            # A failure counts against the name as typed, whether or not an
            # account has it, so that throttling and lockout look the same
            # for both (no enumeration). The name is kept only as a keyed
            # hash, and the audit log names only real accounts: a password
            # typed into the user-name field must not be kept readable.
            known = acct.email if acct is not None else None
            with unit_of_work(self._sessions) as w:
                w.add(AuthFailure(account=self._failure_key(w, email), client_ip=client_ip or "", at=now()))
                audit.record(
                    w, "login.failed", actor=known or "unknown-user", account=known,
                    client_ip=client_ip, protocol=protocol,
                )
            raise AuthenticationFailed("authentication failed")
        return acct

    @staticmethod
    def _failure_key(s: Session, name: str) -> str:
        typed = passwords.password_bytes(name.strip().lower())
        return serverkeys.keyed_hash(serverkeys.server_key(s, serverkeys.AUTH_FAILURES), typed).hex()

    def verify_password(
        self, email: str, password: str, *, client_ip: str | None = None, protocol: str | None = None
    ) -> AccountInfo:
        """Password check only (bcrypt): what SMTP AUTH needs, since delivery
        needs no private key. Raises ``AuthenticationFailed``."""
        acct = self._check_password(email, password, client_ip, protocol)
        self._login_succeeded(acct, client_ip, protocol)
        return self._info(acct)

    def login(
        self, email: str, password: str, *, client_ip: str | None = None, protocol: str | None = None
    ) -> AccountSession:
        """Check the password and unwrap the private key into a session."""
        acct = self._check_password(email, password, client_ip, protocol)
        kdf = crypto.KdfParams.from_json(acct.kdf_params)
        wrapping = crypto.derive_wrapping_key(passwords.password_bytes(password), kdf)
        private = crypto.unwrap_private_key(acct.wrapped_private_key, wrapping, acct.key_owner.encode())
        public = crypto.public_key_of(private)
        if public != acct.public_key:
            # Someone with write access to the database swapped the public
            # key: new mail would be wrapped to a key they hold.
            raise IntegrityError("the account's stored public key does not match its private key")
        self._login_succeeded(acct, client_ip, protocol)
        return AccountSession(acct.id, acct.email, acct.role, acct.key_owner.encode(), public, private)

    def _login_succeeded(self, acct: Account, client_ip: str | None, protocol: str | None) -> None:
        with unit_of_work(self._sessions) as w:
            # A success resets the account's throttle (not a lockout: a
            # locked account is refused before its password is checked).
            w.execute(delete(AuthFailure).where(AuthFailure.account == self._failure_key(w, acct.email)))
            audit.record(w, "login.ok", actor=acct.email, account=acct.email, client_ip=client_ip, protocol=protocol)

    def recent_auth_failures(
        self, email: str, client_ip: str | None, since: datetime
    ) -> tuple[list[datetime], list[datetime]]:
        """Failure times since ``since``: (for this account, from this address)."""
        with unit_of_work(self._sessions) as s:
            by_account = list(
                s.scalars(
                    select(AuthFailure.at).where(
                        AuthFailure.account == self._failure_key(s, email), AuthFailure.at >= since
                    )
                )
            )
            by_ip = list(
                s.scalars(select(AuthFailure.at).where(AuthFailure.client_ip == (client_ip or ""), AuthFailure.at >= since))
            ) if client_ip else []
        return [_aware(t) for t in by_account], [_aware(t) for t in by_ip]

    def invite(
        self,
        member_email: str,
        colleague_email: str,
        *,
        ttl: timedelta = timedelta(days=14),
        actor: str = "admin",
    ) -> str | None:
        """Invite a colleague: a pending account with its key pair, wrapped
        under a key derived from a fresh 256-bit token, which is returned (to
        put in the sign-up link) and stored only as a SHA-256 hash.

        Mail sent to the colleague before sign-up is sealed to that key pair
        and becomes readable once ``sign_up`` re-wraps it under a password.
        An already signed-up colleague is only added to the member's address
        book; the result is then None.
        """
        colleague_email = normalize_email(colleague_email)
        token = secrets.token_bytes(32)
        with unit_of_work(self._sessions) as s:
            member = self._account(s, member_email)
            existing = s.scalar(select(Account).where(func.lower(Account.email) == colleague_email.lower()))
            if existing is not None and existing.state == "active":
                self._upsert_contact(s, member, existing.email, "", "", existing)
                return None
            if existing is not None:
                # Re-wrapping a pending key pair under a new token needs the
                # old token or the inviting member's session; that arrives
                # with the sign-up pages.
                raise InvalidInput(f"{colleague_email} has already been invited and has not signed up yet")
            pair = crypto.generate_keypair()
            key_owner = secrets.token_hex(16)
            kdf = crypto.KdfParams.for_token()
            wrapped = crypto.wrap_private_key(
                pair.private, crypto.derive_wrapping_key(token, kdf), key_owner.encode()
            )
            stamp = now()
            acct = Account(
                key_owner=key_owner, email=colleague_email, role="colleague", state="pending",
                practice_name="(invited)", timezone="UTC", mailbox_name=colleague_email, notify_enabled=True,
                notify_email=None, password_hash=None, public_key=pair.public, wrapped_private_key=wrapped,
                kdf_params=kdf.to_json(), created_at=stamp, updated_at=stamp,
            )
            s.add(acct)
            s.flush()
            self._create_default_mailboxes(s, acct.id)
            self._upsert_contact(s, member, colleague_email, "", "", acct)
            s.add(
                Invitation(
                    colleague_id=acct.id, member_id=member.id, token_hash=hashlib.sha256(token).digest(),
                    state="pending", expires_at=stamp + ttl, created_at=stamp,
                )
            )
            audit.record(s, "invitation.create", actor=actor, account=colleague_email, detail=f"member={member.email}")
        return base64.urlsafe_b64encode(token).decode().rstrip("=")

    def sign_up(self, token: str, practice_name: str, timezone_name: str, password: str) -> AccountInfo:
        """Complete an invitation: the private key moves from the token's
        wrap to the password's; waiting mail is untouched and now readable."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raw = b""
        if len(raw) != 32:
            raise InvalidInput("this sign-up link is not valid")
        practice_name = _check_practice(practice_name)
        _check_timezone(timezone_name)
        with unit_of_work(self._sessions) as s:
            inv = s.scalar(select(Invitation).where(Invitation.token_hash == hashlib.sha256(raw).digest()))
            if inv is None or inv.state != "pending":
                raise InvalidInput("this sign-up link has already been used or was replaced by a newer one")
            if _aware(inv.expires_at) <= now():
                raise InvalidInput("this sign-up link has expired; ask the office that invited you for a new one")
            acct = s.get(Account, inv.colleague_id)
            assert acct is not None
            private = crypto.unwrap_private_key(
                acct.wrapped_private_key,
                crypto.derive_wrapping_key(raw, crypto.KdfParams.from_json(acct.kdf_params)),
                acct.key_owner.encode(),
            )
            kdf = crypto.KdfParams.for_password(self.kdf.memory_kib, self.kdf.iterations, self.kdf.lanes)
            acct.wrapped_private_key = crypto.wrap_private_key(
                private, crypto.derive_wrapping_key(passwords.password_bytes(password), kdf), acct.key_owner.encode()
            )
            acct.kdf_params = kdf.to_json()
            acct.password_hash = passwords.hash_password(password)
            acct.state = "active"
            acct.practice_name = acct.mailbox_name = practice_name
            acct.timezone = timezone_name
            acct.updated_at = now()
            inv.state, inv.used_at = "used", now()
            audit.record(s, "signup", actor=acct.email, account=acct.email)
            return self._info(acct)

    def change_password(self, email: str, old_password: str, new_password: str) -> None:
        """Re-wrap the private key under the new password; mail is not touched."""
        session = self.login(email, old_password)
        kdf = crypto.KdfParams.for_password(self.kdf.memory_kib, self.kdf.iterations, self.kdf.lanes)
        wrapped = crypto.wrap_private_key(
            session.private_key, crypto.derive_wrapping_key(passwords.password_bytes(new_password), kdf), session.key_owner
        )
        pw_hash = passwords.hash_password(new_password)
        with unit_of_work(self._sessions) as s:
            acct = s.get(Account, session.account_id)
            assert acct is not None
            acct.wrapped_private_key = wrapped
            acct.kdf_params = kdf.to_json()
            acct.password_hash = pw_hash
            acct.updated_at = now()
            audit.record(s, "password.change", actor=acct.email, account=acct.email)
