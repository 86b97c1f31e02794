"""Postvault's IMAP server: ``twisted.mail.imap4.IMAP4Server``, extended.

We keep Twisted's protocol skeleton (``LineReceiver`` + ``TimeoutMixin``,
the states unauth/auth/select/logout, ``<state>_<COMMAND>`` tuples looked up
by ``lookupCommand``, the response helpers, the cred ``Portal``, the SASL
challengers) and replace what cannot carry a secure server:

- **Reading commands.** Twisted parses arguments as it reads and stores big
  literals in ``tempfile.TemporaryFile`` (plaintext mail on disk). We read
  the whole command first, checking each literal's size against the limits
  *before* sending ``+`` (RFC 3501 §7.5, RFC 7888 LITERAL+ with LITERAL-
  semantics: non-synchronizing literals up to 4096 octets; RFC 7889
  APPENDLIMIT answers ``NO [TOOBIG]``), in memory only, then parse it with
  ``parse.py`` so every malformed command gets ``BAD <reason>``.
- **Serialization** (twisted#9282). A command whose work is still running
  pauses reading (``LineReceiver.pauseProducing`` keeps the bytes already
  received in its buffer); the next pipelined command starts only after
  the tagged response, so a SELECT that is still loading never lets the
  next command run in the old state.
- **Asynchronous backend.** Every handler is a coroutine awaiting Deferreds
  from the service's thread pool; Twisted's handlers call ``create``,
  ``delete``, the ``IMailbox`` getters and ``IMessage`` synchronously.
- **Untagged updates** (RFC 3501 §7.4.1, §5.5). The session's view
  (``mailbox.SelectedMailbox``) catches up with the store only before a
  tagged response or during IDLE; EXPUNGE is never sent during FETCH,
  STORE or SEARCH (their UID forms allow it, RFC 3501 §7.4.1). Catching
  up is incremental: the change bus names what changed, and one small read
  (rows above the view's modseq, the message count) brings the view level,
  so a change costs every session that has the mailbox open one indexed
  query, not a re-read of the mailbox.
- **Extensions** Twisted lacks: LITERAL+, SASL-IR (RFC 4959), ID (RFC 2971),
  ENABLE (RFC 5161), UNSELECT (RFC 3691), UIDPLUS (RFC 4315), MOVE (RFC 6851),
  SPECIAL-USE (RFC 6154), CHILDREN (RFC 3348), APPENDLIMIT (RFC 7889); IDLE
  (RFC 2177) ends only on DONE; SELECT sends UNSEEN, PERMANENTFLAGS, UIDNEXT.
- **TLS.** On the STARTTLS port nothing authenticates before TLS: no AUTH=
  in CAPABILITY, LOGINDISABLED, and LOGIN/AUTHENTICATE answer
  ``NO [PRIVACYREQUIRED]`` (RFC 5530). Bytes pipelined after STARTTLS are
  discarded (RFC 3501 §6.2.1, the CVE-2011-0411 class of bug).

Invariants:
- No handler blocks the reactor: store, KDF and decryption run on the pool.
- Logs carry no content and no command lines (LOGIN/AUTHENTICATE
  arguments never reach a log), only events, tags-free reasons and types.
- One audit event ``message.read`` per FETCH command that returned content
  (ENVELOPE, BODYSTRUCTURE, BODY, any section, RFC822*): never per chunk.
  It is appended by the store's group-commit writer (``submit_event``),
  one commit for whatever all sessions queued meanwhile, and the tagged OK
  waits for that commit. STORE's ``message.flags`` commits in the
  transaction that changes the flags.
"""

from __future__ import annotations

import base64
import functools
import inspect
import io
import logging
import time
from email import policy as email_policy
from email.parser import HeaderParser
from email.utils import getaddresses
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from twisted.cred import credentials
from twisted.internet import defer, reactor, task
from twisted.mail import imap4
from twisted.python.failure import Failure

from ..errors import (IntegrityError, InvalidInput, MailboxExists, MailboxHasChildren, MailboxNotFound,
                      MessageNotFound, PostvaultError, storage_full)
from ..policy import folders
from ..policy.attachments import check_attachments
from ..policy.decision import Decision
from ..store.audit import Event
from ..store.headercache import HEADER_CACHE_MAX
from ..store.types import ContentKeyCache, MessageMeta
from . import render, structure
from .account import Account, IMAPNo, list_pattern, matches
from .cred import FAILED, LoginRefused, StrictPLAIN, decode_sasl
from .mailbox import FLAGS, SelectedMailbox, flag_text
from .parse import (
    LITERAL_MARK,
    TAG_CHARS,
    BadCommand,
    Cursor,
    FetchItem,
    Literal,
    Section,
    compact_set,
    encode_mailbox,
    fetch_items,
    format_date_time,
    search_keys,
)
from .search import View, run_search

log = logging.getLogger("postvault.imapd")
# The answer to a write refused because the server's disk is full.
STORAGE_FULL = (b"[OVERQUOTA] The server's storage is full, so nothing was saved; try again later, once the "
                b"administrator has freed space.")

# RFC 7888 §4 (LITERAL-): the largest non-synchronizing literal we take.
NONSYNC_LIMIT = 4096
STREAM_CHUNK = 64 * 1024
# FETCH reads a message whose requested bytes total at most INLINE_MAX in one
# worker-thread call with its neighbours in the batch (at most INLINE_BUDGET
# of plaintext held per call), instead of opening, verifying, reading and
# closing it in hops of its own; larger ones are streamed chunk by chunk.
# Streaming decrypts a range twice (``verify`` before the literal's length
# is promised, then the reads) and costs a hop per 64 KiB, so up to 1 MiB
# (most mail: the bench mailbox's median is about 5 KB, its mean 30 KB) is
# read once, whole; a damaged one is then refused before any byte of its
# response is sent.
INLINE_MAX = 1024 * 1024
INLINE_BUDGET = 4 * 1024 * 1024
FETCH_BATCH = 500
# FETCH holds up to this much of its responses until its read audit is
# committed, and sends them with the tagged OK (do_FETCH).
HOLD_MAX = INLINE_BUDGET
# Without a change bus IDLE learns everything by polling; with one, the
# poll ([imap] idle_poll_seconds) only backs the bus up.
IDLE_POLL_WITHOUT_BUS = 0.5
UID_COMMANDS = {"COPY", "FETCH", "STORE", "SEARCH", "MOVE", "EXPUNGE"}
# Commands during which EXPUNGE must not be sent (RFC 3501 §7.4.1).
NO_EXPUNGE = {"FETCH", "STORE", "SEARCH"}
# Capabilities that can be switched off per client or account, and the
# commands they bring.
SWITCHABLE = {"IDLE", "MOVE", "UNSELECT", "NAMESPACE", "ID", "ENABLE", "UIDPLUS", "LITERAL+", "SPECIAL-USE",
              "CHILDREN", "APPENDLIMIT", "SASL-IR"}
COMMAND_CAPABILITY = {"IDLE": "IDLE", "MOVE": "MOVE", "UNSELECT": "UNSELECT", "NAMESPACE": "NAMESPACE",
                      "ID": "ID", "ENABLE": "ENABLE"}


class LOGINMechanism(imap4.LOGINCredentials):
    """SASL LOGIN (Outlook) with the customary prompts."""

    def __init__(self) -> None:
        super().__init__()
        self.challenges = [b"Password:", b"Username:"]


def _sp(rule: Callable[[Cursor], Any]) -> Callable[[Cursor], Any]:
    def spec(cur: Cursor) -> Any:
        cur.sp()
        return rule(cur)

    spec.__name__ = getattr(rule, "__name__", "arg")
    return spec


A_MAILBOX = _sp(Cursor.mailbox)
A_ASTRING = _sp(Cursor.astring)
A_SEQ = _sp(Cursor.seq_set)
A_ATOM = _sp(Cursor.atom)
A_FETCH = _sp(fetch_items)
A_SEARCH = _sp(search_keys)
A_LIST_MAILBOX = _sp(Cursor.list_mailbox)


def _opt_atom(cur: Cursor) -> bytes | None:
    if cur.maybe_sp():
        return cur._chars(frozenset(range(0x21, 0x7F)))
    return None


def _opt_seq(cur: Cursor) -> Any:
    return cur.seq_set() if cur.maybe_sp() else None


def _status_items(cur: Cursor) -> list[str]:
    cur.sp()
    cur.expect(b"(")
    items = []
    while True:
        items.append(cur.atom("a status item").decode().upper())
        if cur.accept(b")"):
            return items
        cur.sp()


def _store_flags(cur: Cursor) -> list[str]:
    cur.sp()
    return cur.flag_list()


def _append_args(cur: Cursor) -> tuple[str, list[str], Any, bytes]:
    cur.sp()
    mailbox = cur.mailbox()
    cur.sp()
    flags: list[str] = []
    date = None
    if cur.peek() == 0x28:
        flags = cur.flag_list()
        cur.sp()
    if cur.peek() == 0x22:
        date = cur.date_time()
        cur.sp()
    message = cur.literal()
    if message is None:
        raise BadCommand("APPEND needs the message as a literal, as in {123}.")
    return mailbox, flags, date, message


def _id_params(cur: Cursor) -> dict[str, str | None]:
    cur.sp()
    if cur.accept(b"NIL"):
        return {}
    cur.expect(b"(")
    out: dict[str, str | None] = {}
    if cur.accept(b")"):
        return out
    while True:
        k = cur.string().decode("utf-8", "replace")
        cur.sp()
        v = cur.nstring()
        if len(out) < 30:
            out[k.lower()[:30]] = None if v is None else v.decode("utf-8", "replace")[:1024]
        if cur.accept(b")"):
            return out
        cur.sp()


def _enable_args(cur: Cursor) -> list[str]:
    items = []
    while cur.maybe_sp():
        items.append(cur.atom("a capability name").decode().upper())
    if not items:
        raise BadCommand("ENABLE needs at least one capability name.")
    return items


