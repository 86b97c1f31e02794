"""The SMTP submission protocol: aiosmtpd's ``SMTP`` with our rules.

aiosmtpd parses commands and keeps the session state; this subclass adds
what a submission server for PHI needs and aiosmtpd does not do, or does
differently:

- **TLS first** (RFC 3207 section 4, RFC 8314). On the STARTTLS port only
  EHLO, HELO, STARTTLS, NOOP, RSET and QUIT work before TLS; everything else
  gets 530 5.7.0. aiosmtpd's own list (``ALLOWED_BEFORE_STARTTLS``) lacks
  HELO and RSET and is a module global, so we pass ``require_starttls=False``
  and check in a wrapper around every command method instead. Bytes the
  client pipelined after STARTTLS are thrown away when the handshake ends
  (RFC 3207 section 4.2; aiosmtpd clears its read buffer in
  ``connection_made``), so an injected command is never run.
- **EHLO** is ours: before TLS it offers only STARTTLS and
  ENHANCEDSTATUSCODES; after TLS, AUTH PLAIN LOGIN, SIZE, 8BITMIME,
  PIPELINING, ENHANCEDSTATUSCODES and SMTPUTF8. SMTPUTF8 (RFC 6531) is
  end to end here: the store keeps message bytes exactly as received, and
  addresses are compared as Unicode text.
- **Every reply** goes through :func:`.replies.rewrite`, which gives
  aiosmtpd's built-in replies an enhanced status code (RFC 2034, 3463) and
  a sentence a person can act on.
- **DATA** is read in large chunks rather than line by line (about fifty
  times faster for a 10 MB attachment) under the same rules as aiosmtpd
  >= 1.4.5: only CR LF . CR LF ends a message (RFC 5321 section 4.1.1.4).
  Because the CR LF that ends the DATA command line counts as the start
  of that sequence, the search runs over the data with a virtual CR LF in
  front. Every other "end" (``\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r\\n``,
  ``\\r\\n.\\r``, ...) is data, and then a bare CR or LF, which
  RFC 5321 section 2.3.8 forbids, refuses the whole message: a smuggled
  second message can never be split off. The size cap holds while
  streaming (RFC 1870): past it, data is discarded and 552 5.3.4 answers
  the end of data (RFC 5321 section 4.2.5 puts the reply there); a client
  that sends far more without ending is disconnected.
- **Limits** from ``[smtp]``: commands and refused commands per session
  (421 4.7.0 and close), an idle timeout that also covers each piece of
  DATA (421 4.4.2), connections per client address (421 4.7.0), line
  length (RFC 5321 section 4.5.3.1.6).
- **Draining**: on shutdown an idle session is closed at once with
  421 4.3.2 (RFC 5321 section 3.8); one inside a mail transaction may finish
  it first.

Logs name the session id, the account and rule ids; never a subject, a file
name, a body or a typed user name (which may be a mistyped password).
aiosmtpd's own ``mail.log`` logs data and replies, so ``postvault.logs``
holds it at WARNING.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
import re
import secrets
import ssl
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from ..conf.schema import SmtpConfig
from ..policy.recipients import Recipient, Sender
from ..policy.schema import Policy, format_size
from ..store.types import AccountInfo
from . import replies

if TYPE_CHECKING:
    from .service import SessionRegistry

log = logging.getLogger("postvault.smtpd")

# Commands allowed before TLS on the STARTTLS port (RFC 3207 section 4).
PRE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "RSET", "QUIT"})
# The StreamReader's limit: the longest command line we buffer before
# answering "too long", and the flow-control window (asyncio pauses reading
# at twice this). DATA lines are checked against [smtp] max_line_length.
READER_LIMIT = 64 * 1024
DATA_READ = 1024 * 1024
END_OF_DATA = b"\r\n.\r\n"
# Command line limits (RFC 5321 section 4.5.3.1.4: 512 octets), raised by
# the extensions we offer: SIZE +26 (RFC 1870), BODY=8BITMIME +14
# (RFC 6152), SMTPUTF8 +10 (RFC 6531 section 3.4), AUTH= +500 (RFC 4954
# section 5); AUTH command lines with an initial response up to 12288
# octets (RFC 4954 section 4).
COMMAND_LIMITS = {"MAIL": 512 + 26 + 14 + 10 + 500, "AUTH": 12288}
# Once this much has been discarded past the size limit without an end of
# data, the client is not listening for 552: disconnect.
DISCARD_BEYOND = 16 * 1024 * 1024
# Seconds a closing connection gets to finish the TLS close before it is cut.
CLOSE_GRACE = 5.0
_AUTH_PARAM = re.compile(r"\s+AUTH=\S*", re.IGNORECASE)


class SubmissionSession(Session):
    """aiosmtpd's session; ``auth_data`` is our ``AccountInfo`` after AUTH."""

    # aiosmtpd's login_data property logs a deprecation warning each time
    # smtp_AUTH sets it; we never read it.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _CRLFReader(asyncio.StreamReader):
    """aiosmtpd's reader, with command lines that end only at CR LF.

    aiosmtpd reads a command with ``readuntil()``, i.e. up to a bare LF, so
    ``NOOP\\nMAIL FROM:<x>\\r\\n`` would be two commands: the command-phase
    twin of SMTP smuggling (SEC Consult, Dec 2023; Postfix's
    smtpd_forbid_bare_newline covers commands too), and RFC 5321 section
    2.3.8 forbids bare CR and LF. A line that holds one anywhere but its
    final CR LF reaches aiosmtpd as an empty line, which it refuses with
    "500 5.5.2 bad syntax" (and which counts as a refused command).
    ``readline()`` (AUTH's answers) passes its own separator and is unchanged.
    """

    async def readuntil(self, separator: Any = b"\r\n") -> bytes:
        line = await super().readuntil(separator)
        if separator == b"\r\n" and (b"\n" in line[:-2] or b"\r" in line[:-2]):
            return b"\r\n"
        return line


