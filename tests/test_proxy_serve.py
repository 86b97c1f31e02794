"""The PROXY protocol on a real ``postvault serve``: every listener (imaps,
imap, submissions, submission, https) set to take it from 127.0.0.1 only,
and clients that write the header by hand (``tests/proxy_clients.py``),
then TLS or the plain protocol, over loopback.

What must hold: the address in the header (127.0.0.42 and friends, all
loopback addresses that this test never connects from) is the one the
audit log records, the one login throttling counts, the one the
per-address connection limits count and the one in the SMTP Received
header; a v2 LOCAL header keeps the socket's own address; a sender outside
``[proxy] trusted``, a connection without a header, and one that sends no
header in time are closed without a byte sent.
"""

from __future__ import annotations

import imaplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from postvault.store.api import Store
from tests.imapd.conftest import start_server, stop_server
from tests.proxy_clients import (
    AuditView,
    ProxiedIMAP,
    ProxiedSMTP,
    closed_without_reply,
    connect,
    v1,
    v2,
    v2_local,
    web_login,
)
from tests.support import cheap_home_env, free_port

PASSWORD = "correct horse battery staple"
# Per-address limits, low so the test can reach them.
PER_IP = 2
IP_THROTTLE_AFTER = 3


@dataclass
class Node(AuditView):
    home: Path
    ports: dict[str, int]
    proc: subprocess.Popen[str]
    store: Store
    log: Path

    def wait_for(self, event: str, after: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(event, after)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {event} event")

    def wait_log(self, needle: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log.read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the server log")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, store_overrides: Callable[[], dict[str, str]]) -> Iterator[Node]:
    home = tmp_path_factory.mktemp("proxy") / "home"
    with cheap_home_env():
        init_home(home, "mail.example.test", store_overrides())
        store = open_store(load_config(home))
    policy = home / "conf" / "policy.toml"
    shipped = policy.read_text()
    assert "ip_throttle_after = 20" in shipped
    policy.write_text(shipped.replace("ip_throttle_after = 20", f"ip_throttle_after = {IP_THROTTLE_AFTER}"))
    https = free_port()
    proc, ports, log = start_server(home, {
        "POSTVAULT_LISTEN_HTTPS": f"127.0.0.1:{https}",
        "POSTVAULT_PROXY_LISTENERS": "imaps, imap, submissions, submission, https",
        "POSTVAULT_PROXY_TRUSTED": "127.0.0.1/32",
        "POSTVAULT_PROXY_TIMEOUT_SECONDS": "1",
        "POSTVAULT_IMAP_MAX_CONNECTIONS_PER_IP": str(PER_IP),
        "POSTVAULT_SMTP_MAX_CONNECTIONS_PER_IP": str(PER_IP),
    })
    ports["https"] = https
    try:
        for n, email in enumerate(("office@dental.test", "front@clinic.test", "desk@clinic.test")):
            store.create_account(email, "member", f"Office {n}", PASSWORD)
        yield Node(home, ports, proc, store, log)
    finally:
        stop_server(proc)
        store.close()


# --- the claimed address reaches every consumer ---------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_imaps_login_audited_with_claimed_address(node: Node, version: str) -> None:
    header = (v1 if version == "v1" else v2)("127.0.0.42")
    after = node.last_id()
    with ProxiedIMAP(node.ports["imaps"], header, node.context()) as client:
        client.login("office@dental.test", PASSWORD)
    event = node.wait_for("login.ok", after)[-1]
    assert (event["client_ip"], event["protocol"], event["actor"]) == ("127.0.0.42", "imap", "office@dental.test")


def test_imap_starttls_with_ipv6_claim(node: Node) -> None:
    # The header comes before the greeting; the address survives STARTTLS.
    after = node.last_id()
    with ProxiedIMAP(node.ports["imap"], v2("2001:db8::42", dport=143)) as client:
        client.starttls(node.context())
        client.login("office@dental.test", PASSWORD)
    assert node.wait_for("login.ok", after)[-1]["client_ip"] == "2001:db8::42"


def _message(sender: str, to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, "proxy test"
    msg.set_content("hello through the proxy\n")
    return msg


def _received_headers(node: Node, email: str) -> list[str]:
    with ProxiedIMAP(node.ports["imaps"], v2("127.0.0.9"), node.context()) as client:
        client.login(email, PASSWORD)
        client.select("INBOX", readonly=True)
        _, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (RECEIVED)])")
    return [bytes(part[1]).decode() for part in data if isinstance(part, tuple)]


def test_smtp_audit_and_received_header(node: Node) -> None:
    after = node.last_id()
    # submissions with v2 (TLS after the header), submission with v1 (STARTTLS).
    client = ProxiedSMTP(node.ports["submissions"], v2("127.0.0.42", dport=465), node.context())
    try:
        client.login("office@dental.test", PASSWORD)
        client.send_message(_message("office@dental.test", "front@clinic.test"))
        client.quit()
    finally:
        client.close()
    client = ProxiedSMTP(node.ports["submission"], v1("127.0.0.43", dport=587))
    try:
        client.starttls(context=node.context())
        client.login("office@dental.test", PASSWORD)
        client.send_message(_message("office@dental.test", "front@clinic.test"))
        client.quit()
    finally:
        client.close()
    logins = [e for e in node.events("login.ok", after) if e["protocol"] == "smtp"]
    assert [e["client_ip"] for e in logins] == ["127.0.0.42", "127.0.0.43"]
    received = _received_headers(node, "front@clinic.test")
    assert any("([127.0.0.42])" in r for r in received), received
    assert any("([127.0.0.43])" in r for r in received), received
    assert not any("([127.0.0.1])" in r for r in received), received


def test_web_login_audited_with_claimed_address(node: Node) -> None:
    after = node.last_id()
    status = web_login(node.ports["https"], v1("127.0.0.44", dport=443), node.context(), "office@dental.test",
                       PASSWORD)
    assert status == 303
    event = node.wait_for("login.ok", after)[-1]
    assert (event["client_ip"], event["protocol"]) == ("127.0.0.44", "web")


def test_local_command_keeps_socket_address(node: Node) -> None:
    # A health check's LOCAL header: the connection is the proxy's own.
    after = node.last_id()
    with ProxiedIMAP(node.ports["imaps"], v2_local(), node.context()) as client:
        client.login("office@dental.test", PASSWORD)
    assert node.wait_for("login.ok", after)[-1]["client_ip"] == "127.0.0.1"


# --- limits count the claimed address ------------------------------------------------


def test_login_throttling_counts_the_claimed_address(node: Node) -> None:
    """Failed logins from one claimed address throttle that address, not the
    proxy's: another client behind the same proxy logs in at once."""
    after = node.last_id()
    for n in range(IP_THROTTLE_AFTER):
        with ProxiedIMAP(node.ports["imaps"], v2("127.0.0.66"), node.context()) as client, \
                pytest.raises(imaplib.IMAP4.error):
            client.login(f"nobody{n}@dental.test", "wrong password")
    # The next attempt from 127.0.0.66, even with the right password, is
    # refused before the password is checked.
    with ProxiedIMAP(node.ports["imaps"], v2("127.0.0.66"), node.context()) as client, \
            pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        client.login("desk@clinic.test", PASSWORD)
    limited = node.wait_for("login.limited", after)[-1]
    assert limited["client_ip"] == "127.0.0.66" and "scope=address" in (limited["detail"] or "")
    # Same proxy, another client: not throttled.
    with ProxiedIMAP(node.ports["imaps"], v1("127.0.0.67"), node.context()) as client:
        client.login("desk@clinic.test", PASSWORD)
    since = datetime.now(UTC) - timedelta(hours=1)
    assert node.store.recent_auth_failures("x@y.test", "127.0.0.66", since)[1]
    assert not node.store.recent_auth_failures("x@y.test", "127.0.0.1", since)[1]


def test_imap_connection_limit_counts_the_claimed_address(node: Node) -> None:
    held = [connect(node.ports["imap"], v1("127.0.0.50", dport=143)) for _ in range(PER_IP)]
    try:
        for sock in held:
            assert sock.recv(200).startswith(b"* OK")
        over = connect(node.ports["imap"], v1("127.0.0.50", dport=143))
        try:
            assert over.recv(200).startswith(b"* BYE Too many connections")
        finally:
            over.close()
        other = connect(node.ports["imap"], v1("127.0.0.51", dport=143))
        try:
            assert other.recv(200).startswith(b"* OK")
        finally:
            other.close()
    finally:
        for sock in held:
            sock.close()


def test_smtp_connection_limit_counts_the_claimed_address(node: Node) -> None:
    held = [connect(node.ports["submission"], v2("127.0.0.52", dport=587)) for _ in range(PER_IP)]
    try:
        for sock in held:
            assert sock.recv(200).startswith(b"220 ")
        over = connect(node.ports["submission"], v2("127.0.0.52", dport=587))
        try:
            assert over.recv(200).startswith(b"421 4.7.0")
        finally:
            over.close()
        other = connect(node.ports["submission"], v2("127.0.0.53", dport=587))
        try:
            assert other.recv(200).startswith(b"220 ")
        finally:
            other.close()
    finally:
        for sock in held:
            sock.close()


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["imaps", "imap", "submissions", "submission", "https"])
def test_untrusted_sender_refused(node: Node, kind: str) -> None:
    # 127.0.0.2 is loopback too, but not in [proxy] trusted; its header
    # (claiming a trusted-looking address) must not be believed.
    sock = connect(node.ports[kind], v2("127.0.0.1"), source="127.0.0.2")
    assert closed_without_reply(sock)
    node.wait_log(f"proxy: {kind}: closed a connection from 127.0.0.2: sender not in [proxy] trusted")


