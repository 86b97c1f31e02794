"""What the submission server decides: AUTH, MAIL, RCPT and DATA.

aiosmtpd calls these hooks after its own parsing (``protocol.py``); each
returns the reply. Slow work runs on a worker thread (``asyncio.to_thread``):
bcrypt, sealing a large message, reads over the network (PostgreSQL),
invitations (a key pair each), which would otherwise stop every other
session on the loop. Small work runs on the loop itself: RCPT's lookups and
DATA's checks and sealing of a message of at most ``smallblobs.SMALL_MAX``
bytes, when the store's reads are local (``Store.local_reads``: a SQLite
file). That is a millisecond or two of CPU, never a file fsync (a small
message's blob is written by the commit), and a hop to a worker thread
and back cost more than that on a loaded 2-core machine: the loop and the
worker threads handing the GIL to each other took about 530 futex calls
per message (``strace -c``; about 50 without the hops), and the server's
CPU per 10 KB message fell by 10-20 % without them (docs/benchmarks.md).

The order of checks follows maddy's per-stage checks:

- AUTH PLAIN / LOGIN (RFC 4616, RFC 4954): ``postvault.login.authenticate``
  with the policy's auth limits; one answer (535 5.7.8) for an unknown user
  and a wrong password, in about the same time (bcrypt runs for both).
  aiosmtpd's ``authenticator`` callback is synchronous, so these are async
  ``auth_*`` methods on the handler, which aiosmtpd prefers to its own.
- MAIL: the envelope sender must be the account (553 5.7.1); the policy
  is taken once for the transaction, and the address book read once, with
  the first recipient's account (the sender's conversation partners too,
  if a recipient needs them).
- RCPT: each recipient at once (``policy.recipients.check_recipient``):
  550 5.1.1 for no account, 550 5.7.1 for one the sender may not write to;
  more than ``[smtp] max_recipients`` get 452 4.5.3 (RFC 5321 section
  4.5.3.1.10).
- DATA (after ``protocol.py`` checked the wire format): the From (and any
  Sender) header must be the account (553 5.7.1); then the conversation
  rules with the message's thread (``check_conversation``); then the
  attachments, with the exceptions of the member offices in the
  conversation. Only then Received, and a missing Message-ID or Date, are
  added (RFC 5321 section 4.4, RFC 6409 section 8), the message is sealed
  (``Store.prepare_delivery``) and committed by the store's group commit
  (``Store.submit_delivery``: several messages per transaction, each
  future resolved after the commit that holds it), its recipients'
  notifications claimed and queued in that same transaction, and 250 2.0.0 names
  the queue id. A refusal stores nothing. All of DATA's checks and the
  sealing run in one call per message (on the loop or a worker thread, as
  above).

Log lines carry the session id, the account and rule ids only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.errors
import email.policy
import email.utils
import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from email.parser import HeaderParser
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import AuthResult
from sqlalchemy import Connection

from ..errors import AuthenticationFailed, LoginLimited
from ..login import authenticate
from ..mime import headerobjects
from ..notices.hooks import invite_and_send, notify_filed, outbound_queue
from ..policy.attachments import check_attachments
from ..policy.decision import Decision
from ..policy.recipients import Recipient, Role, Sender, ThreadFacts, check_conversation, check_recipient
from ..store.delivery import PreparedDelivery
from ..store.smallblobs import SMALL_MAX
from ..store.types import MAX_HEADER_SCAN, AccountInfo, DeliveryResult
from . import replies

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .protocol import SubmissionEnvelope, SubmissionProtocol, SubmissionSession

log = logging.getLogger("postvault.smtpd")

_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:(?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)*(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_HEADER = re.compile(rb"^(Message-ID|Date)[ \t]*:", re.IGNORECASE | re.MULTILINE)
# Without these a message starts a conversation (check_conversation's
# thread=None), and the store need not be asked about its thread.
_THREAD_HEADER = re.compile(rb"^(In-Reply-To|References)[ \t]*:", re.IGNORECASE | re.MULTILINE)
# Header-spoofing shapes that Python's parser reads one way and some mail
# programs another (J. Chen, V. Paxson, J. Jiang, "Composition Kills: A
# Case Study of Email Sender Authentication", USENIX Security 2020): a
# From or Sender field name followed by white space before the colon
# (obsolete syntax, RFC 5322 section 4.5.3; Python skips the field, others
# show it), and a header section whose first line is folded (RFC 5322
# section 2.2.3 forbids it; readers differ on which field it joins).
_SPACED_FROM = re.compile(rb"^(?:From|Sender)[ \t]+:", re.IGNORECASE | re.MULTILINE)
# Something shaped like an address, in a display name or a comment.
_ADDRESS_LIKE = re.compile(r"[^\s<>()\[\]\"',;:@]+@[^\s<>()\[\]\"',;:@]+\.[^\s<>()\[\]\"',;:@]+")
# What the email package may raise on a hostile header (see
# policy/attachments.py); such a From is "cannot be read", not a crash.
_HEADER_ERRORS = (email.errors.MessageError, IndexError, ValueError, TypeError, AttributeError, LookupError)


class SubmissionHandler:
    """aiosmtpd handler for both submission listeners."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self._queue = outbound_queue(runtime.store, runtime.config)
        # Small work on the loop (see the module docstring).
        self._small_on_loop = runtime.store.local_reads
        # Deliveries need no limit here: sealing runs on the loop or worker
        # threads, and the commits are one thread's (the store's group commit), so no
        # queue of writers sleeps in SQLite's busy handler. Notifications
        # after delivery go through the same writer thread, batched too
        # (see _notify_batch).

    # -- AUTH (RFC 4954) -------------------------------------------------------
    # Only these two methods may start with "auth_": aiosmtpd offers every
    # handler attribute of that name as a mechanism.

    async def auth_PLAIN(self, server: SubmissionProtocol, args: list[str]) -> AuthResult:
        """RFC 4616: [authzid] NUL authcid NUL passwd, base64, as an initial
        response or after an empty challenge."""
        blob = await _response(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, user, password = parts
        if authzid and authzid != user:
            # Acting for another user (RFC 4616 section 2) is not offered.
            return AuthResult(success=False, handled=False, message=replies.AUTH_AUTHZID)
        return await self._login(server, user, password, "PLAIN")

    async def auth_LOGIN(self, server: SubmissionProtocol, args: list[str]) -> AuthResult:
        """The LOGIN mechanism (draft-murchison-sasl-login): user name and
        password in two base64 challenges; many clients still use it."""
        user = await _response(server, args, replies.LOGIN_USERNAME_CHALLENGE)
        if user is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(replies.LOGIN_PASSWORD_CHALLENGE)
        if not isinstance(password, bytes):  # MISSING: cancelled or not base64, already answered
            return AuthResult(success=False, handled=True)
        return await self._login(server, user, password, "LOGIN")

    async def _login(self, server: SubmissionProtocol, user: bytes, password: bytes, mechanism: str) -> AuthResult:
        try:
            # No account has a name that is not UTF-8 (RFC 4616 section 2).
            name = user.decode("utf-8")
        except UnicodeDecodeError:
            log.info("session=%s auth failed mechanism=%s", server.sid, mechanism)
            return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)
        # A password is bytes to us; surrogateescape keeps them all, and
        # password_bytes() turns them back without raising.
        secret = password.decode("utf-8", "surrogateescape")
        policy = self.runtime.policy.policy
        try:
            info = await asyncio.to_thread(authenticate, self.store, policy, name, secret,
                                           client_ip=server.peer_ip or None, protocol="smtp", unwrap=False)
        except AuthenticationFailed:
            # Never log the typed name: it is sometimes a password.
            log.info("session=%s auth failed mechanism=%s", server.sid, mechanism)
            return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)
        except LoginLimited as exc:
            decision = cast(Decision, exc.decision)
            log.info("session=%s auth limited rule=%s", server.sid, decision.rule)
            return AuthResult(success=False, handled=False, message=decision.smtp_reply)
        log.info("session=%s auth ok account=%s mechanism=%s", server.sid, info.email, mechanism)
        return AuthResult(success=True, auth_data=info, message=replies.AUTH_OK)

    async def refused(self, server: SubmissionProtocol, stage: str, rule: str, code: int) -> None:
        """Log and audit a refusal: the rule id and reply code say why; no
        address the client typed, no header, no file name."""
        account = server.account
        log.info("session=%s account=%s refused stage=%s rule=%s code=%d", server.sid,
                 account.email if account else "-", stage, rule, code)
        if account is not None:
            await asyncio.to_thread(self.store.record_event, "message.refused", actor=account.email,
                                    account=account.email, client_ip=server.peer_ip or None, protocol="smtp",
                                    detail=f"stage={stage} rule={rule} code={code}")

    # -- MAIL ---------------------------------------------------------------------

    async def handle_MAIL(self, server: SubmissionProtocol, session: SubmissionSession,
                          envelope: SubmissionEnvelope, address: str, mail_options: list[str]) -> str:
        account = server.account
        if account is None:  # aiosmtpd checked already; a second lock on the door
            return replies.AUTH_FIRST
        if address.lower() != account.email.lower():
            await self.refused(server, "mail", "sender.not-account", 553)
            return replies.SENDER_NOT_YOU.format(given=address, account=account.email)
        # The address book is read with the first recipient's account, in
        # the same worker-thread call (_lookup): once per transaction, as
        # before, and one hop off the loop per message fewer.
        envelope.policy = self.runtime.policy.policy
        envelope.sender = None
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    # -- RCPT ---------------------------------------------------------------------

    async def handle_RCPT(self, server: SubmissionProtocol, session: SubmissionSession,
                          envelope: SubmissionEnvelope, address: str, rcpt_options: list[str]) -> str:
        account = server.account
        if account is None or envelope.policy is None:
            return replies.AUTH_FIRST if account is None else "503 Error: need MAIL command"
        key = address.lower()
        if key in (r.lower() for r in envelope.rcpt_tos):
            return replies.RECIPIENT_OK  # listed twice: delivered once
        limit = server.limits.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            await self.refused(server, "rcpt", "recipients.too-many", 452)
            return replies.TOO_MANY_RECIPIENTS.format(limit=limit)
        with_book = envelope.sender is None
        if self._small_on_loop:
            book, found = self._lookup(account.email, address, with_book)
        else:
            book, found = await asyncio.to_thread(self._lookup, account.email, address, with_book)
        sender = envelope.sender
        if sender is None:
            assert book is not None
            sender = envelope.sender = Sender(account.email, cast(Role, account.role),
                                              frozenset(a.lower() for a in book))
        # A disabled account receives nothing, like one that does not exist.
        role = cast(Role, found.role) if found is not None and found.state != "disabled" else None
        invite = found is None and sender.role == "member" and key in sender.address_book
        if invite:
            role = "colleague"  # it will be one, pending, once the message is accepted
        rcpt = Recipient(found.email if found and role else address, role)
        decision = check_recipient(sender, rcpt, envelope.policy)
        if not decision.allowed and role is not None:
            # A shared conversation only ever allows more, so the sender's
            # conversation partners (a query that grows with its mailbox)
            # are looked up only when they could change the answer.
            if envelope.partners is None:
                envelope.partners = await asyncio.to_thread(self.store.conversation_partners,
                                                            sender.email)
            if key in envelope.partners:
                rcpt = Recipient(rcpt.email, role, shares_conversation=True)
                decision = check_recipient(sender, rcpt, envelope.policy)
        if not decision.allowed:
            await self.refused(server, "rcpt", decision.rule, decision.code)
            return decision.smtp_reply
        envelope.rcpt_tos.append(rcpt.email)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.recipients.append(rcpt)
        if invite:
            envelope.to_invite.append(rcpt.email)
        return replies.RECIPIENT_OK

    def _lookup(self, sender: str, address: str, with_book: bool) -> tuple[list[str] | None, AccountInfo | None]:
        """RCPT's reads: the recipient's account and, for
        the transaction's first recipient, the sender's address book."""
        book = self.store.contacts(sender) if with_book else None
        return book, self.store.accounts([address]).get(address.lower())

    # -- DATA ---------------------------------------------------------------------

    async def handle_DATA(self, server: SubmissionProtocol, session: SubmissionSession,
                          envelope: SubmissionEnvelope) -> str:
        account = server.account
        policy, sender = envelope.policy, envelope.sender
        if account is None or policy is None or sender is None:
            return replies.AUTH_FIRST
        raw = envelope.content
        assert isinstance(raw, bytes)
        end = raw.find(b"\r\n\r\n", 0, MAX_HEADER_SCAN)
        if end < 0 and len(raw) > MAX_HEADER_SCAN:
            await self.refused(server, "data", "header.too-long", 554)
            return ("554 5.6.0 The header section of the message is longer than "
                    f"{MAX_HEADER_SCAN // 1024} KiB; the mail program sent a malformed message.")
        head_end = len(raw) if end < 0 else end + 2
        final = _stamp(server, session, envelope, raw, head_end)
        # Every check, the invitations and sealing in one call: one hop off
        # the loop per message at most, none for a small one.
        args = (account.email, envelope, raw, head_end, final, server.peer_ip or None)
        if self._small_on_loop and len(final) <= SMALL_MAX and not envelope.to_invite:
            outcome = self._check_and_prepare(*args)
        else:
            prepare = asyncio.ensure_future(asyncio.to_thread(self._check_and_prepare, *args))
            try:
                outcome = await asyncio.shield(prepare)
            except asyncio.CancelledError:
                # The session went away (client gone, server stopping) while
                # the message was being sealed. The thread cannot be stopped and
                # writes the sealed blob; nothing will submit it, so it is
                # dropped when sealing ends, not left for the next start's sweep
                # (found on a slow disk: fsck's orphan-blob, tests/crash/test_slow_disk.py).
                prepare.add_done_callback(self._discard_abandoned)
                raise
        if isinstance(outcome, _Refusal):
            await self.refused(server, "data", outcome.rule, outcome.code)
            return outcome.reply
        # Group commit (store/groupcommit.py): the future resolves once the
        # transaction holding this message has committed. Shielded: a
        # session that goes away meanwhile must not cancel a commit that
        # others share (the message may still be stored, as after a crash
        # right after the commit; a client that saw no 250 sends again).
        # The recipients' notifications are claimed and queued in that same
        # transaction (``_notify``), so they cost no second commit.
        result = await asyncio.shield(asyncio.wrap_future(self.store.submit_delivery(outcome, then=self._notify)))
        # Stored: from here on nothing may turn the 250 into a failure.
        log.info("session=%s account=%s accepted queue_id=%s recipients=%d size=%d", server.sid, account.email,
                 result.message_id, len(result.delivered), len(final))
        return replies.QUEUED.format(queue_id=result.message_id)

    def _discard_abandoned(self, prepare: asyncio.Future[_Refusal | PreparedDelivery]) -> None:
        """Drop the blob of a message sealed for a session that is gone."""
        if prepare.cancelled():
            return
        if prepare.exception() is not None:
            return  # nothing was kept; the session that would report it is gone
        outcome = prepare.result()
        if isinstance(outcome, PreparedDelivery):
            done = asyncio.get_running_loop().run_in_executor(None, self.store.discard_delivery, outcome)
            done.add_done_callback(_discarded)

    def _check_and_prepare(self, email: str, envelope: SubmissionEnvelope, raw: bytes, head_end: int,
                           final: bytes, client_ip: str | None) -> _Refusal | PreparedDelivery:
        """DATA's checks in order (on the loop or a worker thread): From, the
        conversation rules, the attachments; then the invitations and the
        sealing (``Store.prepare_delivery``). A refusal stores nothing."""
        policy, sender = envelope.policy, envelope.sender
        assert policy is not None and sender is not None
        head = raw[:head_end]
        refusal = _check_from(head, email)
        if refusal is not None:
            return _Refusal(refusal[0], 553, refusal[1])

        thread = None
        if _THREAD_HEADER.search(head):
            cited, held, participants = self.store.thread_facts(email, head)
            thread = ThreadFacts(cited, held, participants) if cited else None
        decision = check_conversation(sender, envelope.recipients, thread, policy)
        if not decision.allowed:
            return _Refusal(decision.rule, decision.code, decision.smtp_reply)

        # The exceptions of every member office in this conversation.
        offices = [r.email for r in envelope.recipients if r.role == "member"]
        if sender.role == "member":
            offices.append(sender.email)
        # policy.toml's exceptions plus what each office allowed itself on its
        # settings page, within the admin's bounds.
        allowed = self.store.conversation_allowances(offices, policy)
        decision = check_attachments(raw, policy.attachments, allowed)
        if not decision.allowed:
            return _Refusal(decision.rule, decision.code, decision.smtp_reply)

        config = self.runtime.config
        for colleague in envelope.to_invite:
            # The pending account (and its key pair) must exist before the
            # message is sealed to it; the sign-up email goes to the queue.
            invite_and_send(self.store, config, email, colleague, actor=email)
        return self.store.prepare_delivery(final, email, list(envelope.rcpt_tos), client_ip=client_ip,
                                           protocol="smtp")

    def _notify(self, conn: Connection, prepared: PreparedDelivery, result: DeliveryResult) -> int:
        """New-mail notifications for a message being filed, inside its
        transaction (on the store's writer thread; see ``notify_filed``)."""
        return notify_filed(conn, self.runtime.config, self._queue, result, prepared.sender.practice_name)


