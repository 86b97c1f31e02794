"""The service: draining on stop, and certificates that follow a reload on
both listeners."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import time
from pathlib import Path

import pytest

from postvault.certs.context import TLSContextHolder, client_context
from postvault.certs.devca import make_dev_certs

from .client import Raw, message, stuff
from .conftest import COLLEAGUE, HOST, MEMBER, Server, World


def test_stop_closes_idle_sessions_and_lets_a_transaction_finish(fresh_server: Server, world: World) -> None:
    srv = fresh_server
    before = world.count(COLLEAGUE)
    idle = srv.raw(user=MEMBER)
    busy = srv.raw(user=MEMBER)
    for command in (f"MAIL FROM:<{MEMBER}>", f"RCPT TO:<{COLLEAGUE}>"):
        assert busy.cmd(command)[0] == 250
    stopping = asyncio.run_coroutine_threadsafe(srv.service.stop(20.0), srv.loop)
    # The idle session is told at once (RFC 5321 section 3.8)...
    assert idle.reply()[1] == ["421 4.3.2 The server is restarting; please try again in a minute."]
    assert idle.closed()
    # ...no new session is accepted...
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port465), timeout=2).close()
    # ...and the one inside a transaction finishes it first.
    assert not stopping.done()
    assert busy.cmd("DATA")[0] == 354
    busy.send(stuff(message(MEMBER, COLLEAGUE, "last one")))
    assert busy.reply()[0] == 250
    assert busy.reply()[0] == 421
    assert busy.closed()
    stopping.result(10)
    assert world.count(COLLEAGUE) == before + 1


def test_stop_cuts_what_is_still_open_after_the_drain_time(fresh_server: Server) -> None:
    srv = fresh_server
    slow = srv.raw(user=MEMBER)
    assert slow.cmd(f"MAIL FROM:<{MEMBER}>")[0] == 250
    started = time.monotonic()
    srv.call(srv.service.stop(0.5))
    assert time.monotonic() - started < 5
    assert slow.closed()
    assert not srv.service.registry.sessions


def _fingerprint(sock: socket.socket) -> str:
    der = sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    assert der
    return hashlib.sha256(der).hexdigest()


def test_a_reloaded_certificate_is_used_by_new_sessions_on_both_ports(fresh_server: Server, world: World,
                                                                       tmp_path: Path) -> None:
    srv = fresh_server
    # The fresh server's own certificate files, so the shared home is untouched.
    for name in ("server.pem", "server.key"):
        shutil.copy(world.home / "certs" / name, tmp_path / name)
    srv.runtime.tls = TLSContextHolder(tmp_path / "server.pem", tmp_path / "server.key")
    srv.call(srv.service.stop(0.5))
    srv.call(srv.service.start())

    def both(ctx: object) -> tuple[str, str]:
        a = Raw(srv.port465, ctx, implicit=True)  # type: ignore[arg-type]
        b = Raw(srv.port587, ctx, implicit=False)  # type: ignore[arg-type]
        b.ehlo()
        b.starttls()
        prints = _fingerprint(a.sock), _fingerprint(b.sock)
        a.close()
        b.close()
        return prints

    old = both(srv.ctx)
    assert old[0] == old[1]
    fresh = make_dev_certs(HOST)
    (tmp_path / "server.pem").write_bytes(fresh.server_pem)
    (tmp_path / "server.key").write_bytes(fresh.server_key_pem)
    (tmp_path / "ca.pem").write_bytes(fresh.ca_pem)
    srv.runtime.tls.reload()
    new = both(client_context(tmp_path / "ca.pem"))
    assert new[0] == new[1] != old[0]
