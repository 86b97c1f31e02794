"""The [smtp] limits, on the ``tight`` server: refused commands and
commands per session, the idle timeout (also inside DATA), connections per
client address."""

from __future__ import annotations

import time

from .client import Raw, message
from .conftest import COLLEAGUE, MEMBER, Server, World


def test_too_many_errors_closes_the_session(tight: Server) -> None:
    c = tight.raw(user=MEMBER)  # TIGHT_LIMITS: max_errors=4
    for _ in range(3):
        assert c.cmd("MAIL FROM:<someone@else.test>")[0] == 553
    assert c.cmd("NOOP")[0] == 250  # successes don't count
    code, lines = c.cmd("RCPT TO:<x@y.test>")
    assert code == 503
    code, lines = c.reply()
    assert lines == ["421 4.7.0 Too many refused commands in this session; closing the connection."]
    assert c.closed()


def test_too_many_commands_closes_the_session(tight: Server) -> None:
    c = tight.raw(user=MEMBER)  # max_commands=40; EHLO and AUTH were two
    for _ in range(38):
        assert c.cmd("NOOP")[0] == 250
    code, lines = c.cmd("NOOP")
    assert code == 421 and lines[0].startswith("421 4.7.0 Too many commands")
    assert c.closed()


def test_idle_session_is_closed(tight: Server) -> None:
    c = tight.raw(user=MEMBER)  # idle_timeout_seconds=2
    assert c.cmd("NOOP")[0] == 250
    started = time.monotonic()
    code, lines = c.reply(timeout=10)
    assert lines == ["421 4.4.2 No command for too long; closing the connection."]
    assert 1.5 < time.monotonic() - started < 6
    assert c.closed()


def test_idle_inside_data_is_closed_and_nothing_is_kept(tight: Server, world: World) -> None:
    before = world.count(COLLEAGUE)
    c = tight.raw(user=MEMBER)
    for command in (f"MAIL FROM:<{MEMBER}>", f"RCPT TO:<{COLLEAGUE}>", "DATA"):
        assert c.cmd(command)[0] in (250, 354)
    data = message(MEMBER, COLLEAGUE, "half")
    # Pieces of a message keep the session alive...
    for i in range(3):
        c.send(data[i * 40:(i + 1) * 40])
        time.sleep(1.0)
    # ...until the client stops sending.
    code, lines = c.reply(timeout=10)
    assert code == 421 and lines[0].startswith("421 4.4.2")
    assert c.closed()
    assert world.count(COLLEAGUE) == before


def _connect(server: Server) -> Raw:
    return Raw(server.port465, server.ctx, implicit=True)


def test_connections_per_address(tight: Server) -> None:
    # Earlier tests' connections may still be closing on the server side.
    deadline = time.monotonic() + 10
    while tight.service.registry.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    open_ = [_connect(tight) for _ in range(3)]  # max_connections_per_ip=3
    assert all(c.greeting[0] == 220 for c in open_)
    extra = _connect(tight)
    assert extra.greeting == (421, ["421 4.7.0 Too many connections from your address at once; close some or try "
                                    "again in a few minutes."])
    assert extra.closed()
    # The twin: once one closes, the next is welcome.
    assert open_[0].cmd("QUIT")[0] == 221
    open_[0].close()
    deadline = time.monotonic() + 10
    while True:
        c = _connect(tight)
        if c.greeting[0] == 220 or time.monotonic() > deadline:
            break
        c.close()
        time.sleep(0.05)
    assert c.greeting[0] == 220
    for other in (c, *open_[1:]):
        other.close()
