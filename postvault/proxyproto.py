"""The PROXY protocol (HAProxy's, versions 1 and 2) on configured listeners.

Why: behind a TCP load balancer every connection comes from the balancer's
address, so the audit log, login throttling, the per-address connection
limits and the SMTP Received header would all see the balancer instead of
the client. HAProxy's ``send-proxy`` / ``send-proxy-v2`` puts one header
with the client's address in front of the connection's first byte. The
specification is haproxy.org/download/2.8/doc/proxy-protocol.txt ("the
spec" below; sections cited as §).

Two parts:

- :func:`parse_header`, pure: bytes in, a :class:`ProxyHeader` (or "need
  more", or :class:`~postvault.errors.ProxyHeaderRefused`) out.
- :func:`start_listener`, the glue every service uses in place of
  ``loop.create_server``. On a listener named in ``[proxy] listeners`` it
  accepts connections itself, refuses those from senders outside ``[proxy]
  trusted`` (§5: only trusted proxies may use the protocol; never guess
  whether a header is there), reads the header straight from the socket
  with ``MSG_PEEK`` (the method of §9) so that not one byte past it is
  taken, and only then hands the socket to asyncio with
  ``loop.connect_accepted_socket`` -- with TLS for the implicit-TLS
  listeners, so the header is read before TLS, and before the greeting on
  the STARTTLS listeners (§2: "the receiver MUST NOT start processing the
  connection before it receives a complete and valid PROXY protocol
  header"). The service's own protocol then sees a transport whose
  ``peername`` (and ``sockname``) are the ones the header gave, so every
  consumer of the client address (IMAP ``getPeer``, SMTP ``peer_ip``, the
  web's ``getClientAddress``) needs no change.

Invariants:
- A connection whose header is missing, malformed, longer than
  ``MAX_HEADER``, or not complete within ``[proxy] timeout_seconds``, is
  closed without a byte sent, and one line is logged: the listener, the
  sender's address and the fault, never the bytes received.
- A v2 LOCAL header (health checks, §2.2), a v1 ``UNKNOWN``, an
  ``AF_UNSPEC`` or ``AF_UNIX`` v2 header keep the socket's own addresses.
- Listeners not named in ``[proxy] listeners`` are plain
  ``loop.create_server`` servers, exactly as before.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .conf.schema import Endpoint, ProxyConfig
from .errors import ProxyHeaderRefused

log = logging.getLogger("postvault.proxy")

# §2.2: the twelve bytes that open a v2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
# §2.1: "PROXY" opens a v1 header; the longest valid line with its CR LF is
# 107 bytes ("If the CRLF sequence is not found in the first 107
# characters, the receiver should declare the line invalid").
V1_PREFIX = b"PROXY"
V1_MAX = 107
# The largest v2 header taken (fixed part, addresses and TLVs). The
# protocol allows 16 + 65535; §2 designs both formats to fit in 536 bytes,
# HAProxy's TLVs (ALPN, authority, unique id up to 128 bytes, SSL details)
# stay well within this, and anything longer is refused as too long.
MAX_HEADER = 1024
# Largest address block of each v2 family (§2.2): INET, INET6, UNIX.
_V2_ADDRESS_LENGTH = {0x1: 12, 0x2: 36, 0x3: 216}
# §2.1: decimal, no leading zero (octal confusion), at most 65535.
_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")
_IPV4 = re.compile(rb"(?:(?:0|[1-9][0-9]{0,2})\.){3}(?:0|[1-9][0-9]{0,2})\Z")
# Hex groups and colons only: no zone ("%eth0") and no dotted IPv4 tail.
_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}\Z")

Address = tuple[str, int]


@dataclass(frozen=True)
class ProxyHeader:
    """One complete header. ``source``/``destination`` are None when the
    connection's own addresses stand (LOCAL, UNKNOWN, AF_UNSPEC, AF_UNIX)."""

    version: int
    length: int  # bytes of the header on the wire; what follows is the client's
    source: Address | None
    destination: Address | None
    local: bool = False  # v2 LOCAL command: the proxy's own connection (a health check)


