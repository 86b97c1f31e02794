"""The one exception hierarchy of Postvault.

Every error a user or client can cause is a ``PostvaultError``; the protocol
edges (SMTP replies, IMAP responses, the CLI) map these to their own answers.
Messages are public text: they never carry message content, subjects,
file names or secrets.
"""

from __future__ import annotations

import errno


class PostvaultError(Exception):
    """Base of every error Postvault raises on purpose."""


class ConfigError(PostvaultError):
    """A config file, or an environment override, is invalid.

    The message names the file, the key and what was expected.
    """


class HomeError(PostvaultError):
    """The home folder is missing, incomplete, or would be overwritten."""


class TLSConfigError(PostvaultError):
    """Certificates or keys cannot be loaded into a TLS context."""


class InvalidInput(PostvaultError):
    """An argument is malformed (address, host name, time zone, ...)."""


class CryptoError(PostvaultError):
    """Base of encryption errors."""


class IntegrityError(CryptoError):
    """Sealed data failed authentication: tampered, truncated, reordered,
    or bound to another account or message."""


class WrongSecret(CryptoError):
    """A password or token does not unwrap the key it was offered for."""


class StoreError(PostvaultError):
    """Base of store errors (accounts, mailboxes, messages)."""


class AuthenticationFailed(StoreError):
    """Unknown user or wrong password; deliberately does not say which."""


class AccountExists(StoreError):
    """An account with this address already exists."""


class NoSuchAccount(StoreError):
    """No account has this address."""


class MailboxNotFound(StoreError):
    """The mailbox does not exist for this account."""


class MailboxExists(StoreError):
    """The mailbox already exists."""


class MailboxHasChildren(StoreError):
    """DELETE of a folder that has folders below it (RFC 9051 §7.1
    HASCHILDREN): delete or move those first."""


class MessageNotFound(StoreError):
    """No message with this UID in this mailbox."""


class EscrowError(PostvaultError):
    """Key recovery escrow: the OpenPGP keys cannot be used, or an escrow
    file is not one, or belongs to another account or key pair."""


class ReadOnlyAccess(InvalidInput):
    """A read-only session (emergency access) tried to change something."""


class AccessExpired(InvalidInput):
    """A time-limited session (emergency access) has ended: expired or revoked."""


class ProxyHeaderRefused(InvalidInput):
    """A connection on a PROXY-protocol listener did not start with a valid
    PROXY protocol header (``proxyproto.py``), or came from a sender that is
    not trusted to send one. The text names the fault, never the bytes."""


class LoginLimited(PostvaultError):
    """Too many failed logins: this attempt is refused before the password
    is checked. ``decision`` (a ``policy.decision.Decision``) carries the
    protocol answers (SMTP 454 4.7.0, IMAP NO [UNAVAILABLE])."""

    def __init__(self, decision: object) -> None:
        super().__init__(getattr(decision, "text", "too many failed logins"))
        self.decision = decision


class BackupError(PostvaultError):
    """A backup cannot be made, or a backup file cannot be restored (wrong
    target, damaged or foreign file, GnuPG failure). Public text only."""


class AuditChainBroken(StoreError):
    """The audit chain does not verify (``postvault audit verify`` names the
    first broken entry); pruning refuses to delete evidence of that."""


class StorageFull(StoreError):
    """The disk (or quota) holding the database or the blobs is full: the
    write was refused and rolled back, nothing half-stored. Mapped to SMTP
    452 4.3.1 and IMAP NO [OVERQUOTA]; it clears by itself once space is
    freed."""


# errno values of a full disk or an exhausted quota.
_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def storage_full(exc: BaseException) -> StorageFull | None:
    """``exc`` as a ``StorageFull`` if it says the storage is full, else None.

    Recognises ``StorageFull`` itself, an ``OSError`` with ENOSPC or EDQUOT,
    and SQLite's SQLITE_FULL ("database or disk is full"), bare or wrapped
    by SQLAlchemy (whose ``orig`` holds the driver's error), anywhere in the
    cause chain. Duck-typed, so this module imports nothing."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageFull):
            return current
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return StorageFull("the storage is full")
        if type(current).__name__ == "OperationalError" and "database or disk is full" in str(current):
            return StorageFull("the storage is full")
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and orig is not current:
            current = orig
            continue
        current = current.__cause__ or current.__context__
    return None