class SubmissionEnvelope(Envelope):
    """One mail transaction, with what the policy needs across its commands."""

    def __init__(self) -> None:
        super().__init__()
        # Taken once at MAIL, so a reload never mixes two policies in one message.
        self.policy: Policy | None = None
        self.sender: Sender | None = None
        # The sender's conversation partners, looked up on first need.
        self.partners: frozenset[str] | None = None
        self.recipients: list[Recipient] = []
        # Address-book colleagues without an account yet: invited (pending
        # account and key pair made, sign-up link mailed) just before the
        # message is delivered to them (issue 6: "automatically when a member
        # first writes to a colleague without an account").
        self.to_invite: list[str] = []


# MAIL FROM / RCPT TO arguments of the common form "<dot-atom@dot-atom>"
# plus parameters: for these, aiosmtpd's parse (email._header_value_parser's
# get_angle_addr, a few hundred microseconds per command) returns exactly
# the text between the brackets and the rest of the line, so it is skipped.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# After the ">", the parser also takes any white space (and comments) off
# the rest: only a plain run of blanks before a parameter is taken here.
_PLAIN_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
                         r"(?:[ \t]+(?=[^ \t(\r\n])|(?![ \t(\r\n]))(.*)\Z", re.DOTALL)


class SubmissionProtocol(SMTP):
    """One client connection (see the module docstring)."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's ``_getaddr``, with a fast path for a plain address
        (same result; anything else takes aiosmtpd's parser)."""
        m = _PLAIN_PATH.match(arg) if arg else None
        if m is None:
            return super()._getaddr(arg)
        addr, rest = m.group(1), m.group(2)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def __init__(self, handler: Any, *, registry: SessionRegistry, limits: SmtpConfig, implicit_tls: bool,
                 tls_context: ssl.SSLContext | None, hostname: str, data_size_limit: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        # Read by SMTP.__init__ as the StreamReader's limit; see READER_LIMIT.
        self.line_length_limit = READER_LIMIT
        super().__init__(
            handler,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="ESMTP Postvault",
            # On 465 there is nothing to STARTTLS; on 587 we enforce it ourselves.
            tls_context=None if implicit_tls else tls_context,
            require_starttls=False,
            timeout=limits.idle_timeout_seconds,
            auth_required=True,
            auth_require_tls=True,
            loop=loop,
        )
        if implicit_tls:
            # aiosmtpd only knows STARTTLS as TLS (aiosmtpd#281): with
            # auth_require_tls it would refuse AUTH on 465, where the whole
            # connection is TLS. Passing False to the constructor works too,
            # but logs and warns on every connection; this is the same setting.
            self._auth_require_tls = False
        self.sid = secrets.token_hex(4)
        self.registry = registry
        self.limits = limits
        self.implicit_tls = implicit_tls
        self.peer_ip = ""
        self._refused = False
        self._closing = False
        self._draining = False
        self._busy = False
        self._commands = 0
        self._errors = 0
        self._size_text = format_size(data_size_limit)
        # Per connection, not aiosmtpd's class-level dict that every
        # connection's EHLO grows.
        self.command_size_limits = _limits_dict()
        self._smtp_methods = {name: self._guard(name, method) for name, method in self._smtp_methods.items()}
        # Command lines end with CR LF only (see _CRLFReader). aiosmtpd makes
        # its StreamReader in SMTP.__init__ with no way to pass a class.
        reader = getattr(self, "_stream_reader", None)  # asyncio.StreamReaderProtocol's
        if reader is not None:
            reader.__class__ = _CRLFReader

    # -- state -------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        """TLS is on: the listener is implicit TLS, or STARTTLS completed."""
        return self.implicit_tls or (self.session is not None and self.session.ssl is not None)

    @property
    def account(self) -> AccountInfo | None:
        if self.session is None or not self.session.authenticated:
            return None
        data = self.session.auth_data
        return data if isinstance(data, AccountInfo) else None

    @property
    def in_transaction(self) -> bool:
        return self._busy or (self.envelope is not None and self.envelope.mail_from is not None)

    def tls_summary(self) -> str:
        """"TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)", for Received."""
        obj = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if obj is None:
            return "no TLS"
        cipher = obj.cipher()
        if not cipher:
            return str(obj.version())
        name, _, bits = cipher
        return f"{obj.version()} with cipher {name} ({bits}/{bits} bits)"

    def _create_session(self) -> Session:
        return SubmissionSession(self.loop)

    def _create_envelope(self) -> Envelope:
        return SubmissionEnvelope()

    # -- connections ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if peer else ""
            if not self.registry.admit(self):
                self._refused = True
                log.warning("session=%s ip=%s refused: too many connections from this address", self.sid,
                            self.peer_ip)
                transport.write(replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
        super().connection_made(transport)
        if first:
            log.info("session=%s connect ip=%s listener=%s", self.sid, self.peer_ip,
                     "submissions" if self.implicit_tls else "submission")
        else:
            log.info("session=%s starttls %s", self.sid, self.tls_summary())

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self.registry.release(self)
        log.info("session=%s closed commands=%d errors=%d", self.sid, self._commands, self._errors)
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        # aiosmtpd closes silently; RFC 5321 section 3.8 prefers a 421 first.
        log.info("session=%s idle timeout", self.sid)
        self.close_with(replies.IDLE_TIMEOUT)

    def close_with(self, reply: str) -> None:
        """Send a final 421 (not counted as an error) and close the connection."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        try:
            self.transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
        except (OSError, RuntimeError):
            pass  # the peer is gone; closing is all that is left
        self.transport.close()
        # A TLS close waits for the client's close_notify; a client that
        # never sends it must not hold its slot for long.
        self.loop.call_later(CLOSE_GRACE, self.abort)

    def begin_drain(self) -> None:
        """Shutdown: close now if idle, else after the current transaction."""
        self._draining = True
        if not self.in_transaction:
            self.close_with(replies.SHUTTING_DOWN)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    # -- replies ------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if self._closing:
            return
        if isinstance(status, bytes):  # AUTH challenges (334), already final
            await super().push(status)
            return
        reply = str(status)
        if not self._exempt(reply):
            reply, known = replies.rewrite(reply, limit=self._size_text)
            if not known:
                log.warning("session=%s reply without a mapping, code=%s", self.sid, reply[:3])
        failed = reply[:1] in ("4", "5") and not reply.startswith("421")
        await super().push(reply)
        if reply.startswith("421"):
            # RFC 5321 section 3.8: 421 means the channel is closing.
            self._closing = True
            if self.transport is not None:
                self.transport.close()
            return
        if failed:
            self._errors += 1
            if self._errors >= self.limits.max_errors:
                log.warning("session=%s account=%s too many errors (%d); closing", self.sid,
                            self.account.email if self.account else "-", self._errors)
                self.close_with(replies.TOO_MANY_ERRORS)

    def _exempt(self, reply: str) -> bool:
        # RFC 2034 section 3: no enhanced code on the greeting and on the
        # replies to EHLO and HELO.
        return reply.startswith(f"220 {self.hostname} ") or reply == f"250 {self.hostname}"

    async def _push_lines(self, code: str, lines: list[str]) -> None:
        for i, line in enumerate(lines):
            await super().push(f"{code}{' ' if i == len(lines) - 1 else '-'}{line}")

    async def handle_exception(self, error: Exception) -> str:
        """One place for unexpected errors: public text to the client, the
        error's class and stack (never its message, which may quote data)
        to the log."""
        reply, reason = replies.error_reply(error)
        if isinstance(error, TLSSetupException):
            # Scanners and clients that dislike the certificate; not our error.
            log.info("session=%s STARTTLS handshake failed", self.sid)
            return reply
        stack = "".join(traceback.format_tb(error.__traceback__)[-3:]).replace("\n", " | ")
        log.error("session=%s account=%s error=%s stack=%s", self.sid,
                  self.account.email if self.account else "-", reason, stack)
        return reply

    # -- the command wrapper ---------------------------------------------------

    def _guard(self, name: str, method: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def guarded(arg: Any) -> None:
            self._commands += 1
            if self._commands > self.limits.max_commands:
                log.warning("session=%s too many commands; closing", self.sid)
                self.close_with(replies.TOO_MANY_COMMANDS)
                return
            if not self.encrypted and name not in PRE_TLS:
                await self.push(replies.STARTTLS_FIRST)
                return
            self._busy = True
            try:
                await method(arg)
            finally:
                self._busy = False
            if self._draining and not self.in_transaction:
                self.close_with(replies.SHUTTING_DOWN)

        return guarded

    # -- commands -------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [self.hostname]
        if self.encrypted:
            lines += ["AUTH PLAIN LOGIN", f"SIZE {self.data_size_limit}", "8BITMIME", "PIPELINING",
                      "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        else:
            # Nothing that could be used before TLS (RFC 3207 section 4.2).
            lines += ["STARTTLS", "ENHANCEDSTATUSCODES"]
        await self._push_lines("250", lines)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.encrypted:
            await self.push(replies.TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        # RFC 4954 section 5: a server offering AUTH accepts the AUTH=
        # parameter of MAIL. We never relay, so its value does not matter.
        if arg:
            # Parameters follow the address: after its ">", or its first space.
            head, bracket, params = arg.partition(">")
            if not bracket:
                head, space, params = arg.partition(" ")
                params = space + params
            arg = head + bracket + _AUTH_PARAM.sub("", params)
        await super().smtp_MAIL(arg)

    async def smtp_VRFY(self, arg: str) -> None:
        await self.push(replies.NOT_IMPLEMENTED.format(command="VRFY"))

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push(replies.DATA_READY)
        try:
            content, refusal = await self._read_message()
            if refusal is not None:
                # Logged and audited by the handler, like its own refusals.
                await self.event_handler.refused(self, "data", refusal[0], int(refusal[1][:3]))
                await self.push(refusal[1])
                return
            if content is None:  # disconnected
                return
            self.envelope.content = self.envelope.original_content = content
            status = await self._call_handler_hook("DATA")
        finally:
            self._set_post_data_state()
        await self.push(status)

    async def _read_message(self) -> tuple[bytes | None, tuple[str, str] | None]:
        """Read up to CR LF . CR LF; returns (unstuffed content, None) or
        (None, (rule id, reply)) or (None, None) after a disconnect."""
        limit = self.data_size_limit or 0
        max_line = self.limits.max_line_length
        # The message with a virtual CR LF in front (see the module docstring).
        kept = bytearray(b"\r\n")
        scan = 0      # where the next search for END_OF_DATA starts
        dots = 0      # "\r\n." in kept: stuffed dots (RFC 5321 section 4.5.2)
        discarded = 0
        line = 0      # length of the current line so far (CR and stuffed dot included)
        too_big = too_long = False
        while True:
            chunk = await self._reader.read(DATA_READ)
            if not chunk:
                return None, None
            # Idle is idle between pieces of the message too, not one
            # deadline for the whole upload.
            self._reset_timeout()
            start = len(kept)
            kept += chunk
            end = kept.find(END_OF_DATA, scan)
            if not too_big:
                own = chunk if end < 0 else chunk[: end + 5 - start]
                line, longest = _line_lengths(own, line)
                too_long = too_long or longest > max_line
            if end >= 0:
                rest = kept[end + 5:]
                if rest:
                    # Pipelined commands after the end of data (RFC 2920)
                    # belong to the command loop: give them back.
                    self._reader._buffer[0:0] = rest  # type: ignore[attr-defined]
                del kept[end + 2:]
                break
            # An end of data may straddle this chunk and the next: search
            # again from its longest possible start (never from before 0,
            # which find would read as counted from the end).
            scan = max(0, len(kept) - 4)
            if not too_big:
                dots += kept.count(b"\r\n.", max(0, start - 2))
                # The content so far: without the virtual CR LF and the
                # stuffed dots, and without the CR of an end of data whose
                # LF is still to come (a message of exactly the limit must
                # pass however it is cut into reads).
                pending = 1 if kept.endswith(b"\r\n.\r") else 0
                too_big = len(kept) - 2 - dots - pending > limit > 0
            if too_big:
                discarded += len(kept) - 4
                del kept[:-4]
                scan = 0
                if discarded > limit + DISCARD_BEYOND:
                    log.warning("session=%s oversize message never ended; closing", self.sid)
                    self.close_with(replies.TOO_BIG_CLOSING.format(limit=self._size_text))
                    return None, None
        # The exact unstuffed size, checked first whatever the reads were:
        # the streaming check above only looks at messages that end in a
        # later read, and the answer must not depend on how the message was
        # cut into reads (fuzz/smtp_data.py).
        if too_big or (limit and len(kept) - 2 - kept.count(b"\r\n.") > limit):
            return None, ("data.too-big", replies.TOO_BIG.format(limit=self._size_text))
        if too_long:
            return None, ("data.line-too-long", replies.LINE_TOO_LONG.format(limit=max_line))
        # RFC 5321 section 2.3.8: CR and LF only as CR LF. Counted on the
        # whole message, so a bare one anywhere refuses it.
        crlf = kept.count(b"\r\n")
        if kept.count(b"\r") != crlf or kept.count(b"\n") != crlf:
            return None, ("data.bare-line-break", replies.BARE_LINE_BREAK)
        unstuffed = kept.replace(b"\r\n.", b"\r\n") if dots or b"\r\n." in kept else kept
        with memoryview(unstuffed) as view:
            body = bytes(view[2:])
        return body, None


def _limits_dict() -> defaultdict[str, int]:
    return defaultdict(lambda: SMTP.command_size_limit, COMMAND_LIMITS)


def _line_lengths(data: bytes | bytearray, current: int) -> tuple[int, int]:
    """(length of the unfinished last line, longest finished line), where
    ``current`` is the length of the line ``data`` continues. A line's
    length counts everything before its LF (so its CR, and a stuffed dot)."""
    parts = data.split(b"\n")
    if len(parts) == 1:
        current += len(data)
        return current, current
    longest = max(current + len(parts[0]), max(map(len, parts[1:-1]), default=0))
    last = len(parts[-1])
    return last, max(longest, last)
