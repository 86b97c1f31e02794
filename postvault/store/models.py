"""SQLAlchemy 2.x models: what the server keeps in its database.

Invariant: no column holds message content. What is readable here is
exactly what DESIGN.md allows: accounts, folder names, UIDs, flags, sizes,
dates and thread membership as keyed hashes of Message-IDs. Keys appear only
wrapped (private keys) or public.

Written for SQLite (WAL) and PostgreSQL alike: portable types only, explicit
lengths, no server-side defaults that differ between engines. Every change
here needs an Alembic revision in ``store/migrations/versions``; a test
checks that the migrated schema equals these models.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations and models compare equal on
# every engine (Alembic's recommended convention).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Random, never reused; bound into every key wrap as the owner, so a
    # wrapped key moved to another account row fails to open.
    key_owner: Mapped[str] = mapped_column(String(32), unique=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # member | colleague
    state: Mapped[str] = mapped_column(String(16))  # pending | active | disabled
    practice_name: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    mailbox_name: Mapped[str] = mapped_column(String(200))
    notify_enabled: Mapped[bool] = mapped_column(Boolean)
    notify_email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    password_hash: Mapped[bytes | None] = mapped_column(LargeBinary(128), nullable=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    # Private key wrapped under the password-derived key (or, while pending,
    # the invitation-token-derived key); kdf_params says how to derive it.
    wrapped_private_key: Mapped[bytes] = mapped_column(LargeBinary(128))
    kdf_params: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The highest UIDVALIDITY any of this account's folders ever had (NULL:
    # none given since revision 0009). A new or renamed folder gets a value
    # above it, so a name that comes back after DELETE or RENAME never shows
    # an old UIDVALIDITY with other messages (RFC 3501 §2.3.1.1, §6.3.4).
    last_uidvalidity: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class AddressBookEntry(Base):
    """A member's contact, usually from its PMS export."""

    __tablename__ = "address_book"
    __table_args__ = (UniqueConstraint("member_id", "email"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str] = mapped_column(String(200))
    practice: Mapped[str] = mapped_column(String(200))
    extra: Mapped[str] = mapped_column(Text)  # JSON of PMS columns we keep
    colleague_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Invitation(Base):
    __tablename__ = "invitations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    colleague_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    # SHA-256 of the 256-bit token; the token itself is never stored.
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    state: Mapped[str] = mapped_column(String(16))  # pending | used | revoked
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Mailbox(Base):
    __tablename__ = "mailboxes"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    special_use: Mapped[str | None] = mapped_column(String(16), nullable=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    # RFC 3501 §2.3.1.1: UIDs strictly ascending, never reused while
    # UIDVALIDITY stands; uidnext only ever grows.
    uidnext: Mapped[int] = mapped_column(BigInteger)
    highestmodseq: Mapped[int] = mapped_column(BigInteger)
    # SUBSCRIBE/UNSUBSCRIBE (RFC 3501 §6.3.6-7): only existing folders can
    # be subscribed here, so the flag lives on the folder's row; DELETE takes
    # it along and RENAME keeps it. The four folders are always subscribed.
    subscribed: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Thread(Base):
    __tablename__ = "threads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Message(Base):
    """One sealed message content, shared by all its copies."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Random id bound into every chunk's associated data and key wrap.
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    blob_id: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    # Keyed hash (HMAC-SHA256 under the server's thread key) of the
    # Message-ID header; never the Message-ID itself.
    mid_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True, index=True)
    thread_id: Mapped[int | None] = mapped_column(ForeignKey("threads.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # "submission" (the server delivered it) or "append" (a client stored
    # it). Only delivered messages prove a conversation: a colleague could
    # APPEND a made-up message to Sent and then "reply" to it.
    origin: Mapped[str] = mapped_column(String(16), server_default="submission")
    # The message summary (ENVELOPE, BODYSTRUCTURE, part offsets; see
    # postvault/mime/summary.py) as JSON sealed under the content key
    # (crypto.seal_small, bound to the public id): it holds the subject.
    # NULL for messages stored before revision 0004; filled on first read.
    sealed_summary: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class MessageCopy(Base):
    """A message as it sits in one mailbox of one account."""

    __tablename__ = "message_copies"
    __table_args__ = (
        UniqueConstraint("mailbox_id", "uid"),
        Index("ix_message_copies_mailbox_modseq", "mailbox_id", "modseq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    uid: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    flags: Mapped[str] = mapped_column(Text)  # space-separated, sorted
    internal_date: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    size: Mapped[int] = mapped_column(BigInteger)
    modseq: Mapped[int] = mapped_column(BigInteger)
    # Content key wrapped to the owning account's public key, bound to that
    # account and this message: copying within the account reuses it.
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary(128))
    # The SEARCH index entry of this copy (postvault/mime/searchfields.py),
    # sealed under the account's search-index key (crypto.seal_search_entry,
    # bound to the account and the message); NULL until the account's own
    # session first searches its headers. Deferred: only SEARCH reads it.
    sealed_search: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    # The raw header block of this copy's message (what FETCH BODY[HEADER]
    # and HEADER.FIELDS answer from), sealed under the account's header-cache
    # key (crypto.seal_header_entry, bound to the account and the message);
    # NULL until the account's own session first reads it (store/headercache.py).
    # Deferred: only header FETCH reads it.
    sealed_header: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)


class ThreadParticipant(Base):
    __tablename__ = "thread_participants"
    __table_args__ = (UniqueConstraint("thread_id", "email"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    thread_id: Mapped[int] = mapped_column(ForeignKey("threads.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(320))


class BlobChunk(Base):
    """Sealed blob bytes, when ``[store] blobs = "database"``."""

    __tablename__ = "blob_chunks"

    blob_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ServerSecret(Base):
    """Server-wide keys that are not content keys (the thread-index HMAC key)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary(64))


class AuditEvent(Base):
    """Who did what to which message id; never content (see issue 7)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(320))
    account: Mapped[str | None] = mapped_column(String(320), nullable=True, index=True)
    message: Mapped[str | None] = mapped_column(String(32), nullable=True)
    client_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    protocol: Mapped[str | None] = mapped_column(String(16), nullable=True)
    detail: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuthFailure(Base):
    """One failed login, kept for the auth limits of policy.toml ([auth]).

    In the database rather than in memory so that throttling and lockout
    hold across restarts and across several server processes.
    """

    __tablename__ = "auth_failures"
    __table_args__ = (Index("ix_auth_failures_account_at", "account", "at"), Index("ix_auth_failures_ip_at", "client_ip", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # HMAC of the user name as typed (lower-cased), account or not.
    account: Mapped[str] = mapped_column(String(320))
    client_ip: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class InvitationEscrow(Base):
    """A pending colleague's private key, wrapped to an inviting member's
    public key, so that member can re-invite (new token) without the old
    token and the mail waiting for the colleague carries over.

    Kept only until sign-up; see ``AccountStore.invite_colleague`` for the
    key handling and what this copy exposes.
    """

    __tablename__ = "invitation_escrow"
    __table_args__ = (UniqueConstraint("colleague_id", "member_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    colleague_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    # ECIES (X25519 + HKDF + AES-GCM) to the member's public key, bound to
    # the member and the colleague: eph_pub || nonce || ciphertext+tag.
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class NotificationPrefs(Base):
    """How often an account hears about new mail by email (no row: every
    message). The mail itself is never in the notification."""

    __tablename__ = "notification_prefs"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))  # every | batched | off
    interval_minutes: Mapped[int] = mapped_column(Integer)
    last_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A delivery that the interval held back: a notification follows when
    # the interval is over, if mail is still unread then.
    held_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)


class OutboundMail(Base):
    """One message waiting to leave (or that left): invitations and
    notifications only, which carry no PHI. An invitation does carry its
    sign-up link, so ``body`` is emptied as soon as the message is sent or
    given up (SQLite's secure_delete zeroes the freed pages)."""

    __tablename__ = "outbound_queue"
    __table_args__ = (Index("ix_outbound_queue_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # invitation | notification | notice
    # The account the message is about, for the audit log (never in detail).
    account: Mapped[str | None] = mapped_column(String(320), nullable=True)
    mail_from: Mapped[str] = mapped_column(String(320))
    recipient: Mapped[str] = mapped_column(String(320))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16))  # queued | sent | failed
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    give_up_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The last SMTP reply or connection error: server text, never content.
    last_error: Mapped[str] = mapped_column(Text)


class OfficeAllowance(Base):
    """An attachment type a member office allows, from its office settings
    page, for its own conversations (issue 6: "request this file be
    allowed"). Only extensions the admin's policy lets a member lift are
    ever honoured (``store.offices.office_bounds``, checked again at every
    message), so a row left over from a looser policy lifts nothing."""

    __tablename__ = "office_allowances"
    __table_args__ = (UniqueConstraint("member_id", "extension"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    extension: Mapped[str] = mapped_column(String(32))  # lower case, no dot
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Who allowed it (the member's address, or "admin"), for the office page.
    created_by: Mapped[str] = mapped_column(String(320))


class AuditCheckpoint(Base):
    """A signed statement "the audit chain up to event ``event_id`` had head
    ``event_hash``" (see ``store.auditlog``). The Ed25519 private key that
    signs it is a file in the home folder, never in the database, so whoever
    can write only the database cannot rewrite history before a checkpoint
    and sign again. Checkpoints chain too (``seq``, ``prev_sig_hash``), so a
    deleted one shows as a gap."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # periodic | shutdown | prune | manual
    kind: Mapped[str] = mapped_column(String(16))
    # 0 and GENESIS when the chain was empty.
    event_id: Mapped[int] = mapped_column(Integer, index=True)
    event_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    # SHA-256 of the previous checkpoint's signature; 32 zero bytes for the first.
    prev_sig_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    # First 16 hex digits of SHA-256 of the raw public key that signed it.
    key_id: Mapped[str] = mapped_column(String(16))
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))


class RecoveryEscrow(Base):
    """An account's private key, encrypted with OpenPGP to the recovery
    officers' public keys of ``[recovery] keys`` (store/escrow.py), so that
    a forgotten password does not lose the mail. The server cannot open it:
    only an officer's offline secret key can."""

    __tablename__ = "recovery_escrow"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    # The public key whose private half is inside: an escrow for an older
    # key pair (after a reset without escrow) is stale.
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    # Sorted OpenPGP fingerprints it was encrypted to, comma-separated:
    # when the configured keys change, the next login makes a new escrow.
    recipients: Mapped[str] = mapped_column(Text)
    # ASCII-armored OpenPGP message (what `postvault escrow export` writes).
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EmergencyGrant(Base):
    """Break-glass: time-limited, read-only access for a named person to
    one account (store/emergency.py). The account's private key is wrapped
    under Argon2id of a random password shown once at grant time; the wrap
    is erased when the grant expires or is revoked."""

    __tablename__ = "emergency_grants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Random public id: the IMAP user name is "emergency-<grant_id>".
    grant_id: Mapped[str] = mapped_column(String(32), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    person: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    first_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # None once the grant has ended: then nothing can open it, whatever
    # the password and the database say.
    wrapped_private_key: Mapped[bytes | None] = mapped_column(LargeBinary(128), nullable=True)
    kdf_params: Mapped[str | None] = mapped_column(Text, nullable=True)