def test_no_header_refused(node: Node) -> None:
    # What a client that reached the listener directly sends first.
    for kind, first in (("imap", b"a001 CAPABILITY\r\n"), ("submission", b"EHLO client.test\r\n"),
                        ("imaps", None), ("https", None)):
        if first is None:
            # A TLS ClientHello, from Python's own TLS.
            raw = socket.create_connection(("127.0.0.1", node.ports[kind]), 30)
            ctx = node.context()
            with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
                ctx.wrap_socket(raw, server_hostname="localhost")
            raw.close()
        else:
            assert closed_without_reply(connect(node.ports[kind], first))
        node.wait_log(f"proxy: {kind}: closed a connection from 127.0.0.1: no PROXY protocol header")


def test_malformed_and_oversized_headers_refused(node: Node) -> None:
    for header, reason in ((b"PROXY TCP4 127.0.0.042 127.0.0.1 1 2\r\n", "malformed v1 address"),
                           (b"PROXY UNKNOWN " + b"x" * 200, "v1 header too long"),
                           (v2("127.0.0.42")[:14] + b"\xff\xff", "v2 header too long")):
        assert closed_without_reply(connect(node.ports["imaps"], header))
        node.wait_log(f"proxy: imaps: closed a connection from 127.0.0.1: {reason}")


def test_silent_or_partial_header_times_out(node: Node) -> None:
    # [proxy] timeout_seconds is 1 here.
    silent = connect(node.ports["submissions"], b"")
    partial = connect(node.ports["imap"], v1("127.0.0.42")[:20])
    assert closed_without_reply(silent) and closed_without_reply(partial)
    node.wait_log("proxy: submissions: closed a connection from 127.0.0.1: no complete header in time")
    node.wait_log("proxy: imap: closed a connection from 127.0.0.1: no complete header in time")


def test_no_content_in_the_log(node: Node) -> None:
    """Refusals name the fault, never the bytes sent."""
    sock = connect(node.ports["imap"], b"PROXY TCP4 secret-canary 127.0.0.1 1 2\r\n")
    assert closed_without_reply(sock)
    node.wait_log("proxy: imap: closed a connection from 127.0.0.1: malformed v1 address")
    assert "secret-canary" not in node.log.read_text()
