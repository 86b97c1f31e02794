"""The store API: the one entry point both servers and the CLI use.

``Store`` is synchronous and thread-safe; each call is one unit of work in
its own database session (servers run it on worker threads). Callers never
see SQL or keys: they hold an ``AccountSession`` after a login, which carries
that account's unwrapped private key in memory only.

Invariants:
- A message is sealed once (fresh content key, chunked AES-GCM) and its
  content key is wrapped to each owner's public key; delivery needs no
  password.
- The sealed blob is durably written before the database row that points at
  it is committed; a call returns only after that commit. So a success
  return means "durably stored", and a failure leaves no row behind (an
  unreferenced blob may remain after a crash; fsck collects those).
- UIDs come from ``mailboxes.uidnext`` under a write lock on the mailbox
  row (BEGIN IMMEDIATE on SQLite, SELECT ... FOR UPDATE elsewhere); they are
  strictly ascending and never reused (RFC 3501 §2.3.1.1).
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Literal, Protocol
from zoneinfo import available_timezones

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from ..errors import (
    AccountExists,
    AuthenticationFailed,
    InvalidInput,
    MailboxExists,
    MailboxNotFound,
    MessageNotFound,
    NoSuchAccount,
)
from . import audit, crypto, passwords, threads
from .blobs import FileBlobStore
from .db import make_engine, sessions, unit_of_work, upgrade
from .dbblobs import DatabaseBlobStore
from .models import Account, AddressBookEntry, Mailbox, Message, MessageCopy, Thread, ThreadParticipant

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
    private_key: bytes = field(repr=False)


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


@dataclass(frozen=True)
class AppendResult:
    uidvalidity: int
    uid: int
    message_id: str


@dataclass(frozen=True)
class CopyResult:
    uidvalidity: int  # of the destination
    uids: tuple[tuple[int, int], ...]  # (source uid, destination uid)


@dataclass(frozen=True)
class DeliveryResult:
    message_id: str
    delivered: tuple[tuple[str, int], ...]  # (recipient, uid in INBOX)
    sent_uid: int | None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _normalize_email(email: str) -> str:
    email = email.strip()
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain or any(c in email for c in "\r\n\0 <>"):
        raise InvalidInput(f"not an email address: {email!r}")
    return f"{local}@{domain.lower()}"


def _flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


def _flags_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _check_flags(flags: Iterable[str]) -> frozenset[str]:
    out = frozenset(flags)
    for flag in out:
        if flag.startswith("\\"):
            if flag not in SYSTEM_FLAGS:
                raise InvalidInput(f"{flag} is not a flag a client may set")
        elif not flag or any(c in flag for c in '(){ %*"\\]') or not flag.isprintable():
            raise InvalidInput("a keyword flag must be an IMAP atom")
    return out


def _new_uidvalidity() -> int:
    # RFC 3501 §2.3.1.1: a non-zero 32-bit value that must change if UIDs are
    # ever reset; seconds since the epoch is the usual choice.
    return max(1, int(time.time()) & 0xFFFFFFFF)


class Store:
    """Accounts, mailboxes and sealed messages behind one API."""

    def __init__(self, engine: Engine, blobs: BlobStore | None = None, kdf: KdfSettings | None = None) -> None:
        self.engine = engine
        self._sessions = sessions(engine)
        self.blobs: BlobStore = blobs if blobs is not None else DatabaseBlobStore(self._sessions)
        self.kdf = kdf or KdfSettings()

    @classmethod
    def open(cls, url: str, blobs: Path | Literal["database"], kdf: KdfSettings | None = None) -> "Store":
        """Engine for ``url``, schema upgraded to the newest revision."""
        engine = make_engine(url)
        upgrade(engine)
        store = cls(engine, None, kdf)
        if blobs != "database":
            store.blobs = FileBlobStore(Path(blobs))
        return store

    def close(self) -> None:
        self.engine.dispose()

    # -- accounts -------------------------------------------------------

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
        email = _normalize_email(email)
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
        now = _now()
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
                created_at=now,
                updated_at=now,
            )
            s.add(acct)
            s.flush()
            self._create_default_mailboxes(s, acct.id)
            if invited_by is not None:
                self._upsert_contact(s, self._account(s, invited_by), email, "", practice_name, acct)
            audit.record(s, "account.create", actor=actor, account=email, detail=f"role={role}")
            return self._info(acct)

    def _create_default_mailboxes(self, s: Session, account_id: int) -> None:
        validity = _new_uidvalidity()
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
                    created_at=_now(),
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
        colleague_email = _normalize_email(colleague_email)
        with unit_of_work(self._sessions) as s:
            colleague = s.scalar(select(Account).where(func.lower(Account.email) == colleague_email.lower()))
            self._upsert_contact(s, self._account(s, member_email), colleague_email, name, practice, colleague)

    @staticmethod
    def _upsert_contact(
        s: Session, member: Account, email: str, name: str, practice: str, colleague: Account | None
    ) -> None:
        if member.role != "member":
            raise InvalidInput(f"{member.email} is not a member; only members have an address book")
        now = _now()
        entry = s.scalar(
            select(AddressBookEntry).where(
                AddressBookEntry.member_id == member.id, func.lower(AddressBookEntry.email) == email.lower()
            )
        )
        if entry is None:
            entry = AddressBookEntry(member_id=member.id, email=email, extra="{}", created_at=now, name="", practice="")
            s.add(entry)
        entry.name = name or entry.name
        entry.practice = practice or entry.practice
        entry.colleague_id = colleague.id if colleague is not None else None
        entry.updated_at = now

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
            acct.updated_at = _now()
            audit.record(s, "password.change", actor=acct.email, account=acct.email)

    # -- mailboxes ------------------------------------------------------

    def _mailbox(self, s: Session, account_id: int, name: str, *, lock: bool = False) -> Mailbox:
        # RFC 3501 §5.1: INBOX is case-insensitive, other names are not.
        key = "INBOX" if name.upper() == "INBOX" else name
        q = select(Mailbox).where(Mailbox.account_id == account_id, Mailbox.name == key)
        if lock:
            q = q.with_for_update()
        box = s.scalar(q)
        if box is None:
            raise MailboxNotFound(f"no mailbox named {name!r}")
        return box

    @staticmethod
    def _box_info(b: Mailbox) -> MailboxInfo:
        return MailboxInfo(b.id, b.name, b.special_use, b.uidvalidity, b.uidnext, b.highestmodseq, b.subscribed)

    def list_mailboxes(self, session: AccountSession) -> list[MailboxInfo]:
        with self._sessions() as s:
            boxes = s.scalars(select(Mailbox).where(Mailbox.account_id == session.account_id).order_by(Mailbox.id))
            return [self._box_info(b) for b in boxes]

    def create_mailbox(self, session: AccountSession, name: str) -> MailboxInfo:
        if not name or name.upper() == "INBOX" or not name.isprintable() or len(name) > 200:
            raise InvalidInput("a mailbox name must be 1-200 printable characters and not INBOX")
        with unit_of_work(self._sessions) as s:
            exists = s.scalar(select(Mailbox.id).where(Mailbox.account_id == session.account_id, Mailbox.name == name))
            if exists is not None:
                raise MailboxExists(f"mailbox {name!r} already exists")
            box = Mailbox(
                account_id=session.account_id, name=name, special_use=None, uidvalidity=_new_uidvalidity(),
                uidnext=1, highestmodseq=1, subscribed=True, created_at=_now(),
            )
            s.add(box)
            s.flush()
            return self._box_info(box)

    def snapshot(self, session: AccountSession, mailbox: str) -> MailboxSnapshot:
        with self._sessions() as s:
            box = self._mailbox(s, session.account_id, mailbox)
            rows = s.execute(
                select(MessageCopy, Message.public_id)
                .join(Message, Message.id == MessageCopy.message_id)
                .where(MessageCopy.mailbox_id == box.id)
                .order_by(MessageCopy.uid)
            )
            metas = tuple(
                MessageMeta(c.uid, _flags_set(c.flags), c.size, c.internal_date, c.modseq, pid) for c, pid in rows
            )
            return MailboxSnapshot(self._box_info(box), metas)

    # -- messages -------------------------------------------------------

    def _seal(self, raw: bytes | BinaryIO) -> tuple[str, str, int, bytes, bytes]:
        """Seal once; returns (public id, blob id, size, content key, head)."""
        src: BinaryIO = io.BytesIO(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        head = src.read(MAX_HEADER_SCAN)
        src.seek(0)
        end = head.find(b"\r\n\r\n")
        head = head if end < 0 else head[: end + 2]
        public_id = secrets.token_hex(16)
        key = crypto.new_content_key()
        writer = self.blobs.writer()
        with writer:
            size = crypto.seal_stream(src, writer, key, public_id.encode())
            blob_id = writer.commit()  # type: ignore[attr-defined]
        return public_id, blob_id, size, key, head

    def _index_thread(self, s: Session, head: bytes, participants: Iterable[str]) -> tuple[bytes | None, int]:
        parsed = threads.parse_thread_headers(head)
        key = threads.thread_key(s)
        own = threads.mid_hash(key, parsed.message_id) if parsed.message_id else None
        thread_id = None
        for ref in parsed.references:
            thread_id = s.scalar(
                select(Message.thread_id).where(Message.mid_hash == threads.mid_hash(key, ref)).limit(1)
            )
            if thread_id is not None:
                break
        if thread_id is None:
            t = Thread(created_at=_now())
            s.add(t)
            s.flush()
            thread_id = t.id
        known = set(s.scalars(select(ThreadParticipant.email).where(ThreadParticipant.thread_id == thread_id)))
        for email in {p.lower() for p in participants} - known:
            s.add(ThreadParticipant(thread_id=thread_id, email=email))
        return own, thread_id

    def _add_copy(
        self, s: Session, box: Mailbox, message: Message, wrapped: bytes, flags: Iterable[str], when: datetime, size: int
    ) -> int:
        uid = box.uidnext
        box.uidnext = uid + 1
        box.highestmodseq += 1
        s.add(
            MessageCopy(
                mailbox_id=box.id, uid=uid, message_id=message.id, flags=_flags_text(flags), internal_date=when,
                size=size, modseq=box.highestmodseq, wrapped_key=wrapped,
            )
        )
        return uid

    def _discard_blob(self, blob_id: str) -> None:
        with self._sessions() as s:
            used = s.scalar(select(Message.id).where(Message.blob_id == blob_id).limit(1))
        if used is None:
            self.blobs.delete(blob_id)

    def deliver(
        self,
        raw: bytes | BinaryIO,
        sender: str,
        recipients: Sequence[str],
        *,
        save_sent: bool = True,
        client_ip: str | None = None,
        protocol: str | None = None,
    ) -> DeliveryResult:
        """Seal ``raw`` once and file it in each recipient's INBOX (and the
        sender's Sent). All recipients or none: an unknown one fails the call
        before anything is stored."""
        if not recipients:
            raise InvalidInput("a message needs at least one recipient")
        with self._sessions() as s:
            sender_acct = self._account(s, sender)
            rcpt_accts = {a.email.lower(): a for a in (self._account(s, r) for r in recipients)}
        public_id, blob_id, size, key, head = self._seal(raw)
        now = _now()
        try:
            with unit_of_work(self._sessions) as s:
                msg = Message(public_id=public_id, blob_id=blob_id, size=size, created_at=now)
                own, thread_id = self._index_thread(s, head, [sender_acct.email, *rcpt_accts])
                msg.mid_hash, msg.thread_id = own, thread_id
                s.add(msg)
                s.flush()
                delivered = []
                for acct in rcpt_accts.values():
                    box = self._mailbox(s, acct.id, "INBOX", lock=True)
                    wrapped = crypto.wrap_content_key(key, acct.public_key, acct.key_owner.encode(), public_id.encode())
                    delivered.append((acct.email, self._add_copy(s, box, msg, wrapped, (), now, size)))
                sent_uid = None
                if save_sent:
                    box = self._mailbox(s, sender_acct.id, "Sent", lock=True)
                    wrapped = crypto.wrap_content_key(
                        key, sender_acct.public_key, sender_acct.key_owner.encode(), public_id.encode()
                    )
                    sent_uid = self._add_copy(s, box, msg, wrapped, ("\\Seen",), now, size)
                audit.record(
                    s, "message.deliver", actor=sender_acct.email, account=sender_acct.email, message=public_id,
                    client_ip=client_ip, protocol=protocol, detail=f"recipients={len(delivered)}",
                )
        except BaseException:
            self._discard_blob(blob_id)
            raise
        return DeliveryResult(public_id, tuple(delivered), sent_uid)

    def append(
        self,
        session: AccountSession,
        mailbox: str,
        raw: bytes | BinaryIO,
        flags: Iterable[str] = (),
        internal_date: datetime | None = None,
    ) -> AppendResult:
        """IMAP APPEND: seal and file into one of the account's mailboxes."""
        flags = _check_flags(flags)
        with self._sessions() as s:
            acct = s.get(Account, session.account_id)
            assert acct is not None
            self._mailbox(s, acct.id, mailbox)  # fail before sealing
        public_id, blob_id, size, key, head = self._seal(raw)
        when = internal_date or _now()
        try:
            with unit_of_work(self._sessions) as s:
                box = self._mailbox(s, session.account_id, mailbox, lock=True)
                msg = Message(public_id=public_id, blob_id=blob_id, size=size, created_at=_now())
                msg.mid_hash, msg.thread_id = self._index_thread(s, head, [acct.email])
                s.add(msg)
                s.flush()
                wrapped = crypto.wrap_content_key(key, acct.public_key, session.key_owner, public_id.encode())
                uid = self._add_copy(s, box, msg, wrapped, flags, when, size)
                audit.record(s, "message.append", actor=acct.email, account=acct.email, message=public_id)
                validity = box.uidvalidity
        except BaseException:
            self._discard_blob(blob_id)
            raise
        return AppendResult(validity, uid, public_id)

    def open_message(self, session: AccountSession, mailbox: str, uid: int) -> crypto.SealedReader:
        """A seekable plaintext reader; chunks are opened as they are read."""
        with self._sessions() as s:
            box = self._mailbox(s, session.account_id, mailbox)
            row = s.execute(
                select(MessageCopy.wrapped_key, Message.public_id, Message.blob_id)
                .join(Message, Message.id == MessageCopy.message_id)
                .where(MessageCopy.mailbox_id == box.id, MessageCopy.uid == uid)
            ).one_or_none()
        if row is None:
            raise MessageNotFound(f"no message with UID {uid} in {mailbox!r}")
        wrapped, public_id, blob_id = row
        key = crypto.unwrap_content_key(wrapped, session.private_key, session.key_owner, public_id.encode())
        src = self.blobs.open(blob_id)
        try:
            return crypto.SealedReader(src, key, public_id.encode())
        except BaseException:
            # A refused blob stays the caller's to close (SealedReader's
            # contract); without this every refused open leaks a descriptor.
            src.close()
            raise

    def set_flags(
        self,
        session: AccountSession,
        mailbox: str,
        uids: Sequence[int],
        flags: Iterable[str],
        mode: Literal["set", "add", "remove"] = "set",
    ) -> dict[int, frozenset[str]]:
        """STORE FLAGS / +FLAGS / -FLAGS; returns the new flags per UID."""
        wanted = _check_flags(flags)
        out: dict[int, frozenset[str]] = {}
        with unit_of_work(self._sessions) as s:
            box = self._mailbox(s, session.account_id, mailbox, lock=True)
            copies = s.scalars(
                select(MessageCopy).where(MessageCopy.mailbox_id == box.id, MessageCopy.uid.in_(list(uids)))
            )
            for c in copies:
                old = _flags_set(c.flags)
                new = wanted if mode == "set" else (old | wanted if mode == "add" else old - wanted)
                if new != old:
                    box.highestmodseq += 1
                    c.flags, c.modseq = _flags_text(new), box.highestmodseq
                out[c.uid] = new
        return out

    def copy(self, session: AccountSession, mailbox: str, uids: Sequence[int], dest: str) -> CopyResult:
        return self._copy(session, mailbox, uids, dest, move=False)

    def move(self, session: AccountSession, mailbox: str, uids: Sequence[int], dest: str) -> CopyResult:
        return self._copy(session, mailbox, uids, dest, move=True)

    def _copy(self, session: AccountSession, mailbox: str, uids: Sequence[int], dest: str, *, move: bool) -> CopyResult:
        # The wrapped key is bound to the account and message, not the
        # mailbox, so a copy inside one account re-uses it: no private key,
        # no re-encryption.
        pairs = []
        with unit_of_work(self._sessions) as s:
            src = self._mailbox(s, session.account_id, mailbox, lock=True)
            dst = self._mailbox(s, session.account_id, dest, lock=True)
            copies = list(
                s.scalars(
                    select(MessageCopy)
                    .where(MessageCopy.mailbox_id == src.id, MessageCopy.uid.in_(list(uids)))
                    .order_by(MessageCopy.uid)
                )
            )
            for c in copies:
                msg = s.get(Message, c.message_id)
                assert msg is not None
                flags = _flags_set(c.flags)
                pairs.append((c.uid, self._add_copy(s, dst, msg, c.wrapped_key, flags, c.internal_date, c.size)))
                if move:
                    s.delete(c)
            if move and copies:
                src.highestmodseq += 1
            validity = dst.uidvalidity
        return CopyResult(validity, tuple(pairs))

    def expunge(self, session: AccountSession, mailbox: str, uids: Sequence[int] | None = None) -> list[int]:
        """Remove messages flagged \\Deleted (only among ``uids`` if given,
        as UID EXPUNGE, RFC 4315 §2.1); returns the removed UIDs ascending."""
        with unit_of_work(self._sessions) as s:
            box = self._mailbox(s, session.account_id, mailbox, lock=True)
            q = select(MessageCopy).where(MessageCopy.mailbox_id == box.id).order_by(MessageCopy.uid)
            if uids is not None:
                q = q.where(MessageCopy.uid.in_(list(uids)))
            doomed = [c for c in s.scalars(q) if "\\Deleted" in _flags_set(c.flags)]
            message_ids = {c.message_id for c in doomed}
            for c in doomed:
                s.delete(c)
            if doomed:
                box.highestmodseq += 1
            s.flush()
            orphan_blobs = self._drop_orphans(s, message_ids)
        for blob_id in orphan_blobs:
            self._discard_blob(blob_id)
        return [c.uid for c in doomed]

    @staticmethod
    def _drop_orphans(s: Session, message_ids: set[int]) -> list[str]:
        blobs = []
        for mid in message_ids:
            if s.scalar(select(MessageCopy.id).where(MessageCopy.message_id == mid).limit(1)) is None:
                msg = s.get(Message, mid)
                if msg is not None:
                    blobs.append(msg.blob_id)
                    s.execute(delete(Message).where(Message.id == mid))
        return blobs
