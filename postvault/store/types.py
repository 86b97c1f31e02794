"""Plain data the store API takes and returns, and small shared helpers.

Nothing here touches the database or keys; servers may import these types
freely.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol

from ..errors import InvalidInput
from . import crypto

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

Role = Literal["member", "colleague"]
# RFC 6154 special-use attributes of the four folders every account has.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Drafts", "\\Drafts"),
    ("Sent", "\\Sent"),
    ("Trash", "\\Trash"),
)
# RFC 3501 §2.3.2 system flags a client may set; \Recent is session state.
SYSTEM_FLAGS = frozenset({"\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"})
MAX_HEADER_SCAN = 256 * 1024


class ContentKeyCache:
    """Content keys that one IMAP connection has unwrapped, by message
    public id: at most ``limit`` of them, the least recently used dropped
    first; the server drops them all at logout and when the connection
    closes.

    Unwrapping a content key costs an X25519 exchange, HKDF and AES-GCM, and
    a mail client asks for the same messages again and again (the list's
    headers, then a body; FETCH of summaries, then of content). Why holding
    them is no weaker: the session already holds the account's private key
    in memory, which opens every one of these keys; an attacker who can read
    this memory gets nothing from the cache that the private key beside it
    would not give. Nothing here is written anywhere. A cached key still
    has to open the blob and the summary, which are sealed with the message
    id as associated data, so a blob or summary moved to another message is
    refused as before.
    """

    def __init__(self, limit: int = 2000) -> None:
        self.limit = limit
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        # Worker threads of one connection may overlap (a poll during a
        # command): OrderedDict's reordering is not atomic.
        self._lock = threading.Lock()

    def get(self, public_id: str) -> bytes | None:
        with self._lock:
            key = self._keys.get(public_id)
            if key is not None:
                self._keys.move_to_end(public_id)
            return key

    def put(self, public_id: str, key: bytes) -> None:
        with self._lock:
            self._keys[public_id] = key
            self._keys.move_to_end(public_id)
            while len(self._keys) > self.limit:
                self._keys.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)


class BlobStore(Protocol):
    def writer(self) -> BinaryIO: ...
    def open(self, blob_id: str) -> BinaryIO: ...
    def delete(self, blob_id: str) -> None: ...
    def exists(self, blob_id: str) -> bool: ...


@dataclass(frozen=True)
class KdfSettings:
    """Argon2id cost for new password wraps (stored per account, so raisable)."""

    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4


@dataclass(frozen=True)
class AccountInfo:
    id: int
    email: str
    role: str
    state: str
    practice_name: str
    timezone: str
    mailbox_name: str


@dataclass(frozen=True)
class AccountSession:
    """A logged-in account. The private key lives here, in memory only."""

    account_id: int
    email: str
    role: str
    key_owner: bytes
    # Derived from private_key at login (and checked against the stored
    # one), so that mail this session files wraps to the key it can open.
    public_key: bytes
    private_key: bytes = field(repr=False)
    # Emergency access (store/emergency.py): a named person reads this
    # account. Read-only, audited under ``actor``, ended at ``expires_at``
    # or when grant ``grant_id`` is revoked. None/False: the owner.
    read_only: bool = False
    actor: str | None = None
    expires_at: datetime | None = None
    grant_id: str | None = None

    @cached_property
    def private_key_object(self) -> X25519PrivateKey:
        """``private_key`` loaded once for the session's lifetime (each load
        is a scalar multiplication; ``crypto.load_private_key``). Not a
        field: not compared, not in repr."""
        return crypto.load_private_key(self.private_key)


@dataclass(frozen=True)
class MailboxInfo:
    id: int
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    subscribed: bool


@dataclass(frozen=True)
class MessageMeta:
    uid: int
    flags: frozenset[str]
    size: int
    internal_date: datetime
    modseq: int
    message_id: str  # public id, for the audit log; not the Message-ID header


@dataclass(frozen=True)
class MailboxSnapshot:
    mailbox: MailboxInfo
    messages: tuple[MessageMeta, ...]  # ascending UID


# A UID is a 32-bit unsigned number (RFC 3501 §2.3.1.1); "I" is 4 bytes on
# every platform Python supports, and the per-message cost of a mailbox
# view is what makes SELECT of 100,000 messages cheap.
UID_TYPECODE = "I"
assert array(UID_TYPECODE).itemsize >= 4


def first_position(index: bytes, itemsize: int, value: int) -> int | None:
    """The position of the first entry equal to ``value`` in the bytes of
    an ``array("I")`` (a flag-set index: one entry per message), found by
    a C-level byte search; None if there is none."""
    pattern = array("I", [value]).tobytes()
    at = index.find(pattern)
    while at != -1 and at % itemsize:  # only a whole entry counts
        at = index.find(pattern, at + 1)
    return None if at == -1 else at // itemsize


@dataclass(frozen=True)
class MailboxState:
    """What SELECT reports about a mailbox, read without building an object
    per message: counts and first-unseen come from one SQL aggregate, the
    UIDs are a compact ``array`` (4 bytes each). Per-message flags and
    metadata are read when a command needs them (``message_flags``,
    ``snapshot(..., uids=...)``, ``mailbox_changes``)."""

    mailbox: MailboxInfo
    uids: array  # type: ignore[type-arg]  # ascending, typecode UID_TYPECODE
    unseen: int
    first_unseen: int | None  # the lowest UID without \Seen
    keywords: frozenset[str]  # keyword flags (no backslash) some message has
    # The lowest UID whose internal date is at or after the ``since`` asked
    # for (None if none or not asked): \Recent's start (imapd/mailbox.py).
    first_since: int | None = None
    # Every message's flags from the same read, if asked for and the
    # database lists UIDs in SQL (``mailbox_state(with_flags=True)``).
    flags: MailboxFlags | None = None

    @property
    def exists(self) -> int:
        return len(self.uids)


@dataclass(frozen=True)
class MailboxFlags:
    """The flags of every message of a mailbox, compactly: ``sets[index[i]]``
    are the flags of ``uids[i]``. A mailbox has few distinct flag sets, so
    each is one shared frozenset."""

    uids: array  # type: ignore[type-arg]  # ascending, typecode UID_TYPECODE
    index: array  # type: ignore[type-arg]  # typecode "I"
    sets: tuple[frozenset[str], ...]


@dataclass(frozen=True)
class MailboxChanges:
    """What changed in a mailbox since a modseq: the messages added or with
    flags changed (modseq above it), and how many messages it holds now
    (expunges leave no row, so a count that does not add up tells the
    reader it must compare UIDs)."""

    mailbox: MailboxInfo
    messages: tuple[MessageMeta, ...]  # ascending UID
    count: int


@dataclass(frozen=True)
class AppendResult:
    uidvalidity: int
    uid: int
    message_id: str  # public id
    # True when nothing was stored because the message is already in Sent
    # (delivered by SMTP moments ago); ``uid`` is then that copy's UID. The
    # IMAP answer is the same: OK [APPENDUID uidvalidity uid].
    duplicate: bool = False


@dataclass(frozen=True)
class CopyResult:
    uidvalidity: int  # of the destination
    uids: tuple[tuple[int, int], ...]  # (source uid, destination uid)


@dataclass(frozen=True)
class DeliveryResult:
    message_id: str
    delivered: tuple[tuple[str, int], ...]  # (recipient, uid in INBOX)
    sent_uid: int | None


def now() -> datetime:
    return datetime.now(timezone.utc)


def normalize_email(email: str) -> str:
    email = email.strip()
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain or any(c in email for c in "\r\n\0 <>"):
        raise InvalidInput(f"not an email address: {email!r}")
    return f"{local}@{domain.lower()}"


def flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


def flags_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


def check_flags(flags: Iterable[str]) -> frozenset[str]:
    out = frozenset(flags)
    for flag in out:
        if flag.startswith("\\"):
            if flag not in SYSTEM_FLAGS:
                raise InvalidInput(f"{flag} is not a flag a client may set")
        elif not flag or any(c in flag for c in '(){ %*"\\]') or not flag.isprintable():
            raise InvalidInput("a keyword flag must be an IMAP atom")
    return out


def new_uidvalidity() -> int:
    # RFC 3501 §2.3.1.1: a non-zero 32-bit value that must change if UIDs are
    # ever reset; seconds since the epoch is the usual choice.
    return max(1, int(time.time()) & 0xFFFFFFFF)