@dataclass(frozen=True)
class _Refusal:
    rule: str
    code: int
    reply: str


async def _response(server: SubmissionProtocol, args: list[str], challenge: str) -> bytes | None:
    """The client's first SASL response: the initial response on the AUTH
    line ("=" is the empty one, RFC 4954 section 4), else the answer to
    ``challenge``. None if it was cancelled or malformed (already answered)."""
    if len(args) == 1:
        blob = await server.challenge_auth(challenge)
        return blob if isinstance(blob, bytes) else None
    if args[1] == "=":
        return b""
    try:
        return base64.b64decode(args[1].encode("ascii", "replace"), validate=True)
    except (binascii.Error, ValueError):
        await server.push("501 5.5.2 Can't decode base64")
        return None




def _check_from(head: bytes, account: str) -> tuple[str, str] | None:
    """(rule, reply) if From (or Sender) is not exactly the account, or
    could be read by some mail program as someone else (see _SPACED_FROM)."""
    if _SPACED_FROM.search(head) or head[:1] in (b" ", b"\t"):
        return "header.from-unreadable", replies.FROM_UNREADABLE.format(account=account)
    try:
        # UTF-8 headers (RFC 6532) decode as text; anything else survives
        # as surrogates and simply matches no account.
        froms, senders = _from_fields(head.decode("utf-8", "surrogateescape"))
        if not froms:
            return "header.from-missing", replies.NO_FROM.format(account=account)
        if len(froms) != 1 or len(senders) > 1:
            return "header.from-unreadable", replies.FROM_UNREADABLE.format(account=account)
        addresses = froms[0].addresses
        # A field Python had to guess at (e.g. a folded second "From:" inside
        # it) may be read differently by the recipient's program.
        if len(addresses) != 1 or _invalid(froms[0]) or any(_invalid(h) for h in senders):
            return "header.from-unreadable", replies.FROM_UNREADABLE.format(account=account)
        given = addresses[0].addr_spec
        if given.lower() != account.lower():
            return "header.from-not-account", replies.FROM_NOT_YOU.format(given=_printable(given), account=account)
        # "front@clinic.test" <office@dental.test>: many programs show only
        # the display name (or a comment), so another address there is a
        # spoof too (Composition Kills, display-name attacks).
        for text in (froms[0].addresses[0].display_name, str(froms[0]), _raw_field(head, b"From")):
            for shown in _ADDRESS_LIKE.findall(text):
                if shown.lower() != account.lower():
                    return "header.from-not-account", replies.FROM_NOT_YOU.format(given=_printable(shown),
                                                                                   account=account)
        if senders:
            sender_addrs = senders[0].addresses
            if len(sender_addrs) != 1 or sender_addrs[0].addr_spec.lower() != account.lower():
                shown = sender_addrs[0].addr_spec if sender_addrs else "unreadable"
                return "header.sender-not-account", replies.SENDER_HEADER_NOT_YOU.format(
                    given=_printable(shown), account=account)
    except _HEADER_ERRORS:
        return "header.from-unreadable", replies.FROM_UNREADABLE.format(account=account)
    return None


