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

import secrets
from zoneinfo import available_timezones

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ..errors import AccountExists, AuthenticationFailed, InvalidInput, NoSuchAccount
from . import audit, crypto, passwords
from .db import unit_of_work
from .models import Account, AddressBookEntry, Mailbox
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
        practice_name = practice_name.strip()
        if not practice_name or not practice_name.isprintable() or len(practice_name) > 200:
            raise InvalidInput("practice name must be 1-200 printable characters")
        if timezone_name not in available_timezones():
            raise InvalidInput(f"unknown time zone {timezone_name!r} (expected an IANA name like Europe/Paris)")
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

    def login(self, email: str, password: str, *, client_ip: str | None = None, protocol: str | None = None) -> AccountSession:
        """Check the password and unwrap the private key into a session.

        Unknown address and wrong password fail alike, in about the same time.
        """
        with self._sessions() as s:
            acct = s.scalar(select(Account).where(func.lower(Account.email) == email.strip().lower()))
        stored = acct.password_hash if acct is not None and acct.state == "active" else None
        # verify_password runs first, always: with "acct is None or ..." an
        # unknown address would skip bcrypt and answer ~250 ms sooner.
        if not passwords.verify_password(password, stored) or acct is None:
            with unit_of_work(self._sessions) as w:
                audit.record(
                    w, "login.failed", actor=email.strip()[:320], client_ip=client_ip, protocol=protocol,
                )
            raise AuthenticationFailed("authentication failed")
        kdf = crypto.KdfParams.from_json(acct.kdf_params)
        wrapping = crypto.derive_wrapping_key(passwords.password_bytes(password), kdf)
        private = crypto.unwrap_private_key(acct.wrapped_private_key, wrapping, acct.key_owner.encode())
        return AccountSession(acct.id, acct.email, acct.role, acct.key_owner.encode(), private)

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
