"""Twisted protocols over asyncio's TLS streams.

Why: Twisted's own TLS needs pyOpenSSL and a context built its way, while
every other listener of ``postvault serve`` takes its ``ssl.SSLContext``
from one ``TLSContextHolder`` (same BCP 195 settings, SIGHUP reload through
the SNI hook). The reactor is Twisted's asyncioreactor, so asyncio's server
and ``loop.start_tls`` (STARTTLS) run on the very loop that drives the
reactor; this module adapts an asyncio transport to Twisted's
``ITransport``/``ITLSTransport`` so ``IMAP4Server`` runs unchanged on it.

Invariants:
- Everything here runs on the loop (= reactor) thread.
- ``startTLS`` upgrades in place: data the client sent in plaintext after
  the STARTTLS command never reaches the protocol (the protocol discards
  its line buffer before calling ``startTLS``; later bytes go through TLS).
- Write flow control: asyncio's ``pause_writing``/``resume_writing`` are
  forwarded to a registered producer and to ``drained()`` waiters, so a
  50 MB FETCH is read from the store only as fast as the client takes it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, interfaces
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

log = logging.getLogger("postvault.imapd")

# Bytes queued in the kernel-side buffer before we stop producing.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


def _address(info: Any) -> IPv4Address | IPv6Address:
    if isinstance(info, tuple) and len(info) >= 2:
        host, port = info[0], info[1]
        if ":" in host:
            return IPv6Address("TCP", host, port)
        return IPv4Address("TCP", host, port)
    return IPv4Address("TCP", "0.0.0.0", 0)


@implementer(interfaces.ITransport, interfaces.ITLSTransport, interfaces.IConsumer, interfaces.IPushProducer)
class StreamTransport:
    """A Twisted transport over one asyncio transport (plain or TLS)."""

    def __init__(self, bridge: Bridge, transport: asyncio.Transport, secure: bool) -> None:
        self._bridge = bridge
        self._t = transport
        self.secure = secure
        self._producer: Any = None
        self._write_paused = False
        self._waiters: list[defer.Deferred[None]] = []
        self._closed = False
        self.upgrading = False
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    # -- ITransport -----------------------------------------------------------

    @property
    def disconnecting(self) -> bool:
        return self._closed or self._t.is_closing()

    def write(self, data: bytes) -> None:
        if not self.disconnecting and data:
            self._t.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        if not self.disconnecting:
            self._t.writelines(data)

    def loseConnection(self) -> None:
        """Close after what was written has been sent."""
        self._closed = True
        self._t.close()

    def abortConnection(self) -> None:
        self._closed = True
        self._t.abort()

    def getPeer(self) -> IPv4Address | IPv6Address:
        return _address(self._t.get_extra_info("peername"))

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address(self._t.get_extra_info("sockname"))

    # -- reading (IPushProducer: the protocol pauses us) ----------------------

    def pauseProducing(self) -> None:
        if not self.disconnecting:
            self._t.pause_reading()

    def resumeProducing(self) -> None:
        if not self.disconnecting and not self.upgrading:
            self._t.resume_reading()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- writing (IConsumer) --------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        if self._write_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def drained(self) -> defer.Deferred[None]:
        """Fires when the client has taken enough of what we wrote."""
        if not self._write_paused or self.disconnecting:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    def _pause_writing(self) -> None:
        self._write_paused = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def _resume_writing(self) -> None:
        self._write_paused = False
        if self._producer is not None:
            self._producer.resumeProducing()
        self._release()

    def _release(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    # -- ITLSTransport --------------------------------------------------------

    def startTLS(self, ctx: ssl.SSLContext, normal: bool = True) -> None:
        """Upgrade to TLS (server side); reading stays paused until done."""
        self.upgrading = True
        loop = asyncio.get_event_loop()

        async def upgrade() -> None:
            try:
                new = await loop.start_tls(self._t, self._bridge, ctx, server_side=True,
                                           ssl_handshake_timeout=30)
            except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
                log.info("STARTTLS handshake failed: %s", type(exc).__name__)
                self.upgrading = False
                self.abortConnection()
                return
            self.upgrading = False
            if new is None:
                self.abortConnection()
                return
            self._t = new  # type: ignore[assignment]
            self.secure = True
            new.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

        asyncio.ensure_future(upgrade())


class Bridge(asyncio.Protocol):
    """asyncio protocol that feeds one Twisted protocol."""

    def __init__(self, make: Callable[[], Protocol], secure: bool,
                 on_close: Callable[[Bridge], None] | None = None) -> None:
        self._make = make
        self._secure = secure
        self._on_close = on_close
        self.transport: StreamTransport | None = None
        self.protocol: Protocol | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return  # start_tls hands us the new TLS transport: not a new connection
        assert isinstance(transport, asyncio.Transport)
        self.transport = StreamTransport(self, transport, self._secure)
        self.peer = self.transport.getPeer().host
        self.protocol = self._make()
        self.protocol.makeConnection(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.protocol is not None:
            self.protocol.dataReceived(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport._pause_writing()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport._resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and self.transport.upgrading:
            # The plaintext transport is handed over to TLS: start_tls
            # reports the old one lost only if the upgrade failed.
            if exc is None:
                return
        if self.transport is not None:
            self.transport._closed = True
            self.transport._release()
        if self.protocol is not None:
            reason = Failure(ConnectionDone()) if exc is None else Failure(ConnectionLost(str(type(exc).__name__)))
            protocol, self.protocol = self.protocol, None
            try:
                protocol.connectionLost(reason)
            finally:
                if self._on_close is not None:
                    self._on_close(self)
        elif self._on_close is not None:
            self._on_close(self)
