"""Accounts: creation with a key pair, password checks, login into an
``AccountSession``, password changes, invitations and sign-up, notification
preferences and the failed-login records behind the auth limits. Address
books are in ``contacts``.

Key handling (second look required on every change here):
- A private key exists unwrapped only inside an ``AccountSession`` in memory
  (and, for a re-invitation, for the length of one transaction).
- At rest it is wrapped under Argon2id(password) or, while an invited
  colleague has not signed up, under HKDF(256-bit invitation token) plus an
  escrow to each inviting member's public key (see "invitations" below).
  The token itself is never stored, only its SHA-256.
- A password change or sign-up re-wraps the private key; mail is untouched.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import secrets
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal, cast
from zoneinfo import available_timezones

from sqlalchemy import Connection, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..errors import AccountExists, AuthenticationFailed, IntegrityError, InvalidInput, NoSuchAccount
from . import audit, crypto, passwords, serverkeys
from .contacts import ContactsStore
from .db import WRITE_OPTION, unit_of_work
from .fastread import FastSelect, FastWrite
from .models import Account, AuthFailure, Invitation, InvitationEscrow, Mailbox, MessageCopy, NotificationPrefs
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

DEFAULT_INVITATION_TTL = timedelta(days=14)
# Argon2id for logins runs here, beside the caller's bcrypt (see login).
# Bounded: each derivation holds its memory cost (64 MiB by default) while
# it runs, so at most this many run at once and the rest queue.
KDF_THREADS = 4
_KDF_POOL = ThreadPoolExecutor(max_workers=KDF_THREADS, thread_name_prefix="postvault-kdf")
# Purpose label of the escrow wrap's "message id" slot (see invitations).
_ESCROW_PURPOSE = b"postvault/v1/invitation-escrow/"

NotifyMode = Literal["every", "batched", "off"]
NotifyVerdict = Literal["send", "hold", "skip"]
NOTIFY_MODES: tuple[NotifyMode, ...] = ("every", "batched", "off")
DEFAULT_INTERVAL_MINUTES = 30
MIN_INTERVAL_MINUTES = 1
MAX_INTERVAL_MINUTES = 7 * 24 * 60


class InvitationNeedsKey(InvalidInput):
    """A pending colleague's link can't be renewed without the key that
    protects its waiting mail (the member's password), or without giving
    that mail up."""


@dataclass(frozen=True)
class InvitationResult:
    """What ``invite_colleague`` did. ``token`` is set only when a new
    sign-up link was made; it is a secret (kept out of repr)."""

    status: Literal["invited", "reinvited", "already_active", "already_pending"]
    colleague: str
    member: str
    member_practice: str
    token: str | None = field(default=None, repr=False)
    expires_at: datetime | None = None
    waiting: int = 0  # messages waiting for the colleague (carried over)
    discarded: int = 0  # waiting messages deleted with the old key pair


@dataclass(frozen=True)
class InvitationStatus:
    colleague: str
    state: str  # pending | active | disabled
    link_expires_at: datetime | None  # the live link, if any
    waiting: int
    escrow_members: tuple[str, ...]  # members who can renew the link with their password


@dataclass(frozen=True)
class NotificationSettings:
    address: str  # where notifications go
    custom_address: bool  # False: the account's own address
    mode: NotifyMode
    interval_minutes: int


@dataclass(frozen=True)
class NotifyState:
    """What the notification schedule decides on (all server-readable)."""

    account_state: str
    mode: NotifyMode
    interval: timedelta
    last_sent_at: datetime | None
    held_since: datetime | None
    unread: int  # INBOX messages without \Seen (-1: not counted, see claim_notifications_in)


@dataclass(frozen=True)
class NotifyTarget:
    account: str
    address: str
    role: str


class _Unset:
    """Marker: an argument that was not given (None means "clear it")."""


UNSET = _Unset()


def _escrow_id(colleague: Account) -> bytes:
    return _ESCROW_PURPOSE + colleague.key_owner.encode()


def _decode_token(token: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise InvalidInput("this sign-up link is not valid; check that it was copied whole")
    return raw


def _settings(acct: Account, prefs: NotificationPrefs | None) -> NotificationSettings:
    mode: NotifyMode = "off" if not acct.notify_enabled else (prefs.mode if prefs else "every")  # type: ignore[assignment]
    return NotificationSettings(
        acct.notify_email or acct.email, acct.notify_email is not None, mode,
        prefs.interval_minutes if prefs else DEFAULT_INTERVAL_MINUTES,
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


class AccountStore(ContactsStore):
    """The account half of ``Store``."""

    _sessions: sessionmaker[Session]
    kdf: KdfSettings
    # From MailStore (Store mixes both): waiting mail dropped with a
    # discarded key pair goes the way expunged mail goes.
    _drop_orphans: Callable[[Session, set[int]], list[str]]
    _discard_blob: Callable[[str], None]
    # From RecoveryStore: the recovery escrow, wherever the private key is
    # in memory (see store/recovery.py).
    _ensure_escrow: Callable[[int, str, str, bytes, bytes], bool]

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
            info = self._info(acct)
        self._ensure_escrow(info.id, info.email, key_owner, pair.public, pair.private)
        return info

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
        if not wanted:
            return {}
        # Core, not the ORM: the SMTP server asks for every recipient.
        # On SQLite on the sqlite3 connection itself (fastread.py).
        rows = _ACCOUNT_INFO.run(self.engine, {"emails": sorted(wanted)})  # type: ignore[attr-defined]
        return {r.email.lower(): AccountInfo(*r) for r in rows}

    def _find_account(self, email: str) -> Account | None:
        with self._sessions() as s:
            return s.scalar(select(Account).where(func.lower(Account.email) == email.strip().lower()))

    def _check_password(
        self, email: str, password: str, client_ip: str | None, protocol: str | None, acct: Account | None
    ) -> Account:
        """``acct`` (the account found for ``email``) if ``password`` is
        right; records and audits a failure.

        Unknown address and wrong password fail alike, in about the same time.
        """
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
        acct = self._check_password(email, password, client_ip, protocol, self._find_account(email))
        self._login_succeeded(acct, client_ip, protocol)
        return self._info(acct)

    def login(
        self, email: str, password: str, *, client_ip: str | None = None, protocol: str | None = None
    ) -> AccountSession:
        """Check the password and unwrap the private key into a session.

        bcrypt and Argon2id run at the same time, Argon2id on a thread of
        ``_KDF_POOL``: both release the GIL (cryptography >= 50 for
        Argon2id), so a cold login costs the slower of the two, not their
        sum. The derived key is used only after bcrypt said yes. A failure
        waits for the derivation too, and an address with no active account
        derives from a dummy salt with the current cost, so a failure takes
        as long whether or not the account exists.
        """
        found = self._find_account(email)
        if found is not None and found.state == "active":
            kdf = crypto.KdfParams.from_json(found.kdf_params)
        else:
            kdf = crypto.KdfParams.for_password(self.kdf.memory_kib, self.kdf.iterations, self.kdf.lanes)
        derivation = _KDF_POOL.submit(crypto.derive_wrapping_key, passwords.password_bytes(password), kdf)
        try:
            acct = self._check_password(email, password, client_ip, protocol, found)
        except BaseException:
            wait([derivation])
            raise
        wrapping = derivation.result()
        private = crypto.unwrap_private_key(acct.wrapped_private_key, wrapping, acct.key_owner.encode())
        public = crypto.public_key_of(private)
        if public != acct.public_key:
            # Someone with write access to the database swapped the public
            # key: new mail would be wrapped to a key they hold.
            raise IntegrityError("the account's stored public key does not match its private key")
        self._login_succeeded(acct, client_ip, protocol)
        self._ensure_escrow(acct.id, acct.email, acct.key_owner, public, private)
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

    # -- invitations ------------------------------------------------------
    #
    # Key handling (second look required). A pending colleague has an
    # X25519 key pair from the moment of its first invitation, so members
    # can write to it at once: delivery wraps each message's content key to
    # the public key, no secret needed. The private key is kept in two
    # kinds of wraps, and nowhere else:
    #
    # 1. Under HKDF(token) on the account row (``wrapped_private_key``),
    #    for exactly one live sign-up link at a time. The 256-bit token is
    #    only in the email (or printed by --print-link) and, as its SHA-256,
    #    in ``invitations``. Re-inviting OVERWRITES this wrap with one under
    #    the new token and marks the older invitations "revoked": an old
    #    link then fails twice over (its row says revoked, and nothing is
    #    wrapped under its token any more), even for someone who kept a
    #    copy of the link.
    # 2. An escrow per inviting member (``invitation_escrow``): the private
    #    key wrapped to that MEMBER's public key with the same ECIES
    #    construction as content keys (X25519 + HKDF-SHA256 + AES-256-GCM),
    #    bound to the member (its key_owner as owner) and to the colleague
    #    (an id under a purpose label no message id can take: message ids
    #    are 32 hex digits). Only that member's private key opens it, i.e.
    #    the member's password (CLI --member-password-stdin) or a logged-in
    #    session (web). That is what lets the member issue a new link
    #    without the old token: a new token cannot be made from nothing,
    #    since the mail already waiting is sealed to the existing key pair.
    #
    # What the escrow exposes: whoever holds the member's password (and the
    # database) can read what waits for the pending colleague, including
    # mail from OTHER members who wrote to it before sign-up. We accept that
    # for the window before sign-up: the inviting office vouches for the
    # colleague's address in the first place, and the alternative is losing
    # that mail on every expired link. The escrow is deleted at sign-up,
    # when the key moves under the colleague's own password; it is never
    # made after sign-up. A disk copy alone (no password, no live link) still
    # reveals nothing. Without an escrow (a member who did not make the key
    # pair) or without the member's password, a new link is only possible
    # with a NEW key pair, and the waiting mail, sealed to the old one, is
    # deleted: refused unless the caller says --discard-waiting-mail.

    def invite(
        self,
        member_email: str,
        colleague_email: str,
        *,
        ttl: timedelta = DEFAULT_INVITATION_TTL,
        actor: str = "admin",
    ) -> str | None:
        """Invite a colleague; the sign-up token, or None when no new link
        was made (the colleague is active, or already holds a live link).
        See ``invite_colleague``."""
        return self.invite_colleague(member_email, colleague_email, ttl=ttl, actor=actor).token

    def invite_colleague(
        self,
        member_email: str,
        colleague_email: str,
        *,
        ttl: timedelta = DEFAULT_INVITATION_TTL,
        actor: str = "admin",
        member_session: AccountSession | None = None,
        discard_waiting_mail: bool = False,
    ) -> InvitationResult:
        """Invite a colleague into a member's address book.

        - No account yet: a pending account with its key pair, a sign-up
          token (returned; stored only as SHA-256) and an escrow of the key
          for this member. Status "invited".
        - Active account: only the address-book entry. "already_active".
        - Pending account, and ``member_session`` of a member holding an
          escrow: a new token, the key carried over, older links revoked.
          "reinvited".
        - Pending, ``discard_waiting_mail``: a new key pair and token; the
          mail waiting for the colleague is deleted (it is sealed to the old
          key). "reinvited" with ``discarded`` > 0 if there was any.
        - Pending with a live link otherwise: only the address-book entry
          (so a second member shows up in the colleague's contacts).
          "already_pending".
        - Pending without a live link otherwise: ``InvitationNeedsKey``.
        """
        colleague_email = normalize_email(colleague_email)
        doomed_blobs: list[str] = []
        try:
            with unit_of_work(self._sessions) as s:
                return self._invite(
                    s, member_email, colleague_email, ttl, actor, member_session, discard_waiting_mail, doomed_blobs
                )
        finally:
            # After the commit (or rollback): a blob goes only if no row
            # points at it any more.
            for blob_id in doomed_blobs:
                self._discard_blob(blob_id)

    def _invite(
        self,
        s: Session,
        member_email: str,
        colleague_email: str,
        ttl: timedelta,
        actor: str,
        member_session: AccountSession | None,
        discard: bool,
        doomed_blobs: list[str],
    ) -> InvitationResult:
        member = self._account(s, member_email)
        if member.role != "member" or member.state != "active":
            raise InvalidInput(f"{member.email} is not an active member; only members invite colleagues")
        if member_session is not None and member_session.account_id != member.id:
            raise InvalidInput("the session given is not the inviting member's")
        acct = s.scalar(select(Account).where(func.lower(Account.email) == colleague_email.lower()))
        result = functools.partial(InvitationResult, colleague=colleague_email, member=member.email,
                                   member_practice=member.practice_name)
        if acct is not None and acct.id == member.id:
            raise InvalidInput("a member cannot invite itself")
        if acct is not None and acct.state != "pending":
            if acct.state != "active":
                raise InvalidInput(f"the account of {acct.email} is disabled; ask the administrator")
            self._upsert_contact(s, member, acct.email, "", "", acct)
            return result(status="already_active", colleague=acct.email)
        if acct is None:
            pair = crypto.generate_keypair()
            stamp = now()
            acct = Account(
                key_owner=secrets.token_hex(16), email=colleague_email, role="colleague", state="pending",
                practice_name="(invited)", timezone="UTC", mailbox_name=colleague_email, notify_enabled=True,
                notify_email=None, password_hash=None, public_key=pair.public, wrapped_private_key=b"",
                kdf_params="", created_at=stamp, updated_at=stamp,
            )
            s.add(acct)
            s.flush()
            self._create_default_mailboxes(s, acct.id)
            self._upsert_contact(s, member, colleague_email, "", "", acct)
            self._escrow(s, acct, member, pair.private)
            token, expires = self._new_link(s, acct, member, pair.private, ttl)
            audit.record(s, "invitation.create", actor=actor, account=acct.email, detail=f"member={member.email}")
            return result(status="invited", token=token, expires_at=expires)

        self._upsert_contact(s, member, acct.email, "", "", acct)
        waiting = self._waiting_messages(s, acct)
        escrow = s.scalar(
            select(InvitationEscrow).where(InvitationEscrow.colleague_id == acct.id, InvitationEscrow.member_id == member.id)
        )
        if member_session is not None and escrow is not None:
            private = crypto.unwrap_content_key(
                escrow.wrapped_key, member_session.private_key, member_session.key_owner, _escrow_id(acct)
            )
            if crypto.public_key_of(private) != acct.public_key:
                # The escrow must open to THE key pair mail is sealed to; if
                # not, someone rewrote a row, and a new link would hand out
                # the wrong key.
                raise IntegrityError("the escrowed key does not match the pending account's public key")
            token, expires = self._new_link(s, acct, member, private, ttl)
            audit.record(s, "invitation.reissue", actor=actor, account=acct.email,
                         detail=f"member={member.email} carried_over={len(waiting)}")
            return result(status="reinvited", token=token, expires_at=expires, waiting=len(waiting))
        if discard:
            pair = crypto.generate_keypair()
            # Every escrow holds the old private key: useless now, and it
            # must not outlive the mail it could open.
            s.execute(delete(InvitationEscrow).where(InvitationEscrow.colleague_id == acct.id))
            acct.public_key = pair.public
            for copy in waiting:
                s.delete(copy)
            s.flush()
            doomed_blobs += self._drop_orphans(s, {c.message_id for c in waiting})
            self._escrow(s, acct, member, pair.private)
            token, expires = self._new_link(s, acct, member, pair.private, ttl)
            audit.record(s, "invitation.reissue", actor=actor, account=acct.email,
                         detail=f"member={member.email} discarded={len(waiting)}")
            return result(status="reinvited", token=token, expires_at=expires, discarded=len(waiting))
        live = self._live_invitation(s, acct)
        if live is not None:
            return result(status="already_pending", expires_at=_aware(live.expires_at), waiting=len(waiting))
        how = (
            "run the invitation again with the member's password (--member-password-stdin) to carry it over"
            if escrow is not None
            else "only a member who invited them before can carry it over, with their password"
        )
        raise InvitationNeedsKey(
            f"{acct.email} was invited but never signed up, and the link is no longer valid. "
            f"A new link needs the key that protects the {len(waiting)} message(s) waiting for them: {how}; "
            "or start over with --discard-waiting-mail (the waiting mail is deleted; senders keep it in Sent)"
        )

    @staticmethod
    def _escrow(s: Session, colleague: Account, member: Account, private: bytes) -> None:
        """Wrap the pending private key to the member's public key (see above)."""
        wrapped = crypto.wrap_content_key(private, member.public_key, member.key_owner.encode(), _escrow_id(colleague))
        row = s.scalar(
            select(InvitationEscrow).where(
                InvitationEscrow.colleague_id == colleague.id, InvitationEscrow.member_id == member.id
            )
        )
        if row is None:
            s.add(InvitationEscrow(colleague_id=colleague.id, member_id=member.id, wrapped_key=wrapped, created_at=now()))
        else:
            row.wrapped_key, row.created_at = wrapped, now()

    @staticmethod
    def _new_link(s: Session, acct: Account, member: Account, private: bytes, ttl: timedelta) -> tuple[str, datetime]:
        """A fresh token: the one live wrap on the account, older links revoked."""
        token = secrets.token_bytes(32)
        kdf = crypto.KdfParams.for_token()
        acct.wrapped_private_key = crypto.wrap_private_key(
            private, crypto.derive_wrapping_key(token, kdf), acct.key_owner.encode()
        )
        acct.kdf_params = kdf.to_json()
        stamp = now()
        acct.updated_at = stamp
        s.execute(
            update(Invitation)
            .where(Invitation.colleague_id == acct.id, Invitation.state == "pending")
            .values(state="revoked")
        )
        s.add(
            Invitation(
                colleague_id=acct.id, member_id=member.id, token_hash=hashlib.sha256(token).digest(),
                state="pending", expires_at=stamp + ttl, created_at=stamp,
            )
        )
        return base64.urlsafe_b64encode(token).decode().rstrip("="), stamp + ttl

    @staticmethod
    def _live_invitation(s: Session, acct: Account) -> Invitation | None:
        rows = s.scalars(
            select(Invitation).where(Invitation.colleague_id == acct.id, Invitation.state == "pending")
        )
        live = [i for i in rows if _aware(i.expires_at) > now()]
        return max(live, key=lambda i: _aware(i.expires_at), default=None)

    @staticmethod
    def _waiting_messages(s: Session, acct: Account) -> list[MessageCopy]:
        return list(
            s.scalars(
                select(MessageCopy).join(Mailbox, Mailbox.id == MessageCopy.mailbox_id).where(Mailbox.account_id == acct.id)
            )
        )

    def invitation_status(self, colleague_email: str) -> InvitationStatus:
        """Where a colleague's invitation stands, for pages and the CLI."""
        with self._sessions() as s:
            acct = self._account(s, colleague_email)
            live = self._live_invitation(s, acct) if acct.state == "pending" else None
            inviters = s.scalars(
                select(Account.email).join(InvitationEscrow, InvitationEscrow.member_id == Account.id)
                .where(InvitationEscrow.colleague_id == acct.id)
            )
            return InvitationStatus(
                acct.email, acct.state, _aware(live.expires_at) if live is not None else None,
                len(self._waiting_messages(s, acct)), tuple(sorted(inviters)),
            )

    def sign_up(self, token: str, practice_name: str, timezone_name: str, password: str) -> AccountInfo:
        """Complete an invitation: the private key moves from the token's
        wrap to the password's; waiting mail is untouched and now readable.
        The escrows go: from now on only the colleague's password opens
        the key."""
        raw = _decode_token(token)
        practice_name = _check_practice(practice_name)
        _check_timezone(timezone_name)
        with unit_of_work(self._sessions) as s:
            inv = s.scalar(select(Invitation).where(Invitation.token_hash == hashlib.sha256(raw).digest()))
            if inv is None:
                raise InvalidInput("this sign-up link is not valid; check that it was copied whole")
            if inv.state == "used":
                raise InvalidInput("this sign-up link has already been used; sign in with your password instead")
            if inv.state != "pending":
                raise InvalidInput(
                    "this sign-up link was replaced by a newer invitation; use the link in the most recent email"
                )
            if _aware(inv.expires_at) <= now():
                raise InvalidInput("this sign-up link has expired; ask the office that invited you for a new one")
            acct = s.get(Account, inv.colleague_id)
            assert acct is not None
            if acct.state != "pending":
                raise InvalidInput("this sign-up link has already been used; sign in with your password instead")
            private = crypto.unwrap_private_key(
                acct.wrapped_private_key,
                crypto.derive_wrapping_key(raw, crypto.KdfParams.from_json(acct.kdf_params)),
                acct.key_owner.encode(),
            )
            if crypto.public_key_of(private) != acct.public_key:
                raise IntegrityError("the account's stored public key does not match its private key")
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
            s.execute(delete(InvitationEscrow).where(InvitationEscrow.colleague_id == acct.id))
            s.execute(
                update(Invitation)
                .where(Invitation.colleague_id == acct.id, Invitation.state == "pending")
                .values(state="revoked")
            )
            audit.record(s, "signup", actor=acct.email, account=acct.email)
            info, key_owner, public = self._info(acct), acct.key_owner, acct.public_key
        self._ensure_escrow(info.id, info.email, key_owner, public, private)
        return info

    # -- notification preferences -----------------------------------------

    def notification_settings(self, email: str) -> NotificationSettings:
        """Where and how often an account hears about new mail."""
        with self._sessions() as s:
            acct = self._account(s, email)
            prefs = s.get(NotificationPrefs, acct.id)
            return _settings(acct, prefs)

    def set_notification_settings(
        self,
        email: str,
        *,
        mode: NotifyMode | None = None,
        interval_minutes: int | None = None,
        address: str | None | _Unset = UNSET,
        actor: str | None = None,
    ) -> NotificationSettings:
        """Change what is given: ``mode`` (every | batched | off),
        ``interval_minutes`` (for batched), ``address`` (None: the account's
        own address)."""
        if mode is not None and mode not in NOTIFY_MODES:
            raise InvalidInput(f"notification mode must be one of {', '.join(NOTIFY_MODES)}")
        if interval_minutes is not None and not MIN_INTERVAL_MINUTES <= interval_minutes <= MAX_INTERVAL_MINUTES:
            raise InvalidInput(
                f"notification interval must be {MIN_INTERVAL_MINUTES} to {MAX_INTERVAL_MINUTES} minutes"
            )
        new_address = normalize_email(address) if isinstance(address, str) else None
        with unit_of_work(self._sessions) as s:
            acct = self._account(s, email)
            prefs = self._prefs(s, acct)
            if mode is not None:
                prefs.mode = mode
                acct.notify_enabled = mode != "off"
            if interval_minutes is not None:
                prefs.interval_minutes = interval_minutes
            if not isinstance(address, _Unset):
                acct.notify_email = new_address
            acct.updated_at = now()
            audit.record(s, "account.notifications", actor=actor or acct.email, account=acct.email,
                         detail=f"mode={prefs.mode} interval={prefs.interval_minutes}")
            return _settings(acct, prefs)

    @staticmethod
    def _prefs(s: Session, acct: Account) -> NotificationPrefs:
        prefs = s.get(NotificationPrefs, acct.id)
        if prefs is None:
            prefs = NotificationPrefs(
                account_id=acct.id, mode="every" if acct.notify_enabled else "off",
                interval_minutes=DEFAULT_INTERVAL_MINUTES, last_sent_at=None, held_since=None,
            )
            s.add(prefs)
        return prefs

    def claim_notification(
        self, email: str, at: datetime, decide: Callable[[NotifyState, datetime], NotifyVerdict]
    ) -> NotifyTarget | None:
        """Decide, in one write transaction, whether ``email`` gets a
        notification at ``at``; record it. Serialized per database (BEGIN
        IMMEDIATE), so two deliveries at once cannot both pass a "one per N
        minutes" rule. ``decide`` is pure (``postvault.notices.schedule``)."""
        with unit_of_work(self._sessions) as s:
            return self._claim(s, email, at, decide)

    def claim_notifications(
        self,
        emails: Sequence[str],
        at: datetime,
        decide: Callable[[NotifyState, datetime], NotifyVerdict],
    ) -> list[NotifyTarget | None | Exception]:
        """``claim_notification`` for several deliveries, in order, in ONE
        write transaction (see ``claim_notifications_in``), for callers
        without a transaction of their own."""
        with self.engine.connect() as conn:  # type: ignore[attr-defined]
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                return claim_notifications_in(conn, emails, at, decide)

    def _claim(
        self, s: Session, email: str, at: datetime, decide: Callable[[NotifyState, datetime], NotifyVerdict],
        count_unread: bool = True,
    ) -> NotifyTarget | None:
        acct = self._account(s, email)
        prefs = self._prefs(s, acct)
        unread = -1
        if count_unread:
            inbox = s.scalar(select(Mailbox.id).where(Mailbox.account_id == acct.id, Mailbox.name == "INBOX"))
            unread = s.scalar(
                select(func.count(MessageCopy.id)).where(
                    MessageCopy.mailbox_id == inbox, ~MessageCopy.flags.contains("\\Seen", autoescape=True)
                )
            ) or 0
        state = NotifyState(
            acct.state, prefs.mode if acct.notify_enabled else "off",  # type: ignore[arg-type]
            timedelta(minutes=prefs.interval_minutes),
            _aware(prefs.last_sent_at) if prefs.last_sent_at else None,
            _aware(prefs.held_since) if prefs.held_since else None, unread,
        )
        verdict = decide(state, at)
        if verdict == "send":
            prefs.last_sent_at, prefs.held_since = at, None
            return NotifyTarget(acct.email, acct.notify_email or acct.email, acct.role)
        if verdict == "hold":
            prefs.held_since = prefs.held_since or at
        else:
            prefs.held_since = None
        return None

    def held_notifications(self) -> list[str]:
        """Accounts with a notification held back by their interval."""
        with self._sessions() as s:
            rows = s.scalars(
                select(Account.email).join(NotificationPrefs, NotificationPrefs.account_id == Account.id)
                .where(NotificationPrefs.held_since.is_not(None))
            )
            return sorted(rows)

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


_ACCOUNT_INFO = FastSelect(select(
    Account.id, Account.email, Account.role, Account.state, Account.practice_name, Account.timezone,
    Account.mailbox_name,
).where(func.lower(Account.email).in_(bindparam("emails", expanding=True))))

# -- notification claims inside a caller's transaction (SQLAlchemy Core) ------
# The SMTP server claims the notifications of every message in the
# transaction that files it (``delivery.write_deliveries``' hook): Core
# statements built once, because an ORM unit of work per recipient cost more
# than filing the message itself.

_PREFS = cast(Table, NotificationPrefs.__table__)  # a Table (mypy sees only FromClause)
_CLAIM_READ = FastSelect(
    select(Account.id, Account.email, Account.state, Account.role, Account.notify_enabled, Account.notify_email,
           _PREFS.c.account_id.label("has_prefs"), _PREFS.c.mode, _PREFS.c.interval_minutes, _PREFS.c.last_sent_at,
           _PREFS.c.held_since)
    .select_from(Account.__table__.outerjoin(_PREFS, _PREFS.c.account_id == Account.id))
    .where(func.lower(Account.email) == bindparam("email"))
)
_PREFS_NEW = insert(_PREFS)
_PREFS_SET = (
    update(_PREFS).where(_PREFS.c.account_id == bindparam("account"))
    .values(last_sent_at=bindparam("sent"), held_since=bindparam("held"))
)
# The claim's writes in the writer's transaction, on the sqlite3 connection.
_PREFS_NEW_W = FastWrite(_PREFS_NEW, ["account_id", "mode", "interval_minutes", "last_sent_at", "held_since"])
_PREFS_SET_W = FastWrite(_PREFS_SET, ["account", "sent", "held"])


def claim_notifications_in(
    conn: Connection, emails: Sequence[str], at: datetime, decide: Callable[[NotifyState, datetime], NotifyVerdict]
) -> list[NotifyTarget | None | Exception]:
    """``claim_notification`` for each of ``emails`` (new mail in its INBOX),
    in order, inside the caller's write transaction: the same decisions and
    the same rows as the ORM path (a missing preferences row is made, as
    ``_prefs`` does), without counting the INBOX: ``decide`` must not look at
    ``NotifyState.unread`` (it is -1; ``schedule.on_delivery`` does not). An
    account named twice sees its first claim on the second. An unknown
    account gets ``NoSuchAccount`` in its place and costs the others
    nothing (nothing was written for it)."""
    out: list[NotifyTarget | None | Exception] = []
    for email in emails:
        # In the writer's transaction, on the sqlite3 connection (fastread.py).
        rows = _CLAIM_READ.rows(conn, {"email": email.strip().lower()})
        row = rows[0] if rows else None
        if row is None:
            out.append(NoSuchAccount(f"no account for {email.strip()}"))
            continue
        if row.has_prefs is None:
            mode, interval, last, held = ("every" if row.notify_enabled else "off"), DEFAULT_INTERVAL_MINUTES, None, None
        else:
            mode, interval = row.mode, row.interval_minutes
            last = _aware(row.last_sent_at) if row.last_sent_at else None
            held = _aware(row.held_since) if row.held_since else None
        state = NotifyState(row.state, mode if row.notify_enabled else "off",  # type: ignore[arg-type]
                            timedelta(minutes=interval), last, held, -1)
        verdict = decide(state, at)
        target = None
        new_last, new_held = last, held
        if verdict == "send":
            new_last, new_held = at, None
            target = NotifyTarget(row.email, row.notify_email or row.email, row.role)
        elif verdict == "hold":
            new_held = held or at
        else:
            new_held = None
        if row.has_prefs is None:
            _PREFS_NEW_W.run(conn, {"account_id": row.id, "mode": mode, "interval_minutes": interval,
                                    "last_sent_at": new_last, "held_since": new_held})
        elif (new_last, new_held) != (last, held):
            _PREFS_SET_W.run(conn, {"account": row.id, "sent": new_last, "held": new_held})
        out.append(target)
    return out
