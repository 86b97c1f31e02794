"""Fuzz harness: IMAP command reading and parsing, as the server does it.

Target: ``postvault.imapd.server.IMAPServer``, the real class, fed client
bytes through Twisted's ``LineReceiver.dataReceived`` (the framing we keep
from Twisted) over an in-memory transport, in fuzzer-chosen pieces. It
reads whole commands with their literals (``{N}``, ``{N+}``, the literal
and line limits, ``[TOOBIG]``) and parses them with ``imapd/parse.py``
(tags, atoms, strings, sequence sets, FETCH attributes and sections,
SEARCH keys, flags, dates, ID, ENABLE, STATUS, APPEND) in the state the
first byte picks: not authenticated, authenticated or selected. Only the
command handlers are left out (``_run`` records the parsed arguments
instead): they need a store, and the abuse suite drives them over TLS.

Invariants:
- no exception escapes the reading path (the server's own catch-all,
  "error reading a command", logs at ERROR: a logged error is a crash);
- every response is a line: ``* ...``, ``+ ...`` or ``TAG OK|NO|BAD ...``,
  with no bare CR or LF (a client must not read a second, forged response
  out of one of ours);
- what was parsed renders back to what it means: a sequence set prints
  and re-parses to the same set, and a FETCH section's name in the
  response (``BODY[1.HEADER.FIELDS (A B)]``) parses back to the same
  section.

With the two low bits of the first byte both set, the input goes instead to
Twisted's own IMAP parsing helpers (``imap4.parseIdList``,
``imap4.parseNestedParens``), which the server does not call (it parses
with ``parse.py``) but Twisted's IMAP client does. There the documented
``IMAP4Exception`` family is expected, and so is ``ValueError`` from a
literal whose length is not a number (``{x}``), which Twisted does not
check. (``parseNestedParens`` also refuses a valid quoted string ending in
an escaped backslash; see ``fuzz/mime.py``.)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses
import logging
import random
import re
from types import SimpleNamespace
from typing import Any

from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.mail import imap4
from twisted.python import failure

from fuzz._common import check, fuzzing, instrumented, main, patched

with instrumented(fuzzing(__name__), ["postvault.imapd.parse", "postvault.imapd.server"]):
    from postvault.conf.schema import ImapConfig
    from postvault.imapd import parse
    from postvault.imapd import server as server_mod
    from postvault.policy.schema import AttachmentPolicy

STATES = ("unauth", "auth", "select")
# Small limits, so that the TOOBIG paths are reachable with small inputs
# (the schema's minimums do not apply to a dataclass made here).
LIMITS = dataclasses.replace(ImapConfig(), max_line_length=256, max_literal_size=512)
SERVICE = SimpleNamespace(
    limits=LIMITS,
    policy=SimpleNamespace(attachments=dataclasses.replace(AttachmentPolicy(), max_message_size=1024)),
    portal=None,
    disabled_for=lambda client, account: set(),
)
# The server schedules with the global reactor; a clock keeps each input
# self-contained (and runs the callLater(0) of the too-long-line path).
CLOCK = task.Clock()

_RESPONSE = re.compile(rb"(?:\* |\+ |\+\Z|[\x21-\x7e]+ (?:OK|NO|BAD)(?: |\Z))")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ERRORS = _Errors()


def _check_seqset(value: parse.SeqSet) -> None:
    again = parse.SeqSet.parse(str(value).encode())
    check(again == value, f"sequence set {value} re-parses as {again}")


def _command_parts(command: bytes) -> list[bytes | parse.Literal]:
    """A command with literals (``{N}\\r\\n`` and N octets) as the server's
    reader hands it to the parser."""
    parts: list[bytes | parse.Literal] = []
    pos = 0
    for m in re.finditer(rb"\{(\d+)\}\r\n", command):
        if m.start() < pos:
            continue  # inside the previous literal
        parts.append(command[pos:m.end() - 2])
        end = m.end() + int(m[1])
        parts.append(parse.Literal(command[m.end():end]))
        pos = end
    parts.append(command[pos:])
    return parts


def _check_fetch_item(item: parse.FetchItem) -> None:
    item.response_name()
    if item.section is None:
        return
    spec = item.section.spec().encode("ascii", "surrogateescape")
    cur = parse.Cursor(_command_parts(b"BODY[" + spec + b"]"))
    try:
        again = parse.fetch_items(cur)
        cur.end()
    except parse.BadCommand as exc:
        raise AssertionError(f"the response name of a section does not parse: {exc}") from None
    check(len(again) == 1 and again[0].section == item.section,
          "a section's response name parses as another section")


def _check_args(value: Any, depth: int = 0) -> None:
    if depth > 50:
        return
    if isinstance(value, parse.SeqSet):
        _check_seqset(value)
    elif isinstance(value, parse.FetchItem):
        _check_fetch_item(value)
    elif isinstance(value, parse.Key):
        for arg in value.args:
            _check_args(arg, depth + 1)
        for sub in value.sub:
            _check_args(sub, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_args(v, depth + 1)


class ParseOnly(server_mod.IMAPServer):
    """The real server up to the handlers (see the module docstring)."""

    failure: BaseException | None = None

    async def _run(self, tag: bytes, name: str, uid: bool, handler: Any, args: list[Any],
                   kw: dict[str, Any]) -> None:
        # Whatever this raises would end in the Deferred that _execute
        # drops: keep the first for one_input to raise.
        try:
            _check_args(args)
        except Exception as exc:  # noqa: BLE001 -- raised again by one_input
            self.failure = self.failure or exc
        self.sendPositiveResponse(tag, b"parsed")


def _check_output(out: bytes) -> None:
    # Every CR is followed by LF and every LF follows a CR.
    check(out.count(b"\r") == out.count(b"\r\n") == out.count(b"\n"), "a response holds a bare CR or LF")
    for line in out.split(b"\r\n")[:-1]:
        check(_RESPONSE.match(line), f"a response line is not a response: {line[:40]!r}")


def _server(data: bytes, state: str, seed: int) -> None:
    log = logging.getLogger("postvault.imapd")
    log.addHandler(ERRORS)
    try:
        with patched(server_mod, "reactor", CLOCK):
            _feed(data, state, seed)
    finally:
        log.removeHandler(ERRORS)


def _feed(data: bytes, state: str, seed: int) -> None:
    proto = ParseOnly(SERVICE, implicit_tls=True)
    proto.callLater = CLOCK.callLater  # type: ignore[method-assign,assignment]  # TimeoutMixin's timer
    transport = StringTransport(peerAddress=SimpleNamespace(host="127.0.0.1"))
    proto.makeConnection(transport)
    proto.state = state
    ERRORS.records.clear()
    rng = random.Random(seed)
    try:
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 64)
            proto.dataReceived(data[pos:pos + n])
            pos += n
            CLOCK.advance(0)
        CLOCK.advance(0)
    finally:
        proto.connectionLost(failure.Failure(ConnectionError("fuzz input done")))
        for call in CLOCK.getDelayedCalls():
            if call.active():  # type: ignore[misc]
                call.cancel()  # type: ignore[misc]
        CLOCK.calls.clear()
    if proto.failure is not None:
        raise proto.failure
    if ERRORS.records:
        record = ERRORS.records[0]
        if record.exc_info and record.exc_info[1] is not None:
            raise record.exc_info[1]
        raise AssertionError(f"the server logged an error: {record.getMessage()}")
    _check_output(transport.value())


def _twisted(data: bytes) -> None:
    try:
        imap4.parseIdList(data, 1000)
    except imap4.IllegalIdentifierError:
        pass
    try:
        imap4.parseNestedParens(data)
    except imap4.IMAP4Exception:
        pass
    except ValueError:
        pass  # a literal length that is not a number (module docstring)


def one_input(data: bytes) -> None:
    """Feed one client byte stream to the server's command reader."""
    if not data:
        return
    selector, rest = data[0], data[1:]
    if selector & 3 == 3:
        _twisted(rest)
    else:
        _server(rest, STATES[selector & 3], selector >> 2)


if __name__ == "__main__":
    logging.getLogger("postvault.imapd").propagate = False  # ERRORS has them
    main(one_input)
