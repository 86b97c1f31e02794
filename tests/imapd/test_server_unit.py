"""The protocol object alone, over Twisted's ``StringTransport`` with a fake
clock: timers (idle autologout, absolute limit), line and literal limits,
per-client capability switches, parsers, and that no command of Twisted's
base class is left reachable with its own (synchronous) handler."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import imap4

from postvault.conf.schema import ImapConfig, parse_switches
from postvault.errors import AuthenticationFailed
from postvault.imapd import server as server_module
from postvault.imapd.parse import BadCommand, Cursor, Literal, SeqSet, compact_set, fetch_items, search_keys
from postvault.imapd.server import SWITCHABLE, IMAPServer
from postvault.imapd.structure import parse
from postvault.policy.schema import Policy


class FakeService:
    def __init__(self, limits: ImapConfig) -> None:
        self.limits = limits
        self.policy = Policy()
        self.bus = None
        self.portal = None
        self.store = None

    def disabled_for(self, client: str, account: str) -> set[str]:
        out: set[str] = set()
        for who, caps in self.limits.disable_for_clients:
            if client and who in client.lower():
                out |= caps
        return out & SWITCHABLE

    def run(self, f: Any, *a: Any, **kw: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f, *a, **kw)


class SecureTransport(StringTransport):
    secure = True

    def drained(self) -> defer.Deferred[None]:
        return defer.succeed(None)


def make(limits: ImapConfig | None = None) -> tuple[IMAPServer, SecureTransport, Clock]:
    clock = Clock()
    proto = IMAPServer(FakeService(limits or ImapConfig()), implicit_tls=True)
    proto.callLater = clock.callLater  # TimeoutMixin's timer
    transport = SecureTransport()
    original = server_module.reactor.callLater  # type: ignore[attr-defined]
    server_module.reactor.callLater = clock.callLater  # type: ignore[attr-defined]
    try:
        proto.makeConnection(transport)
    finally:
        server_module.reactor.callLater = original  # type: ignore[attr-defined]
    transport.clear()
    return proto, transport, clock


def test_no_base_class_command_left_over() -> None:
    """Every <state>_<COMMAND> Twisted defines is ours (its handlers call the
    backend synchronously and parse literals into temp files)."""
    for name in dir(imap4.IMAP4Server):
        state, _, command = name.partition("_")
        if state in ("unauth", "auth", "select", "logout") and command.isupper():
            ours = getattr(IMAPServer, name)
            if ours is None:  # disabled on purpose (UID is a prefix we parse)
                continue
            assert ours is not getattr(imap4.IMAP4Server, name), name
            assert ours[0].__qualname__.startswith("IMAPServer."), name


def test_idle_autologout_says_bye() -> None:
    proto, transport, clock = make()
    clock.advance(61)  # before login: one minute
    assert transport.value() == b"* BYE Autologout; idle for too long\r\n"
    assert transport.disconnecting


def test_login_timeout_is_configurable() -> None:
    proto, transport, clock = make(ImapConfig(login_timeout_seconds=5))
    clock.advance(4)
    assert transport.value() == b""
    clock.advance(2)
    assert transport.value() == b"* BYE Autologout; idle for too long\r\n"


class SlowPortal:
    """A portal whose answer comes when the test says: the password check
    waiting for a worker thread, bcrypt and Argon2id under a burst of logins."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[Any]] = []

    def login(self, creds: Any, mind: Any, *interfaces: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d


def test_a_slow_login_is_not_idleness() -> None:
    """Regression (found by bench/soak.py): 50 clients logging in at once on
    a loaded machine waited over a minute for their password checks, and the
    pre-login timeout hung up on them while their LOGIN was being answered.
    The timeout is paused during the check and restarts in full if it fails."""
    proto, transport, clock = make()
    portal = SlowPortal()
    proto.portal = portal
    clock.advance(30)
    proto.dataReceived(b"a1 LOGIN user@dental.test secret\r\n")
    assert len(portal.pending) == 1
    clock.advance(300)  # five minutes of the server's own work
    assert b"BYE" not in transport.value() and not transport.disconnecting
    portal.pending[0].errback(AuthenticationFailed("no"))
    assert transport.value().startswith(b"a1 NO ")
    transport.clear()
    clock.advance(59)  # a full pre-login timeout again, counted from the answer
    assert transport.value() == b""
    clock.advance(2)
    assert transport.value() == b"* BYE Autologout; idle for too long\r\n"


def test_absolute_session_limit() -> None:
    proto, transport, clock = make(ImapConfig(absolute_session_hours=1))
    for _ in range(70):  # active: a NOOP every 55 seconds
        proto.dataReceived(b"n NOOP\r\n")
        clock.advance(55)
    assert b"* BYE Session time limit reached" in transport.value()


def test_line_too_long_is_refused_and_the_session_goes_on() -> None:
    proto, transport, clock = make(ImapConfig(max_line_length=8192))
    proto.dataReceived(b"a1 NOOP " + b"x" * 9000 + b"\r\n")
    proto.dataReceived(b"a2 NOOP\r\n")
    out = transport.value()
    assert b"a1 BAD [TOOBIG] Command line too long\r\n" in out
    assert out.endswith(b"a2 OK NOOP completed\r\n")


def test_literal_limits_before_continuation() -> None:
    proto, transport, _ = make()
    proto.dataReceived(b"a1 LOGIN {99999999999}\r\n")
    assert transport.value() == b"a1 BAD [TOOBIG] Literal too large for this command.\r\n"
    transport.clear()
    proto.dataReceived(b"a2 LOGIN {4097+}\r\n")
    assert transport.value().startswith(b"a2 BAD [TOOBIG] Non-synchronizing literals are limited to 4096")


def test_capability_switched_off_for_a_client() -> None:
    limits = ImapConfig(disable_for_clients=parse_switches("outlook: IDLE SASL-IR", None))  # type: ignore[arg-type]
    proto, transport, _ = make(limits)
    proto.dataReceived(b'a1 ID ("name" "Microsoft Outlook")\r\n')
    transport.clear()
    proto.dataReceived(b"a2 CAPABILITY\r\n")
    caps = transport.value().split(b"\r\n")[0]
    assert b"IDLE" not in caps and b"SASL-IR" not in caps and b"AUTH=PLAIN" in caps
    transport.clear()
    proto.dataReceived(b"a3 AUTHENTICATE PLAIN AGEAYg==\r\n")
    assert transport.value() == b"a3 BAD Initial responses are not enabled for this client.\r\n"


def test_switch_config_parser() -> None:
    assert parse_switches("Outlook: IDLE, MOVE; iOS Mail: literal+", None) == (  # type: ignore[arg-type]
        ("outlook", frozenset({"IDLE", "MOVE"})), ("ios mail", frozenset({"LITERAL+"})))
    with pytest.raises(ValueError):
        parse_switches("Outlook IDLE", None)  # type: ignore[arg-type]


# -- parsers ------------------------------------------------------------------------


def test_cursor_with_literals() -> None:
    cur = Cursor([b"a1 LOGIN {4}", Literal(b"us r"), b' "p\\"w"'])
    assert cur.tag() == b"a1"
    cur.sp()
    assert cur.atom() == b"LOGIN"
    cur.sp()
    assert cur.astring() == b"us r"
    cur.sp()
    assert cur.astring() == b'p"w'
    cur.end()


def test_seq_sets() -> None:
    s = SeqSet.parse(b"1:3,5,7:*")
    assert s.resolve(9) == [(1, 3), (5, 5), (7, 9)]
    assert compact_set([1, 2, 3, 5, 7, 8]) == "1:3,5,7:8"
    with pytest.raises(BadCommand):
        SeqSet.parse(b"0:2")


def test_fetch_items() -> None:
    items = fetch_items(Cursor([b"(UID BODY.PEEK[1.2.HEADER.FIELDS (From To)]<0.100> BODYSTRUCTURE)"]))
    assert [i.name for i in items] == ["UID", "BODY", "BODYSTRUCTURE"]
    body = items[1]
    assert body.peek and body.partial == (0, 100) and body.section is not None
    assert body.section.part == (1, 2) and body.section.fields == ("FROM", "TO")
    assert body.response_name() == "BODY[1.2.HEADER.FIELDS (FROM TO)]<0>"
    assert [i.name for i in fetch_items(Cursor([b"FULL"]))] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE",
                                                               "ENVELOPE", "BODY"]


def test_search_keys() -> None:
    charset, key = search_keys(Cursor([b'CHARSET UTF-8 OR SEEN NOT FROM "x" (UID 1:* LARGER 10)']))
    assert charset == "UTF-8"
    assert [k.name for k in key.sub] == ["OR", "AND"]


def test_structure_fallback_offsets() -> None:
    raw = (b"Subject: s\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
           b"Subject: inner\r\n\r\ninner body\r\n--b--\r\n")
    st = parse(raw)
    first, second = st.body.parts
    assert raw[first.body_start:first.body_end] == b"hello"
    assert second.envelope is not None and second.envelope.subject == "inner"
    assert second.message is not None and raw[second.message.body_start:second.message.body_end] == b"inner body"
    assert SimpleNamespace(n=st.part((2, 1))).n is second.message
