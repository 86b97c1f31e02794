"""Twisted protocols over asyncio streams, with TLS.

Why: Twisted's own TLS needs pyOpenSSL and a context built its way, while
every other listener of ``postvault serve`` takes its ``ssl.SSLContext``
from one ``TLSContextHolder`` (same BCP 195 settings, SIGHUP reload through
the SNI hook). The reactor is Twisted's asyncioreactor, so asyncio's server
runs on the very loop that drives the reactor; this module adapts an
asyncio transport to Twisted's ``ITransport``/``ITLSTransport`` so
``IMAP4Server`` runs unchanged on it.

TLS: the IMAP listeners take plain TCP from asyncio and run TLS here,
through ``tls.TLSLayer`` (``ssl.SSLObject`` over memory BIOs), both for
implicit TLS (``Bridge(tls=...)``) and STARTTLS; see tls.py for why not
asyncio's TLS (a 256 KiB buffer per connection). The web listener still
hands in transports that asyncio already secured (``secure=True``).

Invariants:
- Everything here runs on the loop (= reactor) thread.
- ``startTLS`` upgrades in place: data the client sent in plaintext after
  the STARTTLS command never reaches the protocol (the protocol discards
  its line buffer before calling ``startTLS``; later bytes go through TLS).
- With our TLS, the protocol is made only once the handshake is done, and
  nothing it writes reaches the socket unencrypted.
- Write flow control: asyncio's ``pause_writing``/``resume_writing`` are
  forwarded to a registered producer and to ``drained()`` waiters, so a
  50 MB FETCH is read from the store only as fast as the client takes it.
- ``cork``/``uncork``: while corked, writes are gathered and go out as one
  write (one TLS record, one send) at ``uncork``; ``drained`` and
  ``loseConnection`` send what was gathered first, so nothing waits on
  bytes that were never written. The IMAP server corks a command's
  response from its first untagged line to its tagged one.
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

from .tls import TLSLayer

log = logging.getLogger("postvault.imapd")

# Bytes queued in the kernel-side buffer before we stop producing.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# RFC-free but customary: a client that has not finished the TLS handshake
# in this long is gone (asyncio's ssl_handshake_timeout default is 60).
HANDSHAKE_TIMEOUT = 30.0


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
        self._tls: TLSLayer | None = None
        self._early: list[bytes] = []  # written before the handshake ended
        self._read_paused = False
        self._socket_held = False  # pause_reading applied (see pauseProducing)
        self._on_secure: Callable[[], None] | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._corked: list[bytes] | None = None
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    # -- ITransport -----------------------------------------------------------

    @property
    def disconnecting(self) -> bool:
        return self._closed or self._t.is_closing()

    def write(self, data: bytes) -> None:
        if self.disconnecting or not data:
            return
        if self._corked is not None:
            self._corked.append(bytes(data))
            return
        tls = self._tls
        if tls is None:
            self._t.write(data)
        elif not tls.handshaken:
            self._early.append(bytes(data))
        else:
            try:
                records = tls.send(data)
            except ssl.SSLError as exc:
                # OpenSSL refuses to write after a fatal error: the
                # connection is unusable, and the caller sees it closed.
                log.info("TLS write failed: %s", type(exc).__name__)
                self.abortConnection()
                return
            self._t.write(records)

    def writeSequence(self, data: list[bytes]) -> None:
        if self.disconnecting:
            return
        if self._corked is not None:
            self._corked.extend(bytes(d) for d in data if d)
            return
        if self._tls is None:
            self._t.writelines(data)
        else:
            self.write(b"".join(data))

    def cork(self) -> None:
        """Gather what is written from now on until ``uncork``."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        """Write what was gathered since ``cork``, as one write."""
        held, self._corked = self._corked, None
        if held:
            self.write(held[0] if len(held) == 1 else b"".join(held))

    def _flush_corked(self) -> None:
        held = self._corked
        if held:
            self._corked = None
            self.write(b"".join(held))
            self._corked = []

    def loseConnection(self) -> None:
        """Close after what was written has been sent."""
        if self.disconnecting:
            return
        if self._corked is not None:
            self.uncork()
        if self._tls is not None and self._tls.handshaken:
            self._t.write(self._tls.close())
        self._closed = True
        self._cancel_handshake_timer()
        self._t.close()

    def abortConnection(self) -> None:
        self._closed = True
        self._cancel_handshake_timer()
        self._t.abort()

    def getPeer(self) -> IPv4Address | IPv6Address:
        return _address(self._t.get_extra_info("peername"))

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address(self._t.get_extra_info("sockname"))

    # -- reading (IPushProducer: the protocol pauses us) ----------------------

    def pauseProducing(self) -> None:
        # Lazily: the socket is taken out of the selector only when bytes
        # arrive while the protocol is paused (``_hold_reading``). The IMAP
        # server pauses for every command that waits on the store, and a
        # client that sends one command at a time sends nothing meanwhile:
        # an eager pause cost two epoll_ctl calls and their asyncio
        # bookkeeping per command (about 8 % of a FETCH's CPU). What
        # arrives before the socket is held is at most one read (asyncio's
        # 256 KiB), kept in the protocol's line buffer. During a TLS
        # handshake the socket stays readable (the client's handshake
        # messages come through it); ``_secured`` applies the pause then.
        self._read_paused = True

    def resumeProducing(self) -> None:
        self._read_paused = False
        if self._socket_held and not self.disconnecting and not self.upgrading:
            self._socket_held = False
            self._t.resume_reading()

    def _hold_reading(self) -> None:
        """Bytes came while the protocol is paused: stop reading the socket
        until it resumes (flow control towards a pipelining client)."""
        if self._read_paused and not self._socket_held and not self.disconnecting and not self.upgrading:
            self._socket_held = True
            self._t.pause_reading()

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
        self._flush_corked()
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

    # -- TLS ---------------------------------------------------------------------

    def startTLS(self, ctx: ssl.SSLContext, normal: bool = True) -> None:
        """STARTTLS (server side): from now on every byte is TLS."""
        self.start_tls_layer(ctx)

    def start_tls_layer(self, ctx: ssl.SSLContext, on_secure: Callable[[], None] | None = None) -> None:
        """Run TLS over this connection; ``on_secure`` once the handshake is done."""
        self._tls = TLSLayer(ctx)
        self._on_secure = on_secure
        self.upgrading = True
        self._socket_held = False
        self._t.resume_reading()
        loop = asyncio.get_event_loop()
        self._handshake_timer = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self._tls is not None and not self._tls.handshaken:
            log.info("TLS handshake timed out")
            self.abortConnection()

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def received(self, data: bytes) -> bytes:
        """What the client sent, as the protocol must see it (decrypted)."""
        tls = self._tls
        if tls is None:
            return data
        if self._closed:
            return b""
        was = tls.handshaken
        try:
            plain, out = tls.receive(data)
        except ssl.SSLError as exc:
            # The type only: the reason text can quote the client's bytes.
            log.info("TLS %s failed: %s", "connection" if was else "handshake", type(exc).__name__)
            alert = tls.pending()
            if alert:
                self._t.write(alert)
            self._closed = True
            self._cancel_handshake_timer()
            self._t.close()
            return b""
        if out:
            self._t.write(out)
        if tls.handshaken and not was:
            self._secured()
        if tls.peer_closed:
            self.loseConnection()
        return plain

    def _secured(self) -> None:
        assert self._tls is not None
        self._cancel_handshake_timer()
        self.upgrading = False
        self.secure = True
        early, self._early = self._early, []
        for data in early:
            self.write(data)
        if self._read_paused:
            self._hold_reading()
        on_secure, self._on_secure = self._on_secure, None
        if on_secure is not None:
            on_secure()


class Bridge(asyncio.Protocol):
    """asyncio protocol that feeds one Twisted protocol.

    ``tls``: run TLS here (implicit TLS) with the context it returns, made
    per connection so a reloaded certificate applies to new connections;
    the Twisted protocol starts once the handshake is done. Without it the
    transport is plain (``secure`` says whether asyncio already secured it).
    """

    def __init__(self, make: Callable[[], Protocol], secure: bool,
                 on_close: Callable[[Bridge], None] | None = None,
                 tls: Callable[[], ssl.SSLContext] | None = None) -> None:
        self._make = make
        self._secure = secure
        self._on_close = on_close
        self._tls = tls
        self.transport: StreamTransport | None = None
        self.protocol: Protocol | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return
        assert isinstance(transport, asyncio.Transport)
        self.transport = StreamTransport(self, transport, self._secure and self._tls is None)
        self.peer = self.transport.getPeer().host
        if self._tls is not None:
            self.transport.start_tls_layer(self._tls(), on_secure=self._start_protocol)
        else:
            self._start_protocol()

    def _start_protocol(self) -> None:
        assert self.transport is not None
        self.protocol = self._make()
        self.protocol.makeConnection(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.transport._read_paused:
            self.transport._hold_reading()
        plain = self.transport.received(data)
        if plain and self.protocol is not None:
            self.protocol.dataReceived(plain)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport._pause_writing()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport._resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.transport._closed = True
            self.transport._cancel_handshake_timer()
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