class IMAPServer(imap4.IMAP4Server):
    """One IMAP connection."""

    IDENT = b"Postvault IMAP4rev1 ready"
    timeOut = 60  # before login (RFC 9051 §5.4 sets no minimum there); [imap] login_timeout_seconds

    def __init__(self, service: Any, implicit_tls: bool) -> None:
        super().__init__(chal={}, contextFactory=None)
        self.service = service
        self.limits = service.limits
        self.timeOut = self.limits.login_timeout_seconds
        self.implicit_tls = implicit_tls
        self.MAX_LENGTH = self.limits.max_line_length
        self._parts: list[bytes | Literal] = []
        self._cmd_bytes = 0
        self._literal: _Sink | None = None
        self._skip_command = False
        self._skip_line = False
        self._waiting: defer.Deferred[bytes] | None = None
        self._waiting_mode = ""
        self._in_flight = False
        self._bye_after = False
        self._closing = False
        self._current = ""
        self.client_name = ""
        self.client_ip = ""
        self._unsubscribe: Callable[[], None] | None = None
        self._expect: list[tuple[str, str, frozenset[int], float]] = []
        self._sync_lock = defer.DeferredLock()
        self._idle_poll: task.LoopingCall | None = None
        self._absolute: Any = None
        self._disabled: set[str] = set()
        self.portal = service.portal
        self.started = time.monotonic()

    # -- connection -------------------------------------------------------------

    @property
    def secure(self) -> bool:
        return bool(getattr(self.transport, "secure", False))

    def connectionMade(self) -> None:
        self.client_ip = self.transport.getPeer().host
        self._disabled = self.service.disabled_for(client="", account="")
        super().connectionMade()
        hours = self.limits.absolute_session_hours
        self._absolute = reactor.callLater(hours * 3600, self._session_expired)  # type: ignore[attr-defined]
        log.debug("connection from %s (%s)", self.client_ip, "imaps" if self.implicit_tls else "imap")

    def connectionLost(self, reason: Failure) -> None:
        self._closing = True
        if self._absolute is not None and self._absolute.active():
            self._absolute.cancel()
        self._stop_idle_poll()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(Failure(ConnectionError("connection closed")))
        self.mbox = None
        if self.account is not None:
            self.service.indexer.logged_out(self.account.session)  # lends the fill its key no longer
            self.account.logout()  # drops the content keys it holds
        self.account = None
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        # RFC 9051 §5.4: autologout after inactivity, with BYE first.
        self.sendUntaggedResponse(b"BYE Autologout; idle for too long")
        self._close()

    def _restart_login_timeout(self) -> None:
        if not self._closing and self.transport is not None:
            # Not self.timeOut: TimeoutMixin.setTimeout(None) cleared it.
            self.setTimeout(self.limits.login_timeout_seconds)

    def _session_expired(self) -> None:
        self.sendUntaggedResponse(b"BYE Session time limit reached; please log in again")
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.state = "logout"
        if self.transport is not None:
            self.transport.loseConnection()

    def shutdown(self) -> None:
        """The server is stopping: BYE now if no command runs, else after it."""
        if self._in_flight and self._waiting is None:
            self._bye_after = True
            return
        self.sendUntaggedResponse(b"BYE Server shutting down; please reconnect shortly")
        self._close()

    # -- capabilities ------------------------------------------------------------

    def capabilities(self) -> dict[bytes, Any]:
        caps: dict[bytes, Any] = {}
        plain_port = not self.implicit_tls
        if self.state == "unauth":
            if plain_port and not self.secure:
                caps[b"STARTTLS"] = None
                caps[b"LOGINDISABLED"] = None
            else:
                caps[b"AUTH"] = [b"PLAIN", b"LOGIN"]
                caps[b"SASL-IR"] = None
        names = ["LITERAL+", "ID", "ENABLE", "IDLE"]
        if self.state != "unauth":
            names += ["NAMESPACE", "UIDPLUS", "MOVE", "SPECIAL-USE", "UNSELECT", "CHILDREN"]
        for name in names:
            caps[name.encode()] = None
        if self.state != "unauth":
            caps[b"APPENDLIMIT"] = [b"%d" % self.service.policy.attachments.max_message_size]
        return {k: v for k, v in caps.items() if k.decode() not in self._disabled}

    def cap_text(self) -> bytes:
        return b"[CAPABILITY " + b" ".join(self.listCapabilities()) + b"]"

    def enabled(self, capability: str) -> bool:
        return capability not in self._disabled

    # -- reading commands ----------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        tag = _echo_tag(line.split(b" ", 1)[0][:64]) if line[:1].isalnum() else None
        self.sendBadResponse(tag, b"[TOOBIG] Command line too long")
        head, sep, rest = line.partition(b"\r\n")
        self._parts = []
        if sep:
            self._buffer = rest  # type: ignore[has-type]
            reactor.callLater(0, self.dataReceived, b"")  # type: ignore[attr-defined]
        else:
            self._skip_line = True

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        try:
            if self._waiting is not None:
                self._line_for_waiter(line)
            elif self._skip_line:
                self._skip_line = False
            else:
                self._command_line(line)
        except Exception:  # any bug here must not end the connection unanswered
            log.exception("error reading a command")
            self._parts = []
            self.sendUntaggedResponse(b"BAD Internal error reading the command")

    def rawDataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        sink = self._literal
        assert sink is not None
        rest = sink.feed(data)
        if rest is None:
            return
        self._literal = None
        if not sink.discard:
            self._parts.append(Literal(sink.value()))
        self.setLineMode(rest)

    def _command_line(self, line: bytes) -> None:
        if self._skip_command:
            m = LITERAL_MARK.search(line)
            if m and m[2]:
                self._literal = _Sink(int(m[1]), discard=True)
                self.setRawMode()
            elif not m:
                self._skip_command = False
            return
        if not self._parts and not line.strip():
            return  # a stray empty line between commands is ignored
        self._parts.append(line)
        self._cmd_bytes += len(line)
        m = LITERAL_MARK.search(line)
        if m is None:
            parts, self._parts, self._cmd_bytes = self._parts, [], 0
            self._execute(parts)
            return
        size, nonsync = int(m[1]), bool(m[2])
        first = self._parts[0]
        assert isinstance(first, bytes)
        words = first.split(b" ", 3)
        tag = _echo_tag(words[0])
        name = words[1].upper() if len(words) > 1 else b""
        refusal = self._literal_refusal(name, size, nonsync)
        if refusal is not None:
            self._parts, self._cmd_bytes = [], 0
            self._respond_raw(tag, refusal)
            if nonsync:
                if size > 2 * max(self.limits.max_literal_size, self.service.policy.attachments.max_message_size):
                    self.sendUntaggedResponse(b"BYE Literal far too large")
                    self._close()
                    return
                self._literal = _Sink(size, discard=True)
                self._skip_command = True
                self.setRawMode()
            return
        self._cmd_bytes += size
        if not nonsync:
            self.sendContinuationRequest(b"Ready for literal data")
        self._literal = _Sink(size)
        self.setRawMode()

    def _literal_refusal(self, name: bytes, size: int, nonsync: bool) -> bytes | None:
        if name == b"APPEND":
            limit = self.service.policy.attachments.max_message_size
            if size > limit:
                # RFC 7889 §4: refuse before the continuation request.
                return b"NO [TOOBIG] The message is larger than this server accepts (%d bytes)." % limit
            early = self._append_refusal()
            if early is not None:
                return early
        elif self._cmd_bytes + size > self.limits.max_literal_size:
            return b"BAD [TOOBIG] Literal too large for this command."
        if nonsync and size > NONSYNC_LIMIT:
            # RFC 7888 §4: LITERAL- allows non-synchronizing literals up to 4096.
            return b"BAD [TOOBIG] Non-synchronizing literals are limited to 4096 octets; use {N} instead."
        return None

    def _append_refusal(self) -> bytes | None:
        """An APPEND the folder policy refuses is refused before the client
        uploads the message (only when the name is not itself a literal)."""
        if self.account is None or len(self._parts) != 1:
            return None
        first = self._parts[0]
        assert isinstance(first, bytes)
        try:
            cur = Cursor([first])
            cur.tag()
            cur.sp()
            cur.atom()
            cur.sp()
            if cur.peek() == 0x7B:
                return None
            name = cur.mailbox()
        except BadCommand:
            return None
        resolved = self.account.resolve(name)
        if not resolved.allowed:
            return None  # answered with the reason once the command is complete
        decision = folders.may_append(self.account.role, resolved.name)  # type: ignore[arg-type]
        if decision.allowed:
            return None
        return b"NO [CANNOT] " + decision.text.encode("utf-8", "replace")

    def _respond_raw(self, tag: bytes, text: bytes) -> None:
        status, _, message = text.partition(b" ")
        self._respond(status, tag, message)

    # -- waiting for a client line inside a command (AUTHENTICATE, IDLE) -------------

    def _wait_line(self, mode: str) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting, self._waiting_mode = d, mode
        if self.paused:
            self.resumeProducing()
        return d

    def _line_for_waiter(self, line: bytes) -> None:
        d = self._waiting
        assert d is not None
        if self._waiting_mode == "idle" and line.strip().upper() != b"DONE":
            # RFC 2177: only DONE ends IDLE.
            self.sendUntaggedResponse(b"BAD Expected DONE to end IDLE")
            return
        self._waiting = None
        self.pauseProducing()
        d.callback(line)

    # -- dispatch ---------------------------------------------------------------------

    def _lookup(self, name: str) -> tuple[Any, ...]:
        entry = getattr(self, f"{self.state}_{name}", None) if name.isalnum() else None
        if entry is None:
            where = {s for s in ("unauth", "auth", "select") if name.isalnum() and getattr(self, f"{s}_{name}", None)}
            if not where:
                raise BadCommand(f"Unknown command {name}.")
            if self.state == "unauth" and where & {"auth", "select"}:
                raise BadCommand(f"{name} needs you to log in first.")
            if self.state == "auth" and "select" in where:
                raise BadCommand(f"{name} needs a selected folder; SELECT one first.")
            raise BadCommand(f"{name} is not valid in this state.")
        cap = COMMAND_CAPABILITY.get(name)
        if cap and not self.enabled(cap):
            raise BadCommand(f"Unknown command {name}.")
        return entry  # type: ignore[no-any-return]

    def _execute(self, parts: list[bytes | Literal]) -> None:
        cur = Cursor(parts)
        tag: bytes | None = None
        try:
            tag = cur.tag()
            cur.sp()
            name = cur.atom("a command name").decode().upper()
            uid = False
            if name == "UID":
                cur.sp()
                name = cur.atom("a command after UID").decode().upper()
                if name not in UID_COMMANDS or (name == "EXPUNGE" and not self.enabled("UIDPLUS")):
                    raise BadCommand(f"UID {name} is not a command.")
                uid = True
            handler, *specs = self._lookup(name)
            args = [spec(cur) if callable(spec) else spec for spec in specs]
            cur.end()
        except BadCommand as exc:
            self.sendBadResponse(tag, str(exc).encode("utf-8", "replace"))
            return
        except imap4.IllegalClientResponse as exc:
            self.sendBadResponse(tag, str(exc).encode("utf-8", "replace"))
            return
        except RecursionError:
            # A grammar rule without its own depth limit met a hostile
            # nesting (CWE-674): a tagged BAD, so the client is not left
            # waiting for an answer that never comes.
            self.sendBadResponse(tag, b"The command nests too deeply.")
            return
        assert tag is not None
        kw = {"uid": uid} if name in UID_COMMANDS else {}
        self._in_flight = True
        self._current = name
        d = defer.Deferred.fromCoroutine(self._run(tag, name, uid, handler, args, kw))
        if not d.called and self._waiting is None and not self.paused:
            self.pauseProducing()
        d.addBoth(self._finished)

    def _finished(self, result: object) -> None:
        self._uncork()
        self._in_flight = False
        self._current = ""
        if self._bye_after:
            self._bye_after = False
            self.shutdown()
            return
        if self.paused and not self._closing and self.transport is not None and not self.transport.disconnecting:
            self.resumeProducing()

    async def _run(self, tag: bytes, name: str, uid: bool, handler: Any, args: list[Any], kw: dict[str, Any]) -> None:
        allow_expunge = uid or name not in NO_EXPUNGE
        try:
            result = handler(self, tag, *args, **kw)
            if inspect.isawaitable(result):
                result = await result
        except BadCommand as exc:
            self.sendBadResponse(tag, str(exc).encode("utf-8", "replace"))
            return
        except imap4.IllegalClientResponse as exc:
            self.sendBadResponse(tag, str(exc).encode("utf-8", "replace"))
            return
        except IMAPNo as exc:
            self._cork()  # untagged updates and the tagged line: one write (_finished uncorks)
            await self._updates(allow_expunge)
            self.sendNegativeResponse(tag, exc.response)
            return
        except MailboxNotFound:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] There is no such folder.")
            return
        except InvalidInput as exc:
            self.sendNegativeResponse(tag, b"[CANNOT] " + str(exc).encode("utf-8", "replace"))
            return
        except ConnectionError:
            return
        except Exception as exc:  # noqa: BLE001 - every failure gets an answer and the connection stays
            if storage_full(exc) is not None:
                # RFC 5530 OVERQUOTA: the write was refused, nothing was
                # stored; it succeeds again once space is freed.
                log.warning("%s refused: the storage is full", name)
                self.sendNegativeResponse(tag, STORAGE_FULL)
                return
            if isinstance(exc, PostvaultError):
                log.warning("%s failed: %s", name, type(exc).__name__)
                self.sendNegativeResponse(tag, b"[SERVERBUG] The server could not complete this command.")
                return
            # A bug: answer, log the type and stack (no content).
            log.exception("%s failed", name)
            if self.transport is not None and not self.transport.disconnecting:
                self.sendNegativeResponse(tag, b"[SERVERBUG] Internal server error; the problem has been logged.")
            return
        if result is None:
            return
        self._cork()  # untagged updates and the tagged line: one write (_finished uncorks)
        await self._updates(allow_expunge)
        self.sendPositiveResponse(tag, result)

    # -- the selected mailbox catching up --------------------------------------------

    def _expect_change(self, mailbox: str, kind: str, uids: Any) -> None:
        now = time.monotonic()
        self._expect = [e for e in self._expect if now - e[3] < 10]
        self._expect.append((mailbox, kind, frozenset(uids), now))

    def on_change(self, change: Any) -> None:
        """A committed change from the store's bus (reactor thread)."""
        if change.kind == "logout":
            # The password changed (web pages): this session's login no
            # longer stands; the client must log in with the new one.
            self.sendUntaggedResponse(b"BYE Your password was changed; please log in again with the new one")
            self._close()
            return
        box = self.mbox
        if change.kind == "resync":
            # Another node's change too big to name, or notices that may
            # have been lost: read the mailbox again, as the poll would.
            if box is not None and change.mailbox in ("", box.name):
                self._mark_dirty(box)
            return
        for i, (mailbox, kind, uids, _) in enumerate(self._expect):
            if mailbox == change.mailbox and kind == change.kind and set(change.uids) <= uids:
                del self._expect[i]
                return
        if box is None or change.mailbox != box.name:
            return
        if change.kind in ("deleted", "renamed"):
            self._folder_gone()
            return
        # Only the expunged UIDs and who re-flagged what need remembering:
        # added and re-flagged rows are read back by modseq (``_updates``).
        if change.kind == "expunge":
            box.pending_expunge.update(change.uids)
        elif change.kind == "flags":
            box.pending_flags.update(change.uids)
        self._mark_dirty(box)

    def _mark_dirty(self, box: SelectedMailbox) -> None:
        box.dirty = True
        if self._waiting is not None and self._waiting_mode == "idle":
            d = defer.Deferred.fromCoroutine(self._updates(True))
            d.addErrback(lambda f: log.warning("IDLE update failed: %s", f.type.__name__))

    def _folder_gone(self) -> None:
        """Another session deleted or renamed the selected folder. Going on
        under the old name could write to a folder made later under it, and
        IMAP has no untagged way to deselect, so: BYE, as Dovecot does; the
        client reconnects and finds the folder list as it is now."""
        self.mbox = None
        self.state = "auth"
        if self.transport is not None and not self._closing:
            self.sendUntaggedResponse(b"BYE The selected folder was deleted or renamed in another session")
            self._close()

    async def _check_changed(self) -> None:
        """Cheap look for changes the bus can't tell (another process)."""
        box = self.mbox
        account = self.account
        if box is None or box.dirty or account is None:
            return
        # One indexed row (fastread), not every folder through the ORM:
        # NOOP is a tenth of a mail client's commands.
        marks = await account.run(self.store.mailbox_marks, account.session, box.name)
        if marks is not None and self.mbox is box and marks != (box.uidnext, box.highestmodseq):
            box.dirty = True

    async def _updates(self, allow_expunge: bool) -> None:
        """Catch the view up with the store and send what changed.

        One small read, not a re-read of the mailbox: the rows whose modseq
        is above the view's (added or re-flagged, through the (mailbox,
        modseq) index) and the message count; the expunged UIDs come from
        the change bus. Only when the count does not add up (an expunge
        the bus can't tell: another process) are the UIDs read again."""
        box = self.mbox
        account = self.account
        if box is None or account is None:
            return

        def due() -> bool:
            # Ghosts: expunges seen earlier that may be announced only now.
            return box.dirty or (allow_expunge and bool(box.ghosts))

        if not due():
            return
        await self._sync_lock.acquire()
        try:
            if self.mbox is not box or not due():
                return
            await self._load_flags(box)
            if self.mbox is not box:
                return
            # Cleared before the read: a change committed while it runs
            # sets it again, and is picked up by the next round.
            box.dirty = False
            try:
                changes = await account.run(self.store.mailbox_changes, account.session, box.name,
                                            box.highestmodseq)
            except MailboxNotFound:
                # Gone without a word on the bus (another process).
                if self.mbox is box:
                    self._folder_gone()
                return
            if self.mbox is not box:
                return
            present = None
            if not box.counts_agree(changes):
                state = await account.run(self.store.mailbox_state, account.session, box.name)
                if self.mbox is not box:
                    return
                present = state.uids
            if box.writable:
                self.service.recent.claim_to(account.session.account_id, box.name, changes.mailbox.uidnext)
            for line in box.apply(changes, allow_expunge, claim_recent=box.writable, present=present).lines:
                self.sendUntaggedResponse(line)
        finally:
            self._sync_lock.release()

    async def _need_flags(self, box: SelectedMailbox) -> None:
        """Flags are read when a command first needs them, not at SELECT."""
        if box.flags_loaded:
            return
        await self._sync_lock.acquire()
        try:
            await self._load_flags(box)
        finally:
            self._sync_lock.release()

    async def _load_flags(self, box: SelectedMailbox) -> None:
        # With _sync_lock held.
        if box.flags_loaded:
            return
        account = self._acct()
        loaded = await account.run(self.store.message_flags, account.session, box.name)
        if self.mbox is box and not box.flags_loaded:
            box.load_flags(loaded)

    def _start_idle_poll(self) -> None:
        # With the change bus, polling only catches other processes' changes
        # (the CLI); without it, it is how IDLE learns anything.
        every = self.service.limits.idle_poll_seconds if self.service.bus is not None else IDLE_POLL_WITHOUT_BUS
        self._idle_poll = task.LoopingCall(self._poll_once)
        self._idle_poll.start(every, now=False).addErrback(lambda f: None)

    def _stop_idle_poll(self) -> None:
        if self._idle_poll is not None and self._idle_poll.running:
            self._idle_poll.stop()
        self._idle_poll = None

    def _poll_once(self) -> defer.Deferred[None]:
        async def poll() -> None:
            await self._check_changed()
            if self._waiting is not None and self._waiting_mode == "idle":
                await self._updates(True)

        return defer.Deferred.fromCoroutine(poll()).addErrback(lambda f: log.warning("idle poll: %s", f.type))

    # -- helpers -------------------------------------------------------------------

    def _cork(self) -> None:
        """Gather this command's writes into one (the transport's cork; a
        test transport without one writes as it goes). ``_finished``, which
        runs after every command, uncorks."""
        cork = getattr(self.transport, "cork", None)
        if cork is not None:
            cork()

    def _uncork(self) -> None:
        uncork = getattr(self.transport, "uncork", None)
        if uncork is not None:
            uncork()

    def run(self, f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred[Any]:
        return self.service.run(f, *args, **kw)

    @property
    def store(self) -> Any:
        return self.service.store

    def _box(self) -> SelectedMailbox:
        assert self.mbox is not None
        return self.mbox  # type: ignore[no-any-return]

    def _acct(self) -> Account:
        assert self.account is not None
        return self.account  # type: ignore[no-any-return]

    def _targets(self, seqset: Any, uid: bool) -> list[tuple[int, int]]:
        try:
            return self._box().resolve(seqset, uid)
        except ValueError as exc:
            raise BadCommand(f"Invalid message number: {exc}") from None

    def _writable(self) -> SelectedMailbox:
        box = self._box()
        if not box.writable and self._acct().session.read_only:
            raise IMAPNo("This is read-only emergency access; nothing can be changed.", "CANNOT")
        if not box.writable:
            raise IMAPNo("The folder is open read-only (EXAMINE); SELECT it to change it.", "READ-ONLY")
        return box

    async def _message_ids(self, mailbox: str, uids: list[int]) -> list[str]:
        """The public ids of these copies, for the audit log."""
        account = self._acct()
        snap = await account.run(self.store.snapshot, account.session, mailbox, uids)
        return [m.message_id for m in snap.messages]

    async def _audit(self, event: str, box: SelectedMailbox, ids: list[str], detail: str) -> None:
        """One audit event per command (issue 7): the message id in
        ``message`` if it touched one, else all of them in ``detail``. A
        folder of the user's own is not named (its name may be PHI)."""
        if not ids:
            return
        await self._commit_event(self._command_event(event, box.name, detail)(ids))

    def _command_event(self, event: str, folder: str, detail: str) -> Callable[[list[str]], Event | None]:
        """The audit event of a command over messages, as a function of
        their public ids (pure: ``store.set_flags`` calls it on a worker
        thread, inside the transaction that changes the flags)."""
        account = self._acct()
        email, client_ip = account.email, self.client_ip
        text = f"folder={_folder_label(folder)} {detail}".rstrip()

        def make(ids: list[str]) -> Event | None:
            if not ids:
                return None
            full = text + (f" count={len(ids)} messages=" + ",".join(ids) if len(ids) > 1 else "")
            return Event(event, email, email, ids[0] if len(ids) == 1 else None, client_ip, "imap", full)

        return make

    def _commit_event(self, event: Event | None) -> defer.Deferred[None]:
        """Append ``event`` through the store's group-commit writer (many
        sessions' events, one commit); fires once it is committed, so the
        command still answers only after its audit entry is on disk."""
        if event is None:
            return defer.succeed(None)
        return self.service.settle(self.store.submit_event(event))

    # =====================================================================
    # Commands valid in any state
    # =====================================================================

    def do_CAPABILITY(self, tag: bytes) -> bytes:
        self.sendUntaggedResponse(b"CAPABILITY " + b" ".join(self.listCapabilities()))
        return b"CAPABILITY completed"

    unauth_CAPABILITY = auth_CAPABILITY = select_CAPABILITY = logout_CAPABILITY = (do_CAPABILITY,)

    def do_NOOP(self, tag: bytes) -> Any:
        async def noop() -> bytes:
            await self._check_changed()
            return b"NOOP completed"

        return noop()

    unauth_NOOP = auth_NOOP = select_NOOP = logout_NOOP = (do_NOOP,)

    def do_LOGOUT(self, tag: bytes) -> None:
        self.sendUntaggedResponse(b"BYE Postvault logging out")
        self.sendPositiveResponse(tag, b"LOGOUT completed")
        self._close()

    unauth_LOGOUT = auth_LOGOUT = select_LOGOUT = logout_LOGOUT = (do_LOGOUT,)

    def do_ID(self, tag: bytes, params: dict[str, str | None]) -> bytes:
        # RFC 2971: we answer NIL (no versions to fingerprint); the client's
        # name goes into the read audit and may switch capabilities off.
        name = params.get("name") or ""
        self.client_name = "".join(c for c in name if c.isprintable())[:64]
        self._disabled = self.service.disabled_for(client=self.client_name,
                                                   account=self.account.email if self.account else "")
        self.sendUntaggedResponse(b"ID NIL")
        return b"ID completed"

    unauth_ID = auth_ID = select_ID = (do_ID, _id_params)

    # =====================================================================
    # Not authenticated
    # =====================================================================

    def do_STARTTLS(self, tag: bytes) -> None:
        if self.secure:
            raise BadCommand("TLS is already active.")
        self.sendPositiveResponse(tag, b"Begin TLS negotiation now")
        # RFC 3501 §6.2.1 / RFC 7817: whatever the client pipelined after
        # STARTTLS arrived in plaintext and must not be executed.
        self.clearLineBuffer()
        self._parts = []
        self.transport.startTLS(self.service.tls_context())
        self.startedTLS = True

    unauth_STARTTLS = (do_STARTTLS,)

    def _privacy(self) -> None:
        if not self.secure:
            raise IMAPNo("Log in only after STARTTLS: your password must not cross the network in the clear.",
                         "PRIVACYREQUIRED")

    def do_LOGIN(self, tag: bytes, user: bytes, password: bytes) -> Any:
        self._privacy()
        creds = credentials.UsernamePassword(user, password)
        return self._login(creds)

    unauth_LOGIN = (do_LOGIN, A_ASTRING, A_ASTRING)

    def do_AUTHENTICATE(self, tag: bytes, mechanism: bytes, initial: bytes | None) -> Any:
        self._privacy()
        mech = mechanism.upper()
        if mech == b"PLAIN":
            chal: Any = StrictPLAIN()
        elif mech == b"LOGIN":
            chal = LOGINMechanism()
        else:
            raise IMAPNo("Unsupported mechanism; use PLAIN or LOGIN.")
        if initial is not None and not self.enabled("SASL-IR"):
            raise BadCommand("Initial responses are not enabled for this client.")
        return self._sasl(chal, initial)

    unauth_AUTHENTICATE = (do_AUTHENTICATE, A_ATOM, _opt_atom)

    async def _sasl(self, chal: Any, initial: bytes | None) -> bytes:
        first = True
        while first or chal.moreChallenges():
            challenge = chal.getChallenge()
            if first and initial is not None:
                response = initial  # RFC 4959 SASL-IR
            else:
                self.sendLine(b"+ " + base64.b64encode(challenge))
                response = await self._wait_line("sasl")
                if response.strip() == b"*":
                    raise BadCommand("AUTHENTICATE cancelled.")
            first = False
            chal.setResponse(decode_sasl(response))
        return await self._login(chal)

    async def _login(self, creds: Any) -> bytes:
        creds.client_ip = self.client_ip
        # The password check is the server's work, not the client's
        # idleness: in a burst of logins (every client reconnecting after a
        # restart) it waits its turn for a worker thread, bcrypt and
        # Argon2id, and the database, for longer than the pre-login
        # timeout, which used to hang up on clients whose LOGIN was being
        # answered (found by bench/soak.py). Paused here, restarted in full
        # if the login fails.
        self.setTimeout(None)
        try:
            iface, avatar, logout = await self.portal.login(creds, None, imap4.IAccount)
        except LoginRefused as exc:
            self._restart_login_timeout()
            raise IMAPNo(exc.response.decode("utf-8", "replace")) from None
        except Exception as exc:  # cred wraps unknown errors; never say which part failed
            self._restart_login_timeout()
            if not isinstance(exc, PostvaultError):
                log.exception("login failed unexpectedly")
            raise IMAPNo(FAILED.decode()) from None
        if self._closing:
            logout()
            return b"LOGIN completed"
        self.account = avatar
        self._onLogout = logout
        self.state = "auth"
        self.setTimeout(self.service.policy.sessions.imap_idle_minutes * 60)
        ends = avatar.session.expires_at
        if ends is not None:
            # Time-limited access (emergency): BYE at its end if that comes
            # before the absolute session limit.
            left = max(0.0, (ends - datetime.now(timezone.utc)).total_seconds())
            if self._absolute is not None and self._absolute.active():
                self._absolute.reset(min(left, self._absolute.getTime() - reactor.seconds()))  # type: ignore[attr-defined,misc]
            else:
                self._absolute = reactor.callLater(left, self._session_expired)  # type: ignore[attr-defined]
        self._disabled = self.service.disabled_for(client=self.client_name, account=avatar.email)
        if self.service.bus is not None:
            # In order with the worker threads' results: a change a command
            # made (and published) is seen before the command goes on.
            hop = getattr(self.service, "call_from_thread", None) or reactor.callFromThread  # type: ignore[attr-defined]
            self._unsubscribe = self.service.bus.subscribe(
                avatar.session.account_id, lambda change: hop(self.on_change, change))
        # The account's index and header cache, filled in the background
        # so that its first header SEARCH need not decrypt every message.
        self.service.indexer.logged_in(avatar.session)
        return self.cap_text() + b" Logged in"

    # =====================================================================
    # Authenticated
    # =====================================================================

    def do_NAMESPACE(self, tag: bytes) -> bytes:
        # RFC 2342: one personal namespace, no prefix.
        self.sendUntaggedResponse(b'NAMESPACE (("" "/")) NIL NIL')
        return b"NAMESPACE completed"

    auth_NAMESPACE = select_NAMESPACE = (do_NAMESPACE,)

    def do_ENABLE(self, tag: bytes, names: list[str]) -> bytes:
        # RFC 5161: nothing here can be enabled yet; say so, succeed.
        self.sendUntaggedResponse(b"ENABLED")
        return b"ENABLE completed"

    auth_ENABLE = (do_ENABLE, _enable_args)

    async def _select(self, tag: bytes, name: str, writable: bool) -> bytes:
        self.mbox = None
        self.state = "auth"
        account = self._acct()
        canonical = account.canonical(name)
        try:
            box = await account.open(canonical, writable)
        except MailboxNotFound:
            raise IMAPNo(f'There is no folder "{name}".', "NONEXISTENT") from None
        self._cork()  # seven untagged lines and the tagged one: one write (_finished uncorks)
        flags = list(FLAGS) + box.keywords()
        self.sendUntaggedResponse(b"FLAGS (" + " ".join(flags).encode() + b")")
        perm = " ".join(flags + ["\\*"]) if box.writable else ""
        self.sendPositiveResponse(None, b"[PERMANENTFLAGS (" + perm.encode() + b")] Flags you can change")
        self.sendUntaggedResponse(b"%d EXISTS" % box.exists)
        self.sendUntaggedResponse(b"%d RECENT" % len(box.recent))
        unseen = box.first_unseen()
        if unseen is not None:
            self.sendPositiveResponse(None, b"[UNSEEN %d] First unseen message" % unseen)
        self.sendPositiveResponse(None, b"[UIDVALIDITY %d] UIDs valid" % box.uidvalidity)
        self.sendPositiveResponse(None, b"[UIDNEXT %d] Predicted next UID" % box.uidnext)
        self.mbox = box
        self.state = "select"
        if writable and not box.writable:
            return b"[READ-ONLY] SELECT completed; this session can only read"
        return b"[READ-WRITE] SELECT completed" if box.writable else b"[READ-ONLY] EXAMINE completed"

    def do_SELECT(self, tag: bytes, name: str) -> Any:
        return self._select(tag, name, True)

    def do_EXAMINE(self, tag: bytes, name: str) -> Any:
        return self._select(tag, name, False)

    auth_SELECT = select_SELECT = (do_SELECT, A_MAILBOX)
    auth_EXAMINE = select_EXAMINE = (do_EXAMINE, A_MAILBOX)

    async def do_CREATE(self, tag: bytes, name: str) -> bytes:
        account = self._acct()
        name = name.rstrip(folders.DELIMITER) or name
        decision = folders.may_create(name, self.service.policy)
        if not decision.allowed:
            canonical = decision.name
            if canonical and canonical.lower() != name.lower():
                # "Deleted Items" is Trash: nothing to make (Outlook creates
                # the folders it expects and must not see a refusal).
                return f'[ALREADYEXISTS] "{name}" is the {canonical} folder; CREATE completed'.encode()
            d = decision.decision
            raise IMAPNo(d.text, d.imap_code or "CANNOT")
        try:
            await account.run(self.store.create_mailbox, account.session, name)
        except MailboxExists:
            raise IMAPNo(f'The folder "{name}" already exists.', "ALREADYEXISTS") from None
        return b"CREATE completed"

    auth_CREATE = select_CREATE = (do_CREATE, A_MAILBOX)

    async def do_DELETE(self, tag: bytes, name: str) -> bytes:
        # RFC 3501 §6.3.4 / RFC 9051 §6.3.4: a user folder, with its
        # messages; never one of the four (policy names every spelling).
        decision = folders.may_delete(name, self.service.policy)
        if not decision.allowed:
            raise IMAPNo(decision.text, decision.imap_code or "CANNOT")
        account = self._acct()
        box = self.mbox
        # Our own change: this session is not told to say BYE about it.
        self._expect_change(name, "deleted", ())
        try:
            await account.run(self.store.delete_mailbox, account.session, name, client_ip=self.client_ip,
                              protocol="imap")
        except MailboxNotFound:
            raise IMAPNo(f'There is no folder "{name}".', "NONEXISTENT") from None
        except MailboxHasChildren:
            # RFC 9051 §7.1 HASCHILDREN; refusing is RFC 3501 §6.3.4's
            # simple choice (the other keeps an empty \Noselect name).
            raise IMAPNo(f'The folder "{name}" has folders inside it; delete or move those first.',
                         "HASCHILDREN") from None
        self.service.recent.forget(account.session.account_id, name)
        if box is not None and self.mbox is box and box.name == name:
            # This session had it selected: back to the authenticated state
            # (RFC 9051 §7.1 CLOSED), as a SELECT of another folder would.
            self.mbox = None
            self.state = "auth"
            self.sendPositiveResponse(None, b"[CLOSED] The selected folder was deleted")
        return b"DELETE completed"

    auth_DELETE = select_DELETE = (do_DELETE, A_MAILBOX)

    async def do_RENAME(self, tag: bytes, old: str, new: str) -> bytes:
        # RFC 3501 §6.3.5 / RFC 9051 §6.3.6: folders below it move along;
        # RENAME INBOX moves INBOX's messages into a new folder.
        new = new.rstrip(folders.DELIMITER) or new
        decision = folders.may_rename(old, new, self.service.policy)
        if not decision.allowed:
            d = decision.decision
            raise IMAPNo(d.text, d.imap_code or "CANNOT")
        source = decision.name
        account = self._acct()
        box: SelectedMailbox | None = self.mbox
        if box is not None and (source == folders.INBOX or not (
                box.name == source or box.name.startswith(source + folders.DELIMITER))):
            box = None  # not inside what is renamed
        if box is not None:
            self._expect_change(box.name, "renamed", ())
        try:
            await account.run(self.store.rename_mailbox, account.session, source, new, client_ip=self.client_ip,
                              protocol="imap")
        except MailboxNotFound:
            raise IMAPNo(f'There is no folder "{old}".', "NONEXISTENT") from None
        except MailboxExists:
            raise IMAPNo(f'A folder "{new}" already exists.', "ALREADYEXISTS") from None
        if source != folders.INBOX:
            self.service.recent.rename(account.session.account_id, source, new)
        if box is not None and self.mbox is box:
            # This session follows its folder to the new name; its UIDs
            # stand (the new UIDVALIDITY is for clients that re-SELECT).
            box.name = new + box.name[len(source):]
        return b"RENAME completed"

    auth_RENAME = select_RENAME = (do_RENAME, A_MAILBOX, A_MAILBOX)

    async def _subscription(self, name: str, on: bool) -> None:
        account = self._acct()
        canonical = account.canonical(name)
        try:
            await account.run(self.store.set_subscribed, account.session, canonical, on)
        except MailboxNotFound:
            # RFC 3501 §6.3.6 lets a server refuse a name that doesn't
            # exist; here subscriptions belong to folders.
            raise IMAPNo(f'There is no folder "{name}" to subscribe to.', "NONEXISTENT") from None

    async def do_SUBSCRIBE(self, tag: bytes, name: str) -> bytes:
        await self._subscription(name, True)
        return b"SUBSCRIBE completed"

    async def do_UNSUBSCRIBE(self, tag: bytes, name: str) -> bytes:
        # The four folders stay subscribed (the store refuses, NO [CANNOT]):
        # a client that lost them from LSUB would lose Sent and Trash.
        await self._subscription(name, False)
        return b"UNSUBSCRIBE completed"

    auth_SUBSCRIBE = select_SUBSCRIBE = (do_SUBSCRIBE, A_MAILBOX)
    auth_UNSUBSCRIBE = select_UNSUBSCRIBE = (do_UNSUBSCRIBE, A_MAILBOX)

    async def _list(self, tag: bytes, ref_raw: bytes, pattern_raw: bytes, command: bytes) -> bytes:
        from .parse import decode_mailbox

        ref, pattern = decode_mailbox(ref_raw), decode_mailbox(pattern_raw)
        if pattern == "":
            # RFC 3501 §6.3.8: the delimiter and root.
            self.sendUntaggedResponse(command + b' (\\Noselect) "/" ""')
            return command + b" completed"
        boxes = await self._acct().mailboxes()
        names = [b.name for b in boxes]
        if command == b"LSUB":
            # RFC 3501 §6.3.9: the subscribed folders (the four always are).
            boxes = [b for b in boxes if b.subscribed]
        regex = list_pattern(ref, pattern)
        shown = {b.name for b in boxes}
        lines: list[tuple[str, list[str]]] = []
        for box in boxes:
            if not matches(regex, box.name):
                continue
            attrs = []
            if self.enabled("CHILDREN"):
                has = any(n.startswith(box.name + folders.DELIMITER) for n in names)
                attrs.append("\\HasChildren" if has else "\\HasNoChildren")
            if box.special_use and self.enabled("SPECIAL-USE"):
                attrs.append(box.special_use)  # RFC 6154 §2, also in LSUB for Outlook
            lines.append((box.name, attrs))
        if (ref + pattern).endswith("%"):
            # RFC 3501 §6.3.8-9: with "%" last, a level of hierarchy that
            # is no folder (or, for LSUB, not subscribed) is listed too,
            # \Noselect: "a" for "a/b".
            for parent in sorted({p for n in shown for p in _ancestors(n)} - shown):
                if matches(regex, parent):
                    attrs = ["\\Noselect"] + (["\\HasChildren"] if self.enabled("CHILDREN") else [])
                    lines.append((parent, attrs))
        for name, attrs in lines:
            self.sendUntaggedResponse(command + b" (" + " ".join(attrs).encode() + b') "/" '
                                      + render.string(encode_mailbox(name)))
        return command + b" completed"

    def do_LIST(self, tag: bytes, ref: bytes, pattern: bytes) -> Any:
        return self._list(tag, ref, pattern, b"LIST")

    def do_LSUB(self, tag: bytes, ref: bytes, pattern: bytes) -> Any:
        return self._list(tag, ref, pattern, b"LSUB")

    auth_LIST = select_LIST = (do_LIST, A_ASTRING, A_LIST_MAILBOX)
    auth_LSUB = select_LSUB = (do_LSUB, A_ASTRING, A_LIST_MAILBOX)

    async def do_STATUS(self, tag: bytes, name: str, items: list[str]) -> bytes:
        allowed = {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"}
        if self.enabled("APPENDLIMIT"):
            allowed.add("APPENDLIMIT")
        for item in items:
            if item not in allowed:
                raise BadCommand(f"Unknown STATUS item {item}.")
        account = self._acct()
        canonical = account.canonical(name)
        try:
            values = await account.status(canonical, items)
        except MailboxNotFound:
            raise IMAPNo(f'There is no folder "{name}".', "NONEXISTENT") from None
        body = " ".join(f"{k} {v}" for k, v in values).encode()
        self.sendUntaggedResponse(b"STATUS " + render.string(encode_mailbox(name)) + b" (" + body + b")")
        return b"STATUS completed"

    auth_STATUS = select_STATUS = (do_STATUS, A_MAILBOX, _status_items)

    async def do_APPEND(self, tag: bytes, args: tuple[str, list[str], Any, bytes]) -> bytes:
        name, flags, date, message = args
        account = self._acct()
        canonical = account.canonical(name)
        decision = folders.may_append(account.role, canonical)  # type: ignore[arg-type]
        if not decision.allowed:
            raise IMAPNo(decision.text, "CANNOT")
        limit = self.service.policy.attachments.max_message_size
        if len(message) > limit:
            raise IMAPNo(f"The message is larger than this server accepts ({limit} bytes).", "TOOBIG")
        if not message:
            raise IMAPNo("An empty message can't be stored.", "CANNOT")
        flags = [f for f in flags if f.lower() != "\\recent"]
        if date is not None:
            date = date.astimezone(timezone.utc)  # stored as UTC; the database keeps no zone
        # The attachment policy of submission (issue 5 item 6): a draft or a
        # sent copy carrying what SMTP would refuse is refused here too, and
        # nothing is stored. On a worker thread: it parses the message.
        verdict = await account.run(_append_policy, self.store, account.email, account.role, message,
                                    self.service.policy)
        if not verdict.allowed:
            raise IMAPNo(verdict.text, verdict.imap_code or "CANNOT")

        try:
            result = await account.run(self.store.append, account.session, canonical, io.BytesIO(message),
                                       flags, date, client_ip=self.client_ip, protocol="imap")
        except MailboxNotFound:
            raise IMAPNo(f'There is no folder "{name}".', "TRYCREATE") from None
        box = self.mbox
        if box is not None and box.name == canonical:
            box.dirty = True
        if not getattr(result, "duplicate", False):
            self._expect_change(canonical, "exists", [result.uid]) if box is None or box.name != canonical else None
        if not self.enabled("UIDPLUS"):
            return b"APPEND completed"
        return b"[APPENDUID %d %d] APPEND completed" % (result.uidvalidity, result.uid)

    auth_APPEND = select_APPEND = (do_APPEND, _append_args)

    def do_IDLE(self, tag: bytes) -> Any:
        async def idle() -> bytes:
            # RFC 2177: + then untagged updates as they happen, until DONE.
            self.sendContinuationRequest(b"idling")
            # Idling from the "+" on, before the catch-up below: a change
            # committed while the catch-up reads finds the session idling
            # and runs its own round after it (_mark_dirty). Waited for
            # only after the catch-up, a change in that window just marked
            # the view dirty, and the client heard of it at the next poll
            # (found by bench/soak.py: one wake-up in 7,963 late).
            done = self._wait_line("idle")
            self._start_idle_poll()
            try:
                await self._check_changed()
                await self._updates(True)
                await done
            finally:
                self._stop_idle_poll()
                if self._waiting is done:
                    # The catch-up failed: the session is not idling any more.
                    self._waiting = None
                done.addErrback(lambda f: None)
            return b"IDLE terminated"

        return idle()

    auth_IDLE = select_IDLE = (do_IDLE,)

    # =====================================================================
    # Selected
    # =====================================================================

    async def do_CHECK(self, tag: bytes) -> bytes:
        await self._check_changed()
        return b"CHECK completed"

    select_CHECK = (do_CHECK,)

    async def do_CLOSE(self, tag: bytes) -> bytes:
        box = self._box()
        account = self._acct()
        if box.writable:
            # RFC 3501 §6.4.2: expunge silently.
            gone = await account.run(self.store.expunge_messages, account.session, box.name, None)
            if gone:
                self._expect_change(box.name, "expunge", [u for u, _ in gone])
                await self._audit("message.expunge", box, [pid for _, pid in gone], "via=CLOSE")
        self.mbox = None
        self.state = "auth"
        return b"CLOSE completed"

    select_CLOSE = (do_CLOSE,)

    def do_UNSELECT(self, tag: bytes) -> bytes:
        # RFC 3691: like CLOSE without the expunge.
        self.mbox = None
        self.state = "auth"
        return b"UNSELECT completed"

    select_UNSELECT = (do_UNSELECT,)

    async def do_EXPUNGE(self, tag: bytes, seqset: Any = None, uid: bool = False) -> bytes:
        box = self._writable()
        account = self._acct()
        only = None
        if uid:
            only = [u for _, u in self._targets(seqset, True)]
            if not only:
                return b"EXPUNGE completed"
        gone = await account.run(self.store.expunge_messages, account.session, box.name, only)
        removed = [u for u, _ in gone]
        if removed:
            self._expect_change(box.name, "expunge", removed)
            await self._audit("message.expunge", box, [pid for _, pid in gone], "")
        for line in box.forget(removed):
            self.sendUntaggedResponse(line)
        return b"EXPUNGE completed"

    def _expunge_args(self, tag: bytes, seqset: Any, uid: bool = False) -> Any:
        if uid and seqset is None:
            raise BadCommand("UID EXPUNGE needs a set of UIDs.")
        if not uid and seqset is not None:
            raise BadCommand("Unexpected extra arguments at the end of the command.")
        return self.do_EXPUNGE(tag, seqset, uid=uid)

    select_EXPUNGE = (_expunge_args, _opt_seq)

    async def do_STORE(self, tag: bytes, seqset: Any, mode_raw: bytes, flags: list[str], uid: bool = False) -> bytes:
        mode_text = mode_raw.upper()
        silent = mode_text.endswith(b".SILENT")
        base = mode_text.removesuffix(b".SILENT")
        modes = {b"FLAGS": "set", b"+FLAGS": "add", b"-FLAGS": "remove"}
        if base not in modes:
            raise BadCommand("STORE needs FLAGS, +FLAGS or -FLAGS (optionally .SILENT).")
        targets = self._targets(seqset, uid)
        box = self._writable()
        account = self._acct()
        # RFC 3501 §2.3.2: \Recent can't be changed by a client.
        flags = [f for f in flags if f.lower() != "\\recent"]
        await self._need_flags(box)
        uids = [u for _, u in targets if u not in box.ghosts]
        if uids:
            self._expect_change(box.name, "flags", uids)
            # The flags and their audit entry in one transaction and commit.
            new = await account.run(self.store.set_flags, account.session, box.name, uids, flags, modes[base],
                                    audit_event=self._command_event(
                                        "message.flags", box.name, f"mode={modes[base]} flags={_flags_label(flags)}"))
            box.set_flags(new)
        if not silent:
            for seq, u in targets:
                if u not in box.ghosts:
                    extra = b" UID %d" % u if uid else b""
                    self.sendUntaggedResponse(b"%d FETCH (FLAGS (%s)%s)" % (seq, flag_text(box.flags_at(seq), u in box.recent),
                                                                           extra))
        if len(uids) < len(targets):
            raise IMAPNo("Some of the messages no longer exist.", "EXPUNGEISSUED")
        return b"STORE completed"

    select_STORE = (do_STORE, A_SEQ, A_ATOM, _store_flags)

    async def _copy(self, tag: bytes, seqset: Any, name: str, uid: bool, move: bool) -> bytes:
        targets = self._targets(seqset, uid)
        box = self._box() if not move else self._writable()
        account = self._acct()
        verb = b"MOVE" if move else b"COPY"
        try:
            dest = account.canonical(name)
        except IMAPNo as exc:
            raise IMAPNo(exc.text, "TRYCREATE" if self.service.policy.folders.allow_user_folders else exc.code) \
                from None
        uids = [u for _, u in targets if u not in box.ghosts]
        if not uids:
            if targets:
                raise IMAPNo("Those messages no longer exist.", "EXPUNGEISSUED")
            return verb + b" completed"
        try:
            method = self.store.move if move else self.store.copy
            if move:
                self._expect_change(box.name, "expunge", uids)
            result = await account.run(method, account.session, box.name, uids, dest)
        except MailboxNotFound:
            raise IMAPNo(f'There is no folder "{name}".', "TRYCREATE") from None
        pairs = sorted(result.uids)
        # The copies share their message (and its id) with the originals,
        # which a MOVE has already removed.
        await self._audit("message.move" if move else "message.copy", box,
                          await self._message_ids(dest, [b for _, b in pairs]), f"to={_folder_label(dest)}")
        code = b""
        if pairs and self.enabled("UIDPLUS"):
            code = b"[COPYUID %d %s %s] " % (result.uidvalidity, compact_set([a for a, _ in pairs]).encode(),
                                             compact_set([b for _, b in pairs]).encode())
        if dest == box.name:
            box.dirty = True
        else:
            self._expect_change(dest, "exists", [b for _, b in pairs])
        if move:
            # RFC 6851 §4.3: COPYUID in an untagged OK, then the EXPUNGEs.
            if code:
                self.sendPositiveResponse(None, code + b"Moved")
            for line in box.forget([a for a, _ in pairs]):
                self.sendUntaggedResponse(line)
            return b"MOVE completed"
        return code + b"COPY completed"

    def do_COPY(self, tag: bytes, seqset: Any, name: str, uid: bool = False) -> Any:
        return self._copy(tag, seqset, name, uid, move=False)

    def do_MOVE(self, tag: bytes, seqset: Any, name: str, uid: bool = False) -> Any:
        return self._copy(tag, seqset, name, uid, move=True)

    select_COPY = (do_COPY, A_SEQ, A_MAILBOX)
    select_MOVE = (do_MOVE, A_SEQ, A_MAILBOX)

    async def do_SEARCH(self, tag: bytes, parsed: tuple[str | None, Any], uid: bool = False) -> bytes:
        charset, key = parsed
        if charset not in (None, "US-ASCII", "UTF-8"):
            raise IMAPNo("Search strings must be US-ASCII or UTF-8.", "BADCHARSET (US-ASCII UTF-8)")
        box = self._box()
        account = self._acct()
        await self._need_flags(box)
        view = View(*box.search_view())
        found = await account.run(run_search, self.store, account.session, box.name, key, view, account.keys)
        uids = view.uids
        numbers = [uids[p] for p in found] if uid else [p + 1 for p in found]
        self.sendUntaggedResponse(b"SEARCH" + (b" " + " ".join(map(str, numbers)).encode() if numbers else b""))
        return b"SEARCH completed"

    select_SEARCH = (do_SEARCH, A_SEARCH)

    # -- FETCH -------------------------------------------------------------------

    async def do_FETCH(self, tag: bytes, seqset: Any, items: list[FetchItem], uid: bool = False) -> bytes:
        box = self._box()
        account = self._acct()
        targets = self._targets(seqset, uid)
        if uid and not any(i.name == "UID" for i in items):
            items = [FetchItem("UID"), *items]  # RFC 3501 §6.4.8
        seen_now: set[int] = set()
        sets_seen = box.writable and any(i.sets_seen for i in items)
        if sets_seen or any(i.name == "FLAGS" for i in items):
            await self._need_flags(box)
        if sets_seen:
            want = [u for _, u in targets if u not in box.ghosts and "\\Seen" not in box.flags_of(u)]
            if want:
                self._expect_change(box.name, "flags", want)
                new = await account.run(self.store.set_flags, account.session, box.name, want, ["\\Seen"], "add")
                box.set_flags(new)
                seen_now = set(new)
        need_structure = any(_needs_structure(i) for i in items)
        content = any(i.content for i in items)
        need_meta = content or any(i.name in ("INTERNALDATE", "RFC822.SIZE") or _needs_bytes(i) for i in items)
        pre_render = tuple(sorted({_prerender_key(i) for i in items} - {None}))  # type: ignore[type-var]
        read: list[str] = []
        damaged: list[tuple[str, str]] = []
        missing = False
        # Responses are held back (up to HOLD_MAX) and written, together
        # with the tagged OK, once the read audit is committed: one write
        # instead of two for a small FETCH, and no content reaches the
        # client before its ``message.read`` event is on disk. A bigger
        # FETCH writes as it goes, as before (streaming, flow control).
        pending: list[bytes] | None = []
        pending_size = 0
        # A big FETCH to a slow client is not idleness: the idle timer is
        # off while one runs (several batches, a streamed message, or
        # responses written as they come). A one-batch FETCH held in memory
        # ends in the time of its reads, and leaves the timer alone (taking
        # it off and setting it again was 7 % of a small FETCH's time).
        idle_off = False

        def stop_idle_timer() -> None:
            nonlocal idle_off
            if not idle_off:
                idle_off = True
                self.setTimeout(None)

        def emit(chunk: bytes) -> bool:
            """Hold or write ``chunk``; True once the responses go out as
            they come (the caller then waits for the client to take them)."""
            nonlocal pending, pending_size
            if pending is not None:
                if chunk and pending_size + len(chunk) <= HOLD_MAX:
                    pending.append(chunk)
                    pending_size += len(chunk)
                    return False
                stop_idle_timer()
                if pending:
                    self.transport.write(b"".join(pending))
                pending = None
            if chunk:
                self.transport.write(chunk)
            return True

        if len(targets) > FETCH_BATCH:
            stop_idle_timer()
        try:
            for start in range(0, len(targets), FETCH_BATCH):
                batch = targets[start:start + FETCH_BATCH]
                live = [(s, u) for s, u in batch if u not in box.ghosts]
                data = _Batch({}, {}, {})
                if (need_meta or need_structure) and live:
                    data = await account.run(_batch_data, self.store, account.session, box.name,
                                             [u for _, u in live], need_meta, need_structure, pre_render,
                                             account.keys, items)
                if need_meta:
                    live = [(s, u) for s, u in live if u in data.metas]
                missing = missing or len(live) < len(batch)
                structures = data.structures
                if not any(_needs_bytes(i) for i in items):
                    # Metadata and summaries only: one write per batch.
                    out = []
                    for seq, u in live:
                        if need_structure and u not in structures:
                            missing = True
                            continue
                        wanted = items if u not in seen_now or any(i.name == "FLAGS" for i in items) \
                            else [*items, FetchItem("FLAGS")]
                        meta = data.metas.get(u)
                        pre = data.rendered.get(u)
                        out.append(b"* %d FETCH (" % seq + b" ".join(_simple_item(i, box, seq, u, meta, pre) or b""
                                                                      for i in wanted) + b")\r\n")
                        if content and meta is not None:
                            read.append(meta.message_id)
                    if emit(b"".join(out)):
                        await self.transport.drained()
                    continue
                plans: list[tuple[int, int, MessageMeta, structure.Structure | None, list[_Want]]] = []
                for seq, u in live:
                    if need_structure and u not in structures:
                        missing = True
                        continue
                    meta, st = data.metas[u], structures.get(u)
                    plans.append((seq, u, meta, st, _wants(items, st, meta.size)))
                i = 0
                while i < len(plans):
                    # Messages whose requested bytes are small are read a
                    # group at a time, in one worker-thread call (one query,
                    # one batch unwrap of their content keys); a large one
                    # is streamed on its own, chunk by chunk.
                    group, held = [], 0
                    while i < len(plans):
                        n = sum(w.end - w.start for w in plans[i][4])
                        if n > INLINE_MAX or (group and held + n > INLINE_BUDGET):
                            break
                        group.append(plans[i])
                        held += n
                        i += 1
                    if not group:
                        seq, u, meta, st, _ = plans[i]
                        i += 1
                        emit(b"")  # a large message is streamed: what is pending goes first
                        try:
                            ok = await self._fetch_one(box, seq, u, items, st, meta, data.rendered.get(u),
                                                       u in seen_now, (data.copies or {}).get(u))
                        except IntegrityError as exc:
                            # One damaged blob must not stop a client syncing
                            # the rest of the folder: carry on, refuse at the end.
                            damaged.append((meta.message_id, str(exc)))
                            continue
                        if not ok:
                            missing = True
                        elif content:
                            read.append(meta.message_id)
                        continue
                    # Those read with the metadata (_batch_data) are not read again.
                    got = data.parts if data.parts is not None else {}
                    todo = [(u, wants) for _, u, _, _, wants in group if u not in data.tried]
                    if todo:
                        got = {**got, **await account.run(_read_small, self.store, account.session, box.name,
                                                          todo, account.keys)}
                    out = []
                    for seq, u, meta, st, wants in group:
                        parts = got.get(u)
                        if parts is None:
                            missing = True
                        elif isinstance(parts, IntegrityError):
                            damaged.append((meta.message_id, str(parts)))
                        else:
                            out.append(_fetch_response(items, box, seq, u, meta, data.rendered.get(u), u in seen_now,
                                                       wants, parts))
                            if content:
                                read.append(meta.message_id)
                    if emit(b"".join(out)):
                        await self.transport.drained()
        finally:
            if idle_off:
                self.setTimeout(self.service.policy.sessions.imap_idle_minutes * 60)
        if read:
            await self._audit_read(read)
        if pending:
            # After the reads' audit event is committed: the whole answer
            # (responses, then the tagged line ``_run`` adds) in one write.
            self._cork()
            self.transport.write(b"".join(pending))
        if damaged:
            await self._report_damaged(damaged)
        if missing:
            raise IMAPNo("Some of the requested messages no longer exist.", "EXPUNGEISSUED")
        return b"FETCH completed"

    select_FETCH = (do_FETCH, A_SEQ, A_FETCH)
    # UID is a prefix, handled in _execute (RFC 3501 §6.4.8; with MOVE and
    # EXPUNGE from RFC 6851 and RFC 4315): Twisted's do_UID must not run.
    select_UID = None

    async def _report_damaged(self, damaged: list[tuple[str, str]]) -> None:
        """Stored messages that failed authentication (or whose blob is
        gone): an audit event and a log line each, naming the public id
        only, then a tagged NO. RFC 5530 §3: SERVERBUG is for a server
        that "violated one of its own invariants" - stored data that no
        longer opens is exactly that, and not the client's fault."""
        account = self._acct()
        for public_id, why in damaged:
            log.warning("FETCH: stored message %s failed its integrity check (%s); run `postvault fsck`",
                        public_id, why)
            await account.run(self.store.record_event, "message.integrity", actor=account.email,
                              account=account.email, message=public_id, client_ip=self.client_ip,
                              protocol="imap", detail=f"fetch: {why}")
        what = "A stored message" if len(damaged) == 1 else f"{len(damaged)} stored messages"
        were = "was" if len(damaged) == 1 else "were"
        raise IMAPNo(f"{what} failed an integrity check and {were} not sent; the administrator has been told.",
                     "SERVERBUG")

    async def _audit_read(self, ids: list[str]) -> None:
        account = self._acct()
        detail = f"client={self.client_name or '-'}"
        if account.session.grant_id is not None:
            detail += f" emergency={account.session.grant_id}"
        if len(ids) > 1:
            detail += f" count={len(ids)} messages=" + ",".join(ids)
        # An emergency session reads under the named person's name.
        actor = account.session.actor or account.email
        # Through the group-commit writer: concurrent FETCHes of all
        # sessions share a commit, and no worker thread sits in the fsync;
        # the tagged OK still waits for this event's commit.
        await self._commit_event(Event("message.read", actor, account.email, ids[0] if len(ids) == 1 else None,
                                       self.client_ip, "imap", detail))

    async def _fetch_one(self, box: SelectedMailbox, seq: int, u: int, items: list[FetchItem],
                         st: structure.Structure | None, meta: MessageMeta, pre: dict[str, bytes] | None,
                         seen_now: bool, row: Any = None) -> bool:
        account = self._acct()
        needs_reader = any(_needs_bytes(i) for i in items)
        reader = None
        if needs_reader:
            try:
                if row is not None:
                    reader = await account.run(_open_row, self.store, account.session, box.name, row, account.keys)
                else:
                    reader = await account.run(self.store.open_message, account.session, box.name, u, account.keys)
            except MessageNotFound:
                return False
        write = self.transport.write
        sent = False
        try:
            pieces: list[bytes] = [b"* %d FETCH (" % seq]
            names = {i.name for i in items}
            if seen_now and "FLAGS" not in names:
                items = [*items, FetchItem("FLAGS")]
            for n, item in enumerate(items):
                if n:
                    pieces.append(b" ")
                simple = _simple_item(item, box, seq, u, meta, pre)
                if simple is not None:
                    pieces.append(simple)
                else:
                    assert reader is not None
                    label, rng, fields = _section_range(item, st, meta.size)
                    if fields is not None:
                        head = await account.run(_read_at, reader, rng[0], rng[1] - rng[0])
                        data = _filter_headers(head, fields[0], fields[1])
                        data = _partial(data, item.partial)
                        pieces.append(label.encode("ascii", "surrogateescape") + b" {%d}\r\n" % len(data) + data)
                        continue
                    start, end = rng
                    if item.partial is not None:
                        start = min(end, start + item.partial[0])
                        end = min(end, start + item.partial[1])
                    # Authenticate the range before its length is promised:
                    # a damaged chunk found mid-literal could not be
                    # answered without desynchronising the client.
                    await account.run(reader.verify, start, end - start)
                    pieces.append(label.encode("ascii", "surrogateescape") + b" {%d}\r\n" % (end - start))
                    write(b"".join(pieces))
                    sent = True
                    pieces = []
                    await self._stream(reader, start, end - start)
            pieces.append(b")\r\n")
            write(b"".join(pieces))
            await self.transport.drained()
        except IntegrityError:
            if sent:
                # Earlier items went out whole; end this FETCH response
                # (with fewer items) so the stream stays in sync.
                write(b")\r\n")
            raise
        finally:
            if reader is not None:
                await account.run(reader.close)
        return True

    async def _stream(self, reader: Any, start: int, length: int) -> None:
        """Copy plaintext from the sealed reader to the client, one chunk
        at a time, waiting while the client is slower than the store."""
        account = self._acct()
        pos, left = start, length
        while left > 0:
            n = min(STREAM_CHUNK, left)
            data = await account.run(_read_at, reader, pos, n)
            if len(data) != n:
                # The literal length is promised; a short read can't be
                # answered in-band. Close rather than desynchronise.
                log.error("sealed message shorter than its recorded size")
                self.transport.abortConnection()
                raise ConnectionError("short read")
            self.transport.write(data)
            pos += n
            left -= n
            await self.transport.drained()


# -- FETCH helpers (pure, or run on worker threads) ----------------------------------


# APPEND reads at most this much of the header for the offices a message
# names, and at most this many addresses: a real header is far smaller.
_APPEND_HEAD_MAX = 64 * 1024
_APPEND_ADDRESSES_MAX = 200


def _append_policy(store: Any, account_email: str, role: str, message: bytes, policy: Any) -> Decision:
    """The attachment decision for an APPENDed message: the function SMTP
    DATA uses (``policy.attachments.check_attachments``), with the
    exceptions of the member offices the message names (From, To, Cc, Bcc)
    and the account's own if it is a member: what submitting the message to
    them would get. A draft only sits in its author's own mailbox, and
    sending it later passes SMTP's checks again."""
    head = message[:_APPEND_HEAD_MAX]
    end = head.find(b"\r\n\r\n")
    head = head if end < 0 else head[:end]
    parsed = HeaderParser(policy=email_policy.compat32).parsestr(head.decode("utf-8", "surrogateescape"))
    values = [str(v) for name in ("From", "To", "Cc", "Bcc") for v in parsed.get_all(name, [])]
    named = [a.strip().lower() for _, a in getaddresses(values) if "@" in a][:_APPEND_ADDRESSES_MAX]
    offices = sorted(set(named + ([account_email.lower()] if role == "member" else [])))
    allowed = store.conversation_allowances(offices, policy)
    return check_attachments(message, policy.attachments, allowed)


def _ancestors(name: str) -> list[str]:
    """"a" and "a/b" for "a/b/c"."""
    parts = name.split(folders.DELIMITER)
    return [folders.DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def _folder_label(name: str) -> str:
    """A folder's name for the audit log: the standard ones by name, a
    user's own folder only as such."""
    return name if name in ("INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive") else "user-folder"


def _flags_label(flags: list[str]) -> str:
    """System flags by name, keywords only counted: a keyword is the
    user's own text (RFC 3501 section 2.3.2)."""
    system = sorted({f for f in flags if f.startswith("\\")})
    keywords = len({f.lower() for f in flags if not f.startswith("\\")})
    return " ".join(system + ([f"keywords:{keywords}"] if keywords else [])) or "-"


def _simple_item(item: FetchItem, box: SelectedMailbox, seq: int, u: int, meta: MessageMeta | None,
                 pre: dict[str, bytes] | None) -> bytes | None:
    """A FETCH item answered from the view, the message's metadata or what
    ``_batch_data`` rendered from its summary; None for sections, which
    need the sealed message."""
    name = item.name
    if name == "UID":
        return b"UID %d" % u
    if name == "FLAGS":
        return b"FLAGS (" + flag_text(box.flags_at(seq), u in box.recent) + b")"
    if name == "INTERNALDATE":
        assert meta is not None
        return b'INTERNALDATE "' + format_date_time(meta.internal_date).encode() + b'"'
    if name == "RFC822.SIZE":
        assert meta is not None
        return b"RFC822.SIZE %d" % meta.size
    key = _prerender_key(item)
    if key is not None:
        assert pre is not None
        return pre[key]
    return None


def _prerender_key(item: FetchItem) -> str | None:
    """The items rendered from the summary on a worker thread."""
    if item.name in ("ENVELOPE", "BODYSTRUCTURE") or (item.name == "BODY" and item.section is None):
        return item.name
    return None


def _render(key: str, st: structure.Structure) -> bytes:
    if key == "ENVELOPE":
        return b"ENVELOPE " + render.envelope(st.envelope)
    if key == "BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + render.body(st.body, True)
    return b"BODY " + render.body(st.body, False)


@dataclass
class _Batch:
    metas: dict[int, MessageMeta]
    structures: dict[int, structure.Structure]
    rendered: dict[int, dict[str, bytes]]
    # The first group of small messages, read in the same worker call
    # (``_first_group``): the UIDs tried, and what ``_read_small`` gave.
    tried: frozenset[int] = frozenset()
    parts: dict[int, list[bytes] | IntegrityError] | None = None
    # The rows read (``store.read_copies``), by UID: a large message is
    # opened from its row (``_open_row``) without reading it again.
    copies: dict[int, Any] | None = None


def _batch_data(store: Any, session: Any, mailbox: str, uids: list[int], need_meta: bool, need_structure: bool,
                pre_render: tuple[str, ...], keys: ContentKeyCache | None = None,
                items: list[FetchItem] | None = None) -> _Batch:
    """What FETCH needs of a batch of messages, on a worker thread: their
    metadata, their structures (from the sealed summaries; parsed from the
    content for a message without one) and the ENVELOPE/BODYSTRUCTURE text,
    so that building and rendering them never holds up the reactor.

    With ``items`` that ask for content, also the content of the batch's
    first group of small messages (the group do_FETCH would read next), so
    that a FETCH of one message or of a header window is one worker call
    and one metadata read, not two of each."""
    out = _Batch({}, {}, {})
    copies: list[Any] = []
    # A mail client's message list asks for top-level header sections only:
    # those are answered from the header cache (store/headercache.py), with
    # no content key, summary or blob opened for a message that has an entry.
    cached = need_meta and not pre_render and items is not None and _header_sections_only(items) \
        and hasattr(store, "open_headers")
    heads: dict[int, bytes] = {}
    if need_meta:
        read_copies = getattr(store, "read_copies", None)
        if read_copies is not None:
            copies = read_copies(session, mailbox, uids, with_headers=True) if cached \
                else read_copies(session, mailbox, uids)
            out.metas = {c.meta.uid: c.meta for c in copies}
            out.copies = {c.meta.uid: c for c in copies}
        else:
            out.metas = {m.uid: m for m in store.snapshot(session, mailbox, uids).messages}
        uids = [u for u in uids if u in out.metas]
    if cached and copies:
        heads = store.open_headers(session, copies)
        shapes: dict[int, structure.Structure] = {}  # one per header length (read only)
        for u, head in heads.items():
            n = len(head)
            st = shapes.get(n)
            if st is None:
                st = shapes[n] = replace(_NO_STRUCTURE, header_size=n)
            out.structures[u] = st
    if need_structure and uids:
        summaries = getattr(store, "summaries", None)
        # A mail client's message list asks for top-level header fields
        # only: the header's length is all that is needed of the structure,
        # and building the whole of it from the summary cost more than the
        # header's decryption.
        head_only = not pre_render and items is not None and all(
            not _needs_structure(i) or _top_level_section(i) for i in items)
        rest = [u for u in uids if u not in out.structures]
        if summaries is not None and rest:
            for u, doc in (summaries(session, mailbox, rest, keys) or {}).items():
                if doc:
                    out.structures[u] = replace(_NO_STRUCTURE, header_size=int(doc.get("header_size") or 0)) \
                        if head_only else structure.from_summary(doc)
        rest = [u for u in uids if u not in out.structures]
        if rest:
            out.structures.update(_parse_structures(store, session, mailbox, rest))
        if pre_render:
            out.rendered = {u: {k: _render(k, st) for k in pre_render} for u, st in out.structures.items()}
    if cached and copies and items is not None:
        _cached_parts(store, session, mailbox, uids, items, out, heads, copies, keys)
    elif items is not None and copies and any(_needs_bytes(i) for i in items):
        plans = [(u, _wants(items, out.structures.get(u), out.metas[u].size)) for u in uids
                 if not need_structure or u in out.structures]
        group = _first_group(plans)
        if group:
            out.tried = frozenset(u for u, _ in group)
            out.parts = _read_small(store, session, mailbox, group, keys, rows=copies)
    return out


def _header_sections_only(items: list[FetchItem]) -> bool:
    """Whether a FETCH asks for content, and only for top-level header
    sections (BODY[HEADER], BODY[HEADER.FIELDS (...)], BODY[HEADER.FIELDS.NOT
    (...)], RFC822.HEADER; PEEK or not, partial or not): what the header
    cache answers."""
    content = False
    for item in items:
        if not _needs_bytes(item):
            continue
        content = True
        if item.name == "RFC822.HEADER":
            continue
        if item.name != "BODY" or item.section is None or item.section.part or \
                item.section.text not in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return False
    return content


def _from_header(head: bytes, wants: list[_Want]) -> list[bytes]:
    """The requested bytes of a message, from its header block: what
    ``_read_small`` gives for wants that lie within the header."""
    parts = []
    for w in wants:
        data = head[w.start:w.end]
        if w.fields is not None:
            data = _partial(_filter_headers(data, w.fields[0], w.fields[1]), w.partial)
        parts.append(data)
    return parts


def _cached_parts(store: Any, session: Any, mailbox: str, uids: list[int], items: list[FetchItem], out: _Batch,
                  heads: dict[int, bytes], copies: list[Any], keys: ContentKeyCache | None) -> None:
    """``_batch_data``'s content for header sections only: each message
    whose header cache entry opened (``heads``) answered from it; the
    others read from their messages (headers up to ``HEADER_CACHE_MAX``,
    at most INLINE_BUDGET octets of them: the rest are left to do_FETCH),
    then their entries written (``store.save_headers``)."""
    parts: dict[int, list[bytes] | IntegrityError] = {}
    fill: list[tuple[int, list[_Want]]] = []
    held = 0
    # Header sections depend on the header's length only: their wants are
    # planned once per length (and only read after).
    planned: dict[int, list[_Want]] = {}
    for u in uids:
        st = out.structures.get(u)
        if st is None:
            continue
        wants = planned.get(st.header_size)
        if wants is None:
            wants = planned[st.header_size] = _wants(items, st, out.metas[u].size)
        head = heads.get(u)
        if head is not None:
            parts[u] = _from_header(head, wants)
        elif st.header_size <= HEADER_CACHE_MAX and held + st.header_size <= INLINE_BUDGET:
            held += st.header_size
            # The items read as without the cache, then the whole header
            # for the entry (its first chunk is decrypted once more: once
            # per message, for its entry).
            fill.append((u, [*wants, _Want(b"", 0, st.header_size, None, None)]))
    tried = set(parts)
    if fill:
        read = _read_small(store, session, mailbox, fill, keys, rows=copies)
        new = []
        for u, got in read.items():
            if isinstance(got, IntegrityError):
                parts[u] = got
                continue
            parts[u] = got[:-1]
            new.append((u, out.metas[u].message_id, got[-1]))
        tried.update(u for u, _ in fill)
        if new:
            store.save_headers(session, mailbox, new)
    out.tried = frozenset(tried)
    out.parts = parts


def _open_row(store: Any, session: Any, mailbox: str, row: Any, keys: ContentKeyCache | None) -> Any:
    """``store.open_message`` of a message whose row ``store.read_copies``
    read already (no second query): its reader, or its IntegrityError."""
    for _, reader in store.open_messages(session, mailbox, [row.meta.uid], keys, rows=[row]):
        if isinstance(reader, IntegrityError):
            raise reader
        return reader
    raise MessageNotFound(f"no message with UID {row.meta.uid}")


# The structure of an empty summary: what ``from_summary`` gives for the
# envelope and body of a message of which only the header length is used.
_NO_STRUCTURE = structure.from_summary({})


def _top_level_section(item: FetchItem) -> bool:
    """A content item whose range needs only the header's length (HEADER,
    HEADER.FIELDS[.NOT], TEXT of the message itself)."""
    if item.name in ("RFC822.HEADER", "RFC822.TEXT"):
        return True
    return item.name == "BODY" and item.section is not None and not item.section.part and item.section.text != ""


def _first_group(plans: list[tuple[int, list[_Want]]]) -> list[tuple[int, list[_Want]]]:
    """The leading messages do_FETCH reads together: each asks for at most
    INLINE_MAX bytes, all together for at most INLINE_BUDGET."""
    group: list[tuple[int, list[_Want]]] = []
    held = 0
    for u, wants in plans:
        n = sum(w.end - w.start for w in wants)
        if n > INLINE_MAX or (group and held + n > INLINE_BUDGET):
            break
        group.append((u, wants))
        held += n
    return group


@dataclass
class _Want:
    """The bytes one content item of FETCH asks for: a range of the
    plaintext, then (HEADER.FIELDS) a header filter and a partial."""

    label: bytes
    start: int
    end: int
    fields: tuple[tuple[str, ...], bool] | None
    partial: tuple[int, int] | None


def _wants(items: list[FetchItem], st: structure.Structure | None, size: int) -> list[_Want]:
    """The content items of a FETCH for one message, in order."""
    out = []
    for item in items:
        if not _needs_bytes(item):
            continue
        label, (start, end), fields = _section_range(item, st, size)
        partial = item.partial
        if fields is None and partial is not None:
            start = min(end, start + partial[0])
            end = min(end, start + partial[1])
            partial = None
        out.append(_Want(label.encode("ascii", "surrogateescape"), start, end, fields, partial))
    return out


def _read_small(store: Any, session: Any, mailbox: str, wants: list[tuple[int, list[_Want]]],
                keys: ContentKeyCache | None = None, rows: Any = None) -> dict[int, list[bytes] | IntegrityError]:
    """The requested bytes of a group of small messages, on a worker thread:
    the store opens them in one go (``open_messages``), one at a time, each
    closed before the next. A message that fails authentication maps to its
    ``IntegrityError``; one that is gone is left out. ``rows``: the
    messages as ``store.read_copies`` read them just before."""
    by_uid = dict(wants)
    out: dict[int, list[bytes] | IntegrityError] = {}
    opened = store.open_messages(session, mailbox, list(by_uid), keys) if rows is None \
        else store.open_messages(session, mailbox, list(by_uid), keys, rows=rows)
    for uid, reader in opened:
        if isinstance(reader, IntegrityError):
            out[uid] = reader
            continue
        try:
            parts = []
            for w in by_uid[uid]:
                data = _read_at(reader, w.start, w.end - w.start)
                if len(data) != w.end - w.start:
                    raise IntegrityError("sealed message is shorter than its recorded size")
                if w.fields is not None:
                    data = _partial(_filter_headers(data, w.fields[0], w.fields[1]), w.partial)
                parts.append(data)
            out[uid] = parts
        except IntegrityError as exc:
            out[uid] = exc
        finally:
            reader.close()
    return out


def _fetch_response(items: list[FetchItem], box: SelectedMailbox, seq: int, u: int, meta: MessageMeta,
                    pre: dict[str, bytes] | None, seen_now: bool, wants: list[_Want], parts: list[bytes]) -> bytes:
    """One whole ``* n FETCH (...)`` response, content read already."""
    if seen_now and not any(i.name == "FLAGS" for i in items):
        items = [*items, FetchItem("FLAGS")]
    pieces: list[bytes] = []
    k = 0
    for item in items:
        simple = _simple_item(item, box, seq, u, meta, pre)
        if simple is not None:
            pieces.append(simple)
        else:
            data = parts[k]
            pieces.append(wants[k].label + b" {%d}\r\n" % len(data) + data)
            k += 1
    return b"* %d FETCH (" % seq + b" ".join(pieces) + b")\r\n"


def _needs_structure(item: FetchItem) -> bool:
    if item.name in ("ENVELOPE", "BODYSTRUCTURE"):
        return True
    if item.name == "BODY":
        return item.section is None or bool(item.section.part) or item.section.text != ""
    return item.name in ("RFC822.HEADER", "RFC822.TEXT")


def _needs_bytes(item: FetchItem) -> bool:
    return (item.name == "BODY" and item.section is not None) or item.name in ("RFC822", "RFC822.HEADER",
                                                                                "RFC822.TEXT")


def _section_range(item: FetchItem, st: structure.Structure | None, size: int) \
        -> tuple[str, tuple[int, int], tuple[tuple[str, ...], bool] | None]:
    """(response label, byte range, header filter) of a content item."""
    if item.name == "RFC822":
        return "RFC822", (0, size), None
    if item.name == "RFC822.HEADER":
        assert st is not None
        return "RFC822.HEADER", (0, st.header_size), None
    if item.name == "RFC822.TEXT":
        assert st is not None
        return "RFC822.TEXT", (st.header_size, size), None
    section = item.section or Section()
    label = _response_name(item)
    if not section.part:
        if section.text == "":
            return label, (0, size), None
        assert st is not None
        head = (0, st.header_size)
        text = (st.header_size, size)
    else:
        assert st is not None
        part = st.part(section.part)
        if part is None:
            return label, (0, 0), None
        if section.text == "":
            return label, (part.body_start, part.body_end), None
        if section.text == "MIME":
            return label, (part.header_start, part.body_start), None
        inner = part.message
        if inner is None:
            return label, (0, 0), None
        head = (inner.header_start, inner.body_start)
        text = (inner.body_start, inner.body_end)
    if section.text == "HEADER":
        return label, head, None
    if section.text == "TEXT":
        return label, text, None
    return label, head, (section.fields, section.text == "HEADER.FIELDS.NOT")


@functools.lru_cache(maxsize=256)
def _response_name(item: FetchItem) -> str:
    # Asked per message and item (twice: planning on the worker, answering
    # on the reactor); a 50-message window names the same few items.
    return item.response_name()


def _partial(data: bytes, partial: tuple[int, int] | None) -> bytes:
    if partial is None:
        return data
    return data[partial[0]:partial[0] + partial[1]]


@functools.lru_cache(maxsize=256)
def _wanted_fields(names: tuple[str, ...]) -> tuple[frozenset[str], frozenset[bytes]]:
    """The lower-case names HEADER.FIELDS asks for, and those of them that
    are ASCII as bytes (what an ASCII field name is compared with)."""
    wanted = frozenset(n.lower() for n in names)
    return wanted, frozenset(w.encode("ascii") for w in wanted if w.isascii())


def _filter_headers(head: bytes, names: tuple[str, ...], negate: bool) -> bytes:
    """RFC 3501 §6.4.5 HEADER.FIELDS (and .NOT): the matching fields, with
    their continuation lines, then the blank line."""
    # Called per message of a header window: an ASCII field name (nearly
    # all) is lowered and looked up as bytes; any other is decoded as
    # before (each non-ASCII octet a U+FFFD), so the answers are the same.
    wanted, wanted_ascii = _wanted_fields(names)
    out: list[bytes] = []
    keep = False
    for line in head.split(b"\r\n"):
        if not line:
            break
        if line[0] in (32, 9):  # SP, HTAB: a continuation line
            if keep:
                out.append(line)
            continue
        field = line.split(b":", 1)[0].strip().lower()
        keep = ((field in wanted_ascii) if field.isascii()
                else (field.decode("ascii", "replace") in wanted)) != negate
        if keep:
            out.append(line)
    return b"\r\n".join(out) + b"\r\n\r\n" if out else b"\r\n"


def _read_at(reader: Any, pos: int, n: int) -> bytes:
    reader.seek(pos)
    return reader.read(n)  # type: ignore[no-any-return]


def _parse_structures(store: Any, session: Any, mailbox: str, uids: list[int]) -> dict[int, structure.Structure]:
    """For messages without a sealed summary: decrypt and parse, one at a time."""
    out = {}
    for u in uids:
        try:
            reader = store.open_message(session, mailbox, u)
        except MessageNotFound:
            continue
        try:
            raw = reader.read()
        finally:
            reader.close()
        out[u] = structure.parse(raw)
        del raw
    return out


def _echo_tag(word: bytes) -> bytes | None:
    """``word`` if it is a tag (RFC 3501 §9), else None (untagged answer).
    Refusals made before the command is parsed echo the first word of a
    raw line, which may hold 8-bit bytes or a bare CR or LF ("a\\n1 OK")
    that would forge a second response line (fuzz/imap.py found both)."""
    return word if word and all(c in TAG_CHARS for c in word) else None


class _Sink:
    """Collects (or discards) one literal of a known size, in memory only:
    plaintext mail must never touch the disk."""

    def __init__(self, size: int, discard: bool = False) -> None:
        self.remaining = size
        self.discard = discard
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> bytes | None:
        """Take what belongs to the literal; returns the bytes after it once
        complete, else None."""
        take = data[: self.remaining]
        self.remaining -= len(take)
        if not self.discard and take:
            self._chunks.append(take)
        if self.remaining > 0:
            return None
        return data[len(take):]

    def value(self) -> bytes:
        return b"".join(self._chunks)
