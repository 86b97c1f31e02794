"""Key recovery (issue 7 item 2): keeping each account's escrow current,
handing it to the recovery officer, and resetting a forgotten password
with the decrypted escrow (mail stays readable) or without it (mail that
nobody can open any more is deleted).

Key handling (second look required on every change here):

- An escrow is made whenever the private key is in memory with escrow
  configured and the account's escrow is missing or stale (made for another
  key pair or other officer keys): after account creation, sign-up and any
  full login (so a password change, which logs in first, is covered, and
  turning escrow on later covers each account at its next login). Making
  one never blocks the user: a failure is logged and audited
  (``escrow.failed``), and the next login tries again.
- Recovery takes the private key only from a decrypted escrow that is
  bound to this account (address, ``key_owner``, current public key) and
  re-wraps it exactly as a password change does (Argon2id, owner bound in).
- A reset without escrow makes a new key pair. Every message copy of the
  account is deleted in the same transaction: it is sealed to the old key,
  which no one can open any more (the old wrap is overwritten), and a copy
  that can never be read is only a broken message in the client. Senders
  still have their own copies. The escrow row and emergency grants of the
  old key pair go too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..errors import EscrowError, InvalidInput
from . import audit, crypto, passwords
from .db import unit_of_work
from .escrow import EscrowDocument, RecoveryKeys
from .models import (
    Account,
    AuthFailure,
    EmergencyGrant,
    Mailbox,
    MessageCopy,
    RecoveryEscrow,
)
from .notify import Change
from .types import AccountInfo, KdfSettings, now

log = logging.getLogger(__name__)

EscrowState = Literal["current", "stale", "missing"]


@dataclass(frozen=True)
class EscrowExport:
    account: str
    blob: bytes  # ASCII-armored OpenPGP message; only an officer's secret key opens it
    recipients: tuple[str, ...]  # OpenPGP fingerprints it is encrypted to
    created_at: datetime
    current: bool  # made for the configured keys and the account's current key pair


@dataclass(frozen=True)
class ResetResult:
    account: AccountInfo
    deleted: int  # message copies deleted with the old key pair


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


class RecoveryStore:
    """The recovery half of ``Store``."""

    _sessions: sessionmaker[Session]
    kdf: KdfSettings
    # Set by home.open_store when [recovery] keys is configured.
    recovery_keys: RecoveryKeys | None = None
    # From AccountStore and MailStore (Store mixes them all).
    _account: Callable[[Session, str], Account]
    _info: Callable[[Account], AccountInfo]
    _failure_key: Callable[[Session, str], str]
    _drop_orphans: Callable[[Session, set[int]], list[str]]
    _discard_blob: Callable[[str], None]
    _publish: Callable[..., None]

    # -- making escrows -------------------------------------------------------

    def _ensure_escrow(self, account_id: int, email: str, key_owner: str, public: bytes, private: bytes) -> bool:
        """Make or refresh the account's escrow if it is missing or stale;
        True if one was written. Never raises (see the module docstring)."""
        keys = self.recovery_keys
        if keys is None:
            return False
        try:
            with self._sessions() as s:
                row = s.get(RecoveryEscrow, account_id)
                if row is not None and row.public_key == public and row.recipients == keys.recipients:
                    return False
            blob = keys.encrypt(EscrowDocument(email, key_owner, public, private))
            with unit_of_work(self._sessions) as s:
                acct = s.get(Account, account_id)
                if acct is None or acct.public_key != public:
                    return False  # the key pair changed meanwhile; its own escrow follows
                row = s.get(RecoveryEscrow, account_id)
                if row is None:
                    s.add(RecoveryEscrow(account_id=account_id, public_key=public, recipients=keys.recipients,
                                         blob=blob, created_at=now()))
                else:
                    row.public_key, row.recipients, row.blob, row.created_at = public, keys.recipients, blob, now()
                audit.record(s, "escrow.create", actor="postvault", account=email,
                             detail=f"recipients={keys.recipients}")
            return True
        except Exception as exc:  # noqa: BLE001 - an escrow problem must never lock a user out
            log.warning("recovery escrow for an account not made (%s)", type(exc).__name__)
            try:
                with unit_of_work(self._sessions) as s:
                    audit.record(s, "escrow.failed", actor="postvault", account=email,
                                 detail=f"error={type(exc).__name__}")
            except Exception:  # noqa: BLE001 - the warning above is already logged
                log.warning("recording the escrow failure failed too")
            return False

    def escrow_states(self) -> dict[str, EscrowState]:
        """Every active account's escrow: current, stale or missing."""
        recipients = self.recovery_keys.recipients if self.recovery_keys is not None else None
        with self._sessions() as s:
            rows = s.execute(
                select(Account.email, Account.public_key, RecoveryEscrow.public_key, RecoveryEscrow.recipients)
                .outerjoin(RecoveryEscrow, RecoveryEscrow.account_id == Account.id)
                .where(Account.state == "active")
                .order_by(Account.email)
            ).all()
        out: dict[str, EscrowState] = {}
        for email, public, escrow_public, escrow_recipients in rows:
            if escrow_public is None:
                out[email] = "missing"
            elif escrow_public == public and (recipients is None or escrow_recipients == recipients):
                out[email] = "current"
            else:
                out[email] = "stale"
        return out

    def export_escrow(self, email: str, *, actor: str = "admin") -> EscrowExport:
        """The account's escrow blob, for the recovery officer; audited."""
        with unit_of_work(self._sessions) as s:
            acct = self._account(s, email)
            row = s.get(RecoveryEscrow, acct.id)
            if row is None:
                raise EscrowError(
                    f"{acct.email} has no recovery escrow (escrow is made when the account logs in with "
                    "[recovery] keys set); reset it with --reset-without-escrow instead")
            current = row.public_key == acct.public_key and (
                self.recovery_keys is None or row.recipients == self.recovery_keys.recipients)
            audit.record(s, "escrow.export", actor=actor, account=acct.email, detail=f"recipients={row.recipients}")
            return EscrowExport(acct.email, row.blob, tuple(row.recipients.split(",")), _aware(row.created_at),
                                current)

    def has_escrow(self, email: str) -> bool:
        """Whether a recovery escrow of the account's current key pair exists."""
        with self._sessions() as s:
            acct = self._account(s, email)
            row = s.get(RecoveryEscrow, acct.id)
            return row is not None and row.public_key == acct.public_key

    # -- recovery -------------------------------------------------------------

    def _escrowed_key(self, email: str, escrow: bytes) -> tuple[int, EscrowDocument]:
        """The decrypted escrow, checked against the account as it is now."""
        doc = EscrowDocument.parse(escrow)
        with self._sessions() as s:
            acct = self._account(s, email)
            if acct.state != "active":
                raise InvalidInput(f"{acct.email} is {acct.state}, not active; only an active account can be "
                                   "recovered")
            doc.check_belongs_to(acct.email, acct.key_owner, acct.public_key)
            return acct.id, doc

    def check_escrow(self, email: str, escrow: bytes) -> None:
        """Raise ``EscrowError`` (one line) unless ``escrow`` is a decrypted
        escrow of this account's current key pair."""
        self._escrowed_key(email, escrow)

    def recover_account(self, email: str, escrow: bytes, new_password: str, *, actor: str = "admin") -> AccountInfo:
        """Set a new password with the private key from a decrypted escrow:
        the key is re-wrapped, mail is untouched and stays readable. The
        account's failed-login record is cleared. Audited ``account.recover``."""
        account_id, doc = self._escrowed_key(email, escrow)
        kdf = crypto.KdfParams.for_password(self.kdf.memory_kib, self.kdf.iterations, self.kdf.lanes)
        wrapped = crypto.wrap_private_key(
            doc.private_key, crypto.derive_wrapping_key(passwords.password_bytes(new_password), kdf),
            doc.key_owner.encode())
        pw_hash = passwords.hash_password(new_password)
        with unit_of_work(self._sessions) as s:
            acct = s.get(Account, account_id)
            if acct is None or acct.public_key != doc.public_key or acct.state != "active":
                raise EscrowError(f"{email} changed while it was being recovered; run the recovery again")
            acct.wrapped_private_key, acct.kdf_params, acct.password_hash = wrapped, kdf.to_json(), pw_hash
            acct.updated_at = now()
            s.execute(delete(AuthFailure).where(AuthFailure.account == self._failure_key(s, acct.email)))
            audit.record(s, "account.recover", actor=actor, account=acct.email, detail="with=escrow")
            info = self._info(acct)
        self._ensure_escrow(account_id, info.email, doc.key_owner, doc.public_key, doc.private_key)
        return info

    def reset_account_keys(self, email: str, new_password: str, *, actor: str = "admin") -> ResetResult:
        """Without escrow: a new key pair under a new password. Every message
        copy of the account is deleted (see the module docstring), and so
        are its escrow and emergency grants. Audited ``account.reset``."""
        pair = crypto.generate_keypair()
        with self._sessions() as s:
            key_owner = self._account(s, email).key_owner
        kdf = crypto.KdfParams.for_password(self.kdf.memory_kib, self.kdf.iterations, self.kdf.lanes)
        wrapped = crypto.wrap_private_key(
            pair.private, crypto.derive_wrapping_key(passwords.password_bytes(new_password), kdf), key_owner.encode())
        pw_hash = passwords.hash_password(new_password)
        with unit_of_work(self._sessions) as s:
            acct = self._account(s, email)
            if acct.state != "active":
                raise InvalidInput(f"{acct.email} is {acct.state}, not active; only an active account can be reset")
            copies = list(s.execute(
                select(MessageCopy, Mailbox.name).join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
                .where(Mailbox.account_id == acct.id)
            ).all())
            gone: dict[str, list[int]] = {}
            for copy, box in copies:
                gone.setdefault(box, []).append(copy.uid)
                s.delete(copy)
            for mailbox in s.scalars(
                select(Mailbox).where(Mailbox.account_id == acct.id, Mailbox.name.in_(list(gone)))
            ):
                mailbox.highestmodseq += 1
            s.flush()
            doomed = self._drop_orphans(s, {copy.message_id for copy, _ in copies})
            s.execute(delete(RecoveryEscrow).where(RecoveryEscrow.account_id == acct.id))
            s.execute(
                update(EmergencyGrant).where(EmergencyGrant.account_id == acct.id, EmergencyGrant.revoked_at.is_(None))
                .values(revoked_at=now(), wrapped_private_key=None, kdf_params=None)
            )
            acct.public_key, acct.wrapped_private_key, acct.kdf_params = pair.public, wrapped, kdf.to_json()
            acct.password_hash, acct.updated_at = pw_hash, now()
            s.execute(delete(AuthFailure).where(AuthFailure.account == self._failure_key(s, acct.email)))
            audit.record(s, "account.reset", actor=actor, account=acct.email,
                         detail=f"with=new-key-pair deleted={len(copies)}")
            info = self._info(acct)
        for blob_id in doomed:
            self._discard_blob(blob_id)
        for box_name, uids in gone.items():
            self._publish(Change(info.id, box_name, "expunge", tuple(sorted(uids))))
        self._ensure_escrow(info.id, info.email, key_owner, pair.public, pair.private)
        return ResetResult(info, len(copies))

    def message_count(self, email: str) -> int:
        """How many message copies the account holds (for the reset warning)."""
        with self._sessions() as s:
            acct = self._account(s, email)
            return s.scalar(
                select(func.count(MessageCopy.id)).join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
                .where(Mailbox.account_id == acct.id)
            ) or 0