def _from_fields(head: str) -> tuple[list[Any], list[Any]]:
    """The From and Sender fields of a header section, as
    ``email.policy.default`` gives them (``get_all``).

    The header section is split into fields with compat32, which stores
    each field's raw value exactly as the default policy does (both
    ``header_source_parse`` are the same code), and only the From and
    Sender fields are then turned into the default policy's header objects
    (``header_fetch_parse``, what ``get_all`` calls; ``mime.headerobjects``
    keeps the objects of recent values, such as the account's own From
    line). The same objects as a default-policy parse, without that parse
    building a Content-Type header object that this check never reads.
    """
    msg = HeaderParser(policy=email.policy.compat32).parsestr(head, headersonly=True)
    fetch = headerobjects.fetched  # header_fetch_parse, with objects shared between messages
    froms: list[Any] = []  # AddressHeader objects
    senders: list[Any] = []
    for name, value in msg.raw_items():
        key = name.lower()
        if key == "from":
            froms.append(fetch(name, value))
        elif key == "sender":
            senders.append(fetch(name, value))
    return froms, senders


def _invalid(header: object) -> bool:
    """Whether the parser found the field malformed (obsolete syntax such as
    an unquoted "Dr. Smith" is fine; an invalid address list is not)."""
    return any(isinstance(d, email.errors.InvalidHeaderDefect) for d in getattr(header, "defects", ()))


