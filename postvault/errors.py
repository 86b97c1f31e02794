"""The one exception hierarchy of Postvault.

Every error a user or client can cause is a ``PostvaultError``; the protocol
edges (SMTP replies, IMAP responses, the CLI) map these to their own answers.
Messages are public text: they never carry message content, subjects,
file names or secrets.
"""

from __future__ import annotations


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


class MessageNotFound(StoreError):
    """No message with this UID in this mailbox."""


class EscrowError(PostvaultError):
    """Key recovery escrow: the OpenPGP keys cannot be used, or an escrow
    file is not one, or belongs to another account or key pair."""


class ReadOnlyAccess(InvalidInput):
    """A read-only session (emergency access) tried to change something."""


class AccessExpired(InvalidInput):
    """A time-limited session (emergency access) has ended: expired or revoked."""


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
