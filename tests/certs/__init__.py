"""Tests of ``postvault.certs``, and the loopback TLS server they share.

The server is a plain ``socket`` listener on 127.0.0.1 with an ephemeral port,
wrapping each accepted connection with the context under test in a thread.
Every socket operation has a timeout, so a broken handshake fails a test
instead of hanging it.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from cryptography import x509

TIMEOUT = 5.0
GREETING = b"hello\n"


@dataclass(frozen=True)
class ServerOutcome:
    """What the server side saw for one connection."""

    version: str | None = None
    cipher: str | None = None
    compression: str | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class ClientResult:
    """What the client side saw after a successful handshake."""

    version: str
    cipher: str
    compression: str | None
    peer_cert: x509.Certificate
    session: ssl.SSLSession | None


class LoopbackTLSServer:
    """A TLS server thread on 127.0.0.1 for handshake tests.

    ``context`` is either a fixed ``SSLContext`` or a callable returning the
    one to use for each new connection (as listeners use a holder). Each
    connection is handshaked, greeted with ``GREETING`` and closed; the
    server's view of it is put on ``outcomes``.
    """

    def __init__(self, context: ssl.SSLContext | Callable[[], ssl.SSLContext]) -> None:
        self._get_context = context if callable(context) else (lambda: context)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.outcomes: queue.Queue[ServerOutcome] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name="loopback-tls", daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self._listener.close()
        assert not self._thread.is_alive(), "TLS server thread did not stop"

    def next_outcome(self) -> ServerOutcome:
        """The server's view of the next finished connection."""
        return self.outcomes.get(timeout=TIMEOUT)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            with self._get_context().wrap_socket(conn, server_side=True) as tls:
                cipher = tls.cipher()
                outcome = ServerOutcome(
                    version=tls.version(),
                    cipher=cipher[0] if cipher else None,
                    compression=tls.compression(),
                )
                tls.sendall(GREETING)
        except (ssl.SSLError, OSError) as exc:
            outcome = ServerOutcome(error=exc)
            conn.close()
        self.outcomes.put(outcome)


def handshake(
    context: ssl.SSLContext, port: int, server_hostname: str | None = "localhost"
) -> ClientResult:
    """Connect to 127.0.0.1:``port`` with ``context`` and read the greeting.

    Reading application data makes the client process any post-handshake
    messages (TLS 1.3 NewSessionTicket) before we inspect the session.
    Raises ``ssl.SSLError`` (or ``ssl.SSLCertVerificationError``) when the
    handshake fails.
    """
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        data = b""
        while not data.endswith(b"\n"):
            chunk = tls.recv(64)
            if not chunk:
                break
            data += chunk
        assert data == GREETING
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        cipher = tls.cipher()
        version = tls.version()
        assert cipher is not None and version is not None
        return ClientResult(
            version=version,
            cipher=cipher[0],
            compression=tls.compression(),
            peer_cert=x509.load_der_x509_certificate(der),
            session=tls.session,
        )
