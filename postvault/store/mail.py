"""Mailboxes and sealed messages: delivery, APPEND, reading, flags,
COPY/MOVE and EXPUNGE, and the thread index they keep up to date."""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import BinaryIO, Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from ..errors import InvalidInput, MailboxExists, MailboxNotFound, MessageNotFound
from . import audit, crypto, threads
from .db import unit_of_work
from .models import Account, Mailbox, Message, MessageCopy, Thread, ThreadParticipant
from .types import (
    AccountSession,
    AppendResult,
    BlobStore,
    CopyResult,
    DeliveryResult,
    MailboxInfo,
    MailboxSnapshot,
    MessageMeta,
    check_flags,
    flags_set,
    flags_text,
    new_uidvalidity,
    now,
)

MAX_HEADER_SCAN = 256 * 1024


class MailStore:
    """The mail half of ``Store``."""

    _sessions: sessionmaker[Session]
    blobs: BlobStore
    _account: Callable[[Session, str], Account]  # from AccountStore


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
                account_id=session.account_id, name=name, special_use=None, uidvalidity=new_uidvalidity(),
                uidnext=1, highestmodseq=1, subscribed=True, created_at=now(),
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
                MessageMeta(c.uid, flags_set(c.flags), c.size, c.internal_date, c.modseq, pid) for c, pid in rows
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

    def _index_thread(
        self, s: Session, head: bytes, participants: Iterable[str], holder_id: int
    ) -> tuple[bytes | None, int]:
        """Keyed hash of the Message-ID, and the thread this message joins.

        A message joins the thread of a message it cites only if the account
        filing it holds that message and the server delivered it: knowing or
        guessing a Message-ID, or APPENDing a made-up message, must not let
        anyone into a conversation.
        """
        parsed = threads.parse_thread_headers(head)
        key = threads.thread_key(s)
        own = threads.mid_hash(key, parsed.message_id) if parsed.message_id else None
        thread_id = self._held_thread(s, holder_id, [threads.mid_hash(key, ref) for ref in parsed.references])
        if thread_id is None:
            t = Thread(created_at=now())
            s.add(t)
            s.flush()
            thread_id = t.id
        known = set(s.scalars(select(ThreadParticipant.email).where(ThreadParticipant.thread_id == thread_id)))
        for email in {p.lower() for p in participants} - known:
            s.add(ThreadParticipant(thread_id=thread_id, email=email))
        return own, thread_id

    @staticmethod
    def _held_threads(s: Session, holder_id: int):  # type: ignore[no-untyped-def]
        """Delivered messages the account holds, as a query to refine."""
        return (
            select(Message.thread_id)
            .join(MessageCopy, MessageCopy.message_id == Message.id)
            .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
            .where(Mailbox.account_id == holder_id, Message.origin == "submission", Message.thread_id.is_not(None))
        )

    def _held_thread(self, s: Session, holder_id: int, hashes: Sequence[bytes]) -> int | None:
        for h in hashes:  # In-Reply-To first, then References newest first
            found = s.scalar(self._held_threads(s, holder_id).where(Message.mid_hash == h).limit(1))
            if found is not None:
                return found
        return None

    def thread_facts(self, sender: str, head: bytes) -> tuple[tuple[str, ...], bool, frozenset[str]]:
        """For the reply-only policy: the Message-IDs the header block cites,
        whether the sender holds (as delivered mail) one of them, and the
        participants of that conversation."""
        parsed = threads.parse_thread_headers(head)
        cited = tuple(ref.decode("utf-8", "replace") for ref in parsed.references)
        with self._sessions() as s:
            acct = self._account(s, sender)
            key = threads.thread_key(s) if parsed.references else b""
            thread_id = self._held_thread(s, acct.id, [threads.mid_hash(key, r) for r in parsed.references])
            if thread_id is None:
                return cited, False, frozenset()
            people = s.scalars(select(ThreadParticipant.email).where(ThreadParticipant.thread_id == thread_id))
            return cited, True, frozenset(people)

    def conversation_partners(self, sender: str) -> frozenset[str]:
        """Everyone the sender shares a delivered conversation with."""
        with self._sessions() as s:
            acct = self._account(s, sender)
            held = self._held_threads(s, acct.id).distinct().subquery()
            people = s.scalars(
                select(ThreadParticipant.email).where(ThreadParticipant.thread_id.in_(select(held.c.thread_id)))
            )
            return frozenset(p for p in people if p != acct.email.lower())

    def _add_copy(
        self, s: Session, box: Mailbox, message: Message, wrapped: bytes, flags: Iterable[str], when: datetime, size: int
    ) -> int:
        uid = box.uidnext
        box.uidnext = uid + 1
        box.highestmodseq += 1
        s.add(
            MessageCopy(
                mailbox_id=box.id, uid=uid, message_id=message.id, flags=flags_text(flags), internal_date=when,
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
        stamp = now()
        try:
            with unit_of_work(self._sessions) as s:
                msg = Message(public_id=public_id, blob_id=blob_id, size=size, origin="submission", created_at=stamp)
                own, thread_id = self._index_thread(s, head, [sender_acct.email, *rcpt_accts], sender_acct.id)
                msg.mid_hash, msg.thread_id = own, thread_id
                s.add(msg)
                s.flush()
                delivered = []
                for acct in rcpt_accts.values():
                    box = self._mailbox(s, acct.id, "INBOX", lock=True)
                    wrapped = crypto.wrap_content_key(key, acct.public_key, acct.key_owner.encode(), public_id.encode())
                    delivered.append((acct.email, self._add_copy(s, box, msg, wrapped, (), stamp, size)))
                sent_uid = None
                if save_sent:
                    box = self._mailbox(s, sender_acct.id, "Sent", lock=True)
                    wrapped = crypto.wrap_content_key(
                        key, sender_acct.public_key, sender_acct.key_owner.encode(), public_id.encode()
                    )
                    sent_uid = self._add_copy(s, box, msg, wrapped, ("\\Seen",), stamp, size)
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
        flags = check_flags(flags)
        with self._sessions() as s:
            self._mailbox(s, session.account_id, mailbox)  # fail before sealing
        public_id, blob_id, size, key, head = self._seal(raw)
        when = internal_date or now()
        try:
            with unit_of_work(self._sessions) as s:
                box = self._mailbox(s, session.account_id, mailbox, lock=True)
                msg = Message(public_id=public_id, blob_id=blob_id, size=size, origin="append", created_at=now())
                msg.mid_hash, msg.thread_id = self._index_thread(s, head, [session.email], session.account_id)
                s.add(msg)
                s.flush()
                wrapped = crypto.wrap_content_key(key, session.public_key, session.key_owner, public_id.encode())
                uid = self._add_copy(s, box, msg, wrapped, flags, when, size)
                audit.record(s, "message.append", actor=session.email, account=session.email, message=public_id)
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
        wanted = check_flags(flags)
        out: dict[int, frozenset[str]] = {}
        with unit_of_work(self._sessions) as s:
            box = self._mailbox(s, session.account_id, mailbox, lock=True)
            copies = s.scalars(
                select(MessageCopy).where(MessageCopy.mailbox_id == box.id, MessageCopy.uid.in_(list(uids)))
            )
            for c in copies:
                old = flags_set(c.flags)
                new = wanted if mode == "set" else (old | wanted if mode == "add" else old - wanted)
                if new != old:
                    box.highestmodseq += 1
                    c.flags, c.modseq = flags_text(new), box.highestmodseq
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
                flags = flags_set(c.flags)
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
            doomed = [c for c in s.scalars(q) if "\\Deleted" in flags_set(c.flags)]
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