def parse_header(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of ``data``.

    Returns None while ``data`` is a proper prefix of a header that may
    still turn out valid (so every byte of it belongs to the header); raises
    ``ProxyHeaderRefused`` as soon as it cannot be one.
    """
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyHeaderRefused("no PROXY protocol header")


def _parse_v2(data: bytes) -> ProxyHeader | None:
    sig = data[:len(V2_SIGNATURE)]
    if sig != V2_SIGNATURE[:len(sig)]:
        raise ProxyHeaderRefused("bad v2 signature")
    if len(data) > 12:
        # §2.2: the high nibble is the version and "must always be sent as
        # \x2 and the receiver must only accept this value"; the low nibble
        # is the command, LOCAL (0) or PROXY (1), others "must" be dropped.
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            raise ProxyHeaderRefused("unsupported PROXY protocol version")
        if command not in (0, 1):
            raise ProxyHeaderRefused("unknown v2 command")
    if len(data) > 13:
        # §2.2: family 0-3 and transport 0-2; other values "must be rejected
        # as invalid by receivers".
        family, transport = data[13] >> 4, data[13] & 0x0F
        if family > 3 or transport > 2:
            raise ProxyHeaderRefused("unknown v2 address family or transport")
    if len(data) < V2_FIXED:
        return None
    length = V2_FIXED + int.from_bytes(data[14:16], "big")
    if length > MAX_HEADER:
        raise ProxyHeaderRefused("v2 header too long")
    if len(data) < length:
        return None
    if data[12] & 0x0F == 0:
        # LOCAL: "the receiver must accept this connection as valid and must
        # use the real connection endpoints and discard the protocol block
        # including the family which is ignored" (§2.2). Its length is
        # still honoured ("must not assume zero is presented").
        return ProxyHeader(2, length, None, None, local=True)
    family, transport = data[13] >> 4, data[13] & 0x0F
    block = data[V2_FIXED:length]
    if family in (0x1, 0x2) and transport == 0x1:
        need = _V2_ADDRESS_LENGTH[family]
        if len(block) < need:
            raise ProxyHeaderRefused("v2 address block too short")
        size = 4 if family == 0x1 else 16
        src = ipaddress.ip_address(block[:size])
        dst = ipaddress.ip_address(block[size:2 * size])
        sport = int.from_bytes(block[2 * size:2 * size + 2], "big")
        dport = int.from_bytes(block[2 * size + 2:2 * size + 4], "big")
        return ProxyHeader(2, length, (str(src), sport), (str(dst), dport))
    if family == 0x3 and len(block) < _V2_ADDRESS_LENGTH[0x3]:
        raise ProxyHeaderRefused("v2 address block too short")
    # AF_UNSPEC, AF_UNIX, or a datagram transport on this stream listener:
    # §2.2 lets a receiver fall back to UNSPEC, i.e. the socket's own
    # addresses; TLVs after the addresses are skipped (§2.2, "may choose to
    # skip over and ignore those bytes").
    return ProxyHeader(2, length, None, None)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:len(V1_PREFIX)]
    if head != V1_PREFIX[:len(head)]:
        raise ProxyHeaderRefused("bad v1 signature")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        window = data[:V1_MAX]
        # §2.1: "must not tolerate a single CR or LF character to end the
        # line"; a CR may only be the last byte so far (its LF may follow).
        if b"\n" in window or b"\r" in window[:-1]:
            raise ProxyHeaderRefused("v1 header without CR LF")
        if len(data) >= V1_MAX:
            raise ProxyHeaderRefused("v1 header too long")
        return None
    line = data[:end]
    length = end + 2
    parts = line.split(b" ")
    # §2.1: "PROXY", exactly one space, then the family.
    if len(parts) < 2 or parts[0] != V1_PREFIX:
        raise ProxyHeaderRefused("malformed v1 header")
    if parts[1] == b"UNKNOWN":
        # §2.1: "the receiver must ignore anything presented before the
        # CRLF" and use the real connection's parameters.
        return ProxyHeader(1, length, None, None)
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderRefused("malformed v1 header")
    src = _v1_address(parts[2], parts[1])
    dst = _v1_address(parts[3], parts[1])
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    return ProxyHeader(1, length, (src, sport), (dst, dport))


def _v1_address(text: bytes, family: bytes) -> str:
    # §2.1: canonical forms only; IPv4 without leading zeros, IPv6 as hex
    # groups; the address must match the announced family.
    try:
        if family == b"TCP4" and _IPV4.match(text):
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        if family == b"TCP6" and _IPV6.match(text):
            return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        pass
    raise ProxyHeaderRefused("malformed v1 address")


def _v1_port(text: bytes) -> int:
    if not _PORT.match(text) or int(text) > 65535:
        raise ProxyHeaderRefused("malformed v1 port")
    return int(text)


# --- trust --------------------------------------------------------------------


def trusted(config: ProxyConfig, host: str) -> bool:
    """Whether ``host`` (the socket's peer) may send PROXY headers."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 sender
    return any(ip in net for net in config.trusted)


# --- reading the header from a socket -------------------------------------------


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


async def read_header(sock: socket.socket) -> ProxyHeader:
    """Read one PROXY header from the non-blocking ``sock``, taking exactly
    its bytes out of the socket: what the client sent after it stays in the
    kernel for TLS or the protocol. Peeks, parses, then takes only bytes
    that are header (all of what was peeked while the header is not
    complete, so the socket is never seen readable on the same bytes twice)."""
    loop = asyncio.get_running_loop()
    buf = b""
    while True:
        await _readable(loop, sock)
        try:
            chunk = sock.recv(MAX_HEADER - len(buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not chunk:
            raise ProxyHeaderRefused("connection closed before the header ended")
        header = parse_header(buf + chunk)
        take = len(chunk) if header is None else header.length - len(buf)
        buf += _take(sock, take)
        if header is not None:
            return header
        if len(buf) >= MAX_HEADER:
            # Unreachable for a parser that refuses long headers; kept so a
            # parser change can never turn this into an endless read.
            raise ProxyHeaderRefused("header too long")


def _take(sock: socket.socket, n: int) -> bytes:
    # The bytes were just peeked, so they are in the receive queue and a
    # TCP recv returns them at once.
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ProxyHeaderRefused("connection closed before the header ended")
        out += got
    return out


# --- handing over ---------------------------------------------------------------------


class ProxiedTransport(asyncio.Transport):
    """An asyncio transport that reports the PROXY header's addresses as
    ``peername``/``sockname``; everything else is the real transport's.

    It stays in the chain after a STARTTLS (aiosmtpd's and asyncio's TLS
    layers write through it and ask it for the peer), so the claimed
    address holds for the whole connection.
    """

    def __init__(self, inner: asyncio.Transport, peername: Address, sockname: Address | None) -> None:
        super().__init__()
        self._inner = inner
        self._claimed: dict[str, Any] = {"peername": peername}
        if sockname is not None:
            self._claimed["sockname"] = sockname

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._claimed:
            return self._claimed[name]
        return self._inner.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        # Private attributes asyncio looks for (``_start_tls_compatible``).
        return getattr(self._inner, name)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def write(self, data: Any) -> None:
        self._inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def abort(self) -> None:
        self._inner.abort()


class _Handover(asyncio.Protocol):
    """First protocol of a connection whose header was read: passes the
    transport on to the service's protocol, under the claimed addresses."""

    def __init__(self, inner: Any, header: ProxyHeader) -> None:
        self.inner = inner
        self.header = header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) and self.header.source is not None
        transport.set_protocol(self.inner)
        self.inner.connection_made(ProxiedTransport(transport, self.header.source, self.header.destination))


# --- listeners ----------------------------------------------------------------------------


class Listener(Protocol):
    """What services keep of a listener: ``asyncio.Server``'s shape."""

    @property
    def sockets(self) -> Any: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


# Accept queue length, as asyncio's create_server.
BACKLOG = 100


class ProxyListener:
    """A listener whose connections start with a PROXY header (module docstring)."""

    def __init__(self, kind: str, sockets: list[socket.socket], factory: Callable[[], Any],
                 config: ProxyConfig, tls: ssl.SSLContext | None, handshake_timeout: float | None) -> None:
        self.kind = kind
        self._sockets = sockets
        self._factory = factory
        self._config = config
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self._accepting: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def start(self) -> None:
        for sock in self._sockets:
            self._accepting.append(asyncio.create_task(self._accept(sock), name=f"postvault-proxy-{self.kind}"))

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                # Out of file descriptors and the like: what asyncio's own
                # server does too is wait a moment rather than spin.
                log.warning("proxy: %s: accept failed (%s)", self.kind, type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            task = asyncio.create_task(self._connection(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _connection(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            sender = conn.getpeername()[0]
        except OSError:
            conn.close()
            return
        handed = False
        try:
            if not trusted(self._config, sender):
                raise ProxyHeaderRefused("sender not in [proxy] trusted")
            try:
                header = await asyncio.wait_for(read_header(conn), self._config.timeout_seconds)
            except TimeoutError:
                raise ProxyHeaderRefused("no complete header in time") from None
            log.debug("proxy: %s: v%d %s header from %s for %s", self.kind, header.version,
                      "LOCAL" if header.local else "PROXY", sender,
                      header.source[0] if header.source else "itself")
            factory: Callable[[], Any] = self._factory
            if header.source is not None:
                factory = functools.partial(self._handover, header)
            handed = True
            # From here asyncio owns the socket (it closes it on failure).
            await asyncio.get_running_loop().connect_accepted_socket(
                factory, conn, ssl=self._tls, ssl_handshake_timeout=self._handshake_timeout if self._tls else None)
        except ProxyHeaderRefused as exc:
            log.warning("proxy: %s: closed a connection from %s: %s", self.kind, sender, exc)
        except OSError as exc:
            # A reset while reading the header, or a failed TLS handshake
            # (ssl.SSLError is an OSError): the type only, as for every TLS failure.
            log.info("proxy: %s: connection from %s failed: %s", self.kind, sender, type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not go unlogged
            # Anything else is our bug, not the client's; this connection
            # ends, the listener goes on. The type only: no client bytes.
            log.error("proxy: %s: connection from %s: unexpected %s", self.kind, sender, type(exc).__name__)
        finally:
            if not handed:
                conn.close()

    def _handover(self, header: ProxyHeader) -> _Handover:
        return _Handover(self._factory(), header)

    def close(self) -> None:
        for task in self._accepting:
            task.cancel()
        for sock in self._sockets:
            sock.close()
        # Connections still waiting for their header (or TLS handshake) go;
        # those already handed over belong to their service's drain.
        for task in list(self._pending):
            task.cancel()

    async def wait_closed(self) -> None:
        tasks = [*self._accepting, *self._pending]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _bind(endpoint: Endpoint) -> list[socket.socket]:
    """Listening sockets for ``endpoint``, as ``loop.create_server`` binds them
    (every address the host name has, IPv6 sockets IPv6 only)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(endpoint.host, endpoint.port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: "
                                         f"{exc.strerror}") from None
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


class ServerGroup:
    """Several ``asyncio.Server``s as one listener (an inherited listener
    with one socket per address of its host name)."""

    def __init__(self, servers: list[asyncio.Server]) -> None:
        self._servers = servers

    @property
    def sockets(self) -> list[Any]:
        return [sock for server in self._servers for sock in server.sockets]

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()


async def start_listener(kind: str, endpoint: Endpoint, factory: Callable[[], Any], proxy: ProxyConfig, *,
                         tls: ssl.SSLContext | None = None, handshake_timeout: float | None = None,
                         sockets: list[socket.socket] | None = None) -> Listener:
    """Listen on ``endpoint`` for the listener named ``kind`` ("imaps",
    "submission", ...): a PROXY-protocol listener if ``[proxy] listeners``
    names it, else ``loop.create_server``. ``tls``: implicit TLS by asyncio
    (after the header, if any). ``sockets``: listening sockets bound
    already (a submission worker process inherits its parent's, see
    ``smtpd/workers.py``); accept on those instead of binding."""
    if kind not in proxy.listeners:
        loop = asyncio.get_running_loop()
        if sockets is not None:
            return ServerGroup([await loop.create_server(factory, sock=sock, ssl=tls,
                                                         ssl_handshake_timeout=handshake_timeout if tls else None)
                                for sock in sockets])
        return await loop.create_server(factory, endpoint.host, endpoint.port, ssl=tls,
                                        ssl_handshake_timeout=handshake_timeout if tls else None,
                                        reuse_address=True)
    listener = ProxyListener(kind, sockets if sockets is not None else await _bind(endpoint), factory, proxy, tls,
                             handshake_timeout)
    listener.start()
    log.info("%s %s takes the PROXY protocol from %s", kind, endpoint,
             ", ".join(str(n) for n in proxy.trusted))
    return listener