def _raw_field(head: bytes, name: bytes) -> str:
    """The unfolded raw value(s) of one field, as text."""
    found = re.findall(rb"^" + name + rb"[ \t]*:(.*(?:\r?\n[ \t].*)*)", head, re.IGNORECASE | re.MULTILINE)
    return " ".join(v.decode("utf-8", "replace") for v in found)


def _printable(text: str) -> str:
    """An address for a reply line: printable, bounded."""
    clean = "".join(c if c.isprintable() else "?" for c in text)  # surrogates are not printable
    return clean[:254]


def _stamp(server: SubmissionProtocol, session: SubmissionSession, envelope: SubmissionEnvelope, raw: bytes,
           head_end: int) -> bytes:
    """``raw`` with our Received header on top and, if missing, Message-ID
    and Date at the end of the header section (RFC 6409 section 8)."""
    now = datetime.now(timezone.utc)
    date = email.utils.format_datetime(now)
    ip = server.peer_ip or "unknown"
    literal = _address_literal(ip)
    # The HELO name is the client's claim; the address literal beside it is
    # what we saw (RFC 5321 section 4.4). A HELO that is not a plain domain
    # or literal is left out rather than quoted into a header.
    helo = session.host_name or ""
    claimed = helo if (_DOMAIN.match(helo) or helo == literal) else literal
    lines = [
        f"Received: from {claimed} ({literal})",
        f"\tby {server.hostname} (Postvault) with ESMTPSA",
        f"\t({server.tls_summary()})",
    ]
    # "for" only with one recipient: with several, it would show every
    # reader the others, Bcc included.
    if len(envelope.rcpt_tos) == 1:
        lines.append(f"\tfor <{envelope.rcpt_tos[0]}>; {date}")
    else:
        lines[-1] += f"; {date}"
    received = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    present = {m.group(1).lower() for m in _HEADER.finditer(raw, 0, head_end)}
    added = b""
    if b"message-id" not in present:
        added += f"Message-ID: <{secrets.token_hex(16)}@{server.hostname}>\r\n".encode()
    if b"date" not in present:
        added += f"Date: {date}\r\n".encode()
    return b"".join((received, raw[:head_end], added, raw[head_end:]))


def _address_literal(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "[unknown]"
    return f"[IPv6:{addr}]" if addr.version == 6 else f"[{addr}]"


def _discarded(done: asyncio.Future[None]) -> None:
    """The end of ``Store.discard_delivery`` for an abandoned message."""
    if not done.cancelled() and done.exception() is not None:
        log.warning("an abandoned message's blob was not removed (%s); the next start's sweep removes it",
                    type(done.exception()).__name__)
