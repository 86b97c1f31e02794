"""A local SMTP sink for the outbound tests: aiosmtpd on 127.0.0.1 with the
development CA's certificate, STARTTLS (or none, or implicit TLS), optional
AUTH, and scripted replies to DATA."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session, SMTP

from postvault.certs.context import server_context
from postvault.certs.devca import make_dev_certs
from tests.support import free_port


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def write_certs(folder: Path) -> Certs:
    certs = make_dev_certs("localhost")
    folder.mkdir(parents=True, exist_ok=True)
    paths = Certs(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(certs.ca_pem)
    paths.cert.write_bytes(certs.server_pem)
    paths.key.write_bytes(certs.server_key_pem)
    paths.key.chmod(0o600)
    return paths


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: str | None


@dataclass
class SinkHandler:
    # Replies to give to DATA, in order; when used up, "250 OK".
    script: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    attempts: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        if self.script:
            reply = self.script.pop(0)
            if not reply.startswith("2"):
                return reply
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or envelope.content),
                     server.transport.get_extra_info("ssl_object") is not None, login)
        )
        return "250 2.0.0 OK"




class _Authenticator:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (self.user, self.password)
        return AuthResult(success=ok, auth_data=data if ok else None)


class _ImplicitController(Controller):
    """TLS from the first byte (RFC 8314), as on port 465."""

    def __init__(self, handler: Any, context: ssl.SSLContext, **kw: Any) -> None:
        super().__init__(handler, ssl_context=context, **kw)


@contextmanager
def sink(
    certs: Certs | None,
    *,
    starttls: bool = True,
    implicit: bool = False,
    script: list[str] | None = None,
    login: tuple[str, str] | None = None,
) -> Iterator[tuple[SinkHandler, int]]:
    """(handler, port) of a running sink; stopped on exit."""
    handler = SinkHandler(list(script or []))
    port = free_port()
    kw: dict[str, Any] = {}
    context = server_context(certs.cert, certs.key) if certs is not None else None
    if login is not None:
        # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; with
        # implicit TLS the whole connection is encrypted anyway.
        kw.update(authenticator=_Authenticator(*login), auth_required=True, auth_require_tls=not implicit)
    if implicit:
        assert context is not None
        controller: Controller = _ImplicitController(handler, context, hostname="127.0.0.1", port=port, **kw)
    elif starttls:
        controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context,
                                require_starttls=True, **kw)
    else:
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kw)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()
