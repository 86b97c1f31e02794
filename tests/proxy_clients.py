"""Clients that speak as a PROXY-protocol sender would: a header (v1 or v2,
written by hand here, HAProxy specification sections 2.1 and 2.2) first,
then TLS or the plain protocol, as Python's own imaplib, smtplib and
http.client. Shared by tests/test_proxy_serve.py and tests/test_haproxy.py."""

from __future__ import annotations

import http.client
import imaplib
import ipaddress
import re
import smtplib
import socket
import ssl
import struct
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import text

from postvault.certs.context import client_context
from postvault.store.api import Store

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _dest(client: str, dest: str) -> str:
    # Both addresses of a header are of one family (section 2.1, 2.2).
    return "::1" if ":" in client and ":" not in dest else dest


def v1(client: str, port: int = 50000, dest: str = "127.0.0.1", dport: int = 993) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    dest = _dest(client, dest)
    return f"PROXY {family} {client} {dest} {port} {dport}\r\n".encode()


def v2(client: str, port: int = 50000, dest: str = "127.0.0.1", dport: int = 993) -> bytes:
    src, dst = ipaddress.ip_address(client), ipaddress.ip_address(_dest(client, dest))
    fam = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", port, dport)
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(block)) + block


def v2_local() -> bytes:
    """A LOCAL command (what HAProxy's health checks send with send-proxy-v2)."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def connect(port: int, header: bytes, *, source: str = "127.0.0.1", timeout: float = 30) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``source`` that has sent ``header``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout, source_address=(source, 0))
    if header:
        sock.sendall(header)
    return sock


class ProxiedIMAP(imaplib.IMAP4):
    """imaplib behind a PROXY header (none if empty), from ``source``;
    ``context``: implicit TLS after the header."""

    def __init__(self, port: int, header: bytes, context: ssl.SSLContext | None = None, *,
                 source: str = "127.0.0.1") -> None:
        self._header, self._context, self._source = header, context, source
        super().__init__("localhost", port, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = connect(self.port, self._header, source=self._source, timeout=timeout or 30)
        if self._context is not None:
            return self._context.wrap_socket(sock, server_hostname="localhost")
        return sock


class ProxiedSMTP(smtplib.SMTP):
    """smtplib behind a PROXY header (none if empty), from ``source``;
    ``context``: implicit TLS after the header."""

    def __init__(self, port: int, header: bytes, context: ssl.SSLContext | None = None, *,
                 source: str = "127.0.0.1") -> None:
        self._header, self._context, self._source = header, context, source
        super().__init__("localhost", port, timeout=30)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = connect(port, self._header, source=self._source, timeout=timeout)
        if self._context is not None:
            return self._context.wrap_socket(sock, server_hostname="localhost")
        return sock


class _ProxiedHTTPS(http.client.HTTPSConnection):
    def __init__(self, port: int, header: bytes, context: ssl.SSLContext, source: str) -> None:
        super().__init__("localhost", port, timeout=30, context=context)
        self._header = header
        self._ctx = context
        self._source = source

    def connect(self) -> None:
        sock = connect(self.port, self._header, source=self._source, timeout=30)
        self.sock = self._ctx.wrap_socket(sock, server_hostname="localhost")


def web_login(port: int, header: bytes, context: ssl.SSLContext, email: str, password: str, *,
              source: str = "127.0.0.1") -> int:
    """Log in on the web pages (GET the form, POST it back), each request
    over a new connection behind ``header``; returns the POST's status."""
    conn = _ProxiedHTTPS(port, header, context, source)
    try:
        conn.request("GET", "/login")
        resp = conn.getresponse()
        page = resp.read().decode()
        cookies = [c.split(";")[0] for c in resp.headers.get_all("Set-Cookie") or []]
    finally:
        conn.close()
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token, "no CSRF token on the login page"
    body = urllib.parse.urlencode({"email": email, "password": password, "csrf": token[1]})
    conn = _ProxiedHTTPS(port, header, context, source)
    try:
        conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded",
                                              "Cookie": "; ".join(cookies)})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def closed_without_reply(sock: socket.socket, timeout: float = 15) -> bool:
    """Whether the server closes ``sock`` without sending a byte."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


class AuditView:
    """What both server set-ups (one node; two behind HAProxy) read back:
    the home's CA for clients, and the audit events the nodes wrote."""

    home: Path
    store: Store

    def context(self) -> ssl.SSLContext:
        return client_context(self.home / "certs" / "ca.pem")

    def events(self, event: str, after: int = 0) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM audit_events WHERE id > :after AND event = :event ORDER BY id"),
                                {"after": after, "event": event}).mappings()
            return [dict(r) for r in rows]

    def last_id(self) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM audit_events")).scalar_one())

