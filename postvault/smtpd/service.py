"""The submission service of ``postvault serve``: its listeners and sessions.

Two listeners, each optional (an empty ``[listen]`` value disables it):

- ``submissions`` (port 465): implicit TLS (RFC 8314 section 3.3), the TLS
  handshake done by asyncio (``create_server(ssl=...)``) before SMTP starts;
- ``submission`` (port 587): STARTTLS (RFC 3207), required before AUTH and
  MAIL (RFC 8314 section 3.3 still recommends 465 to clients).

A listener named in ``[proxy] listeners`` takes a PROXY protocol header
from the load balancer first, before the TLS handshake on 465 and before
the greeting on 587 (``proxyproto.py``); the session's ``peer_ip`` (per
address limit, audit, Received header) is then the client's address.

Both run on the loop of ``postvault serve`` (no aiosmtpd ``Controller``,
which would start a loop of its own in a thread). Certificates follow
SIGHUP: the context handed to ``create_server`` at start switches each new
handshake to the holder's current one (``certs/context.py``), and each
new STARTTLS session reads the holder again.

With ``[smtp] processes = N > 1`` this service runs in the main process
and in each of the N - 1 submission workers (``workers.py``), which get
the main process's listening sockets (``inherited``) instead of binding.

:class:`SessionRegistry` tracks open sessions (of this process: the
per-address limit counts per process), for the per-address limit
and for :meth:`SubmissionService.stop`, which stops accepting, closes idle
sessions, lets transactions in flight finish for up to ``drain_seconds``,
then cuts what is left. A message is acknowledged only once stored, so a cut
session loses nothing that was acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from typing import TYPE_CHECKING

from ..conf.schema import Endpoint
from ..proxyproto import Listener, start_listener
from .handler import SubmissionHandler
from .protocol import SubmissionProtocol

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("postvault.smtpd")

# Implicit TLS: a client has this long to finish the handshake.
HANDSHAKE_SECONDS = 30.0


class SessionRegistry:
    """Open sessions, counted per client address."""

    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self.sessions: set[SubmissionProtocol] = set()
        self._by_ip: Counter[str] = Counter()
        self._empty = asyncio.Event()
        self._empty.set()

    def admit(self, session: SubmissionProtocol) -> bool:
        if self._by_ip[session.peer_ip] >= self.per_ip:
            return False
        self._by_ip[session.peer_ip] += 1
        self.sessions.add(session)
        self._empty.clear()
        return True

    def release(self, session: SubmissionProtocol) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self._by_ip[session.peer_ip] -= 1
        if self._by_ip[session.peer_ip] <= 0:
            del self._by_ip[session.peer_ip]
        if not self.sessions:
            self._empty.set()

    async def wait_empty(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._empty.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True


class SubmissionService:
    """SMTP submission on the listeners of ``[listen]`` (the ``Service`` of serve.py)."""

    name = "smtp"

    def __init__(self, runtime: Runtime, inherited: dict[str, list[socket.socket]] | None = None) -> None:
        self.runtime = runtime
        # A worker process (workers.py): the listening sockets its parent
        # bound, by listener name; None: bind them here.
        self.inherited = inherited
        self.handler = SubmissionHandler(runtime)
        self.registry = SessionRegistry(runtime.config.smtp.max_connections_per_ip)
        self.servers: list[Listener] = []
        # "submissions"/"submission" -> the address actually bound (port 0
        # in tests becomes a real port).
        self.bound: dict[str, tuple[str, int]] = {}

    def _protocol(self, implicit_tls: bool) -> SubmissionProtocol:
        config = self.runtime.config
        # Read per connection: a reloaded policy's size limit and a reloaded
        # certificate apply to the next session.
        return SubmissionProtocol(
            self.handler,
            registry=self.registry,
            limits=config.smtp,
            implicit_tls=implicit_tls,
            tls_context=self.runtime.tls.context,
            hostname=config.hostname,
            data_size_limit=self.runtime.policy.policy.attachments.max_message_size,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> list[str]:
        listen = self.runtime.config.listen
        out: list[str] = []
        for kind, endpoint, implicit in (("submissions", listen.submissions, True),
                                         ("submission", listen.submission, False)):
            if endpoint is None or (self.inherited is not None and kind not in self.inherited):
                continue
            # On a PROXY-protocol listener the header is read before TLS
            # and before the greeting (proxyproto.py).
            server = await start_listener(
                kind, endpoint, lambda implicit=implicit: self._protocol(implicit), self.runtime.config.proxy,
                tls=self.runtime.tls.context if implicit else None,
                handshake_timeout=HANDSHAKE_SECONDS if implicit else None,
                sockets=None if self.inherited is None else self.inherited[kind],
            )
            self.servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            self.bound[kind] = (host, port)
            shown = Endpoint(host, port)
            out.append(f"{kind} {shown}")
            log.info("listening: %s %s", kind, shown)
        return out

    def listening_sockets(self) -> dict[str, list[int]]:
        """The file descriptors of each listener's listening sockets (for
        the worker processes to inherit)."""
        return {kind: [sock.fileno() for sock in server.sockets]
                for kind, server in zip(self.bound, self.servers)}

    async def stop(self, drain_seconds: float) -> None:
        for server in self.servers:
            server.close()
        sessions = list(self.registry.sessions)
        for session in sessions:
            session.begin_drain()
        if sessions and not await self.registry.wait_empty(drain_seconds):
            left = list(self.registry.sessions)
            log.warning("closing %d session(s) still open after %.0f s", len(left), drain_seconds)
            for session in left:
                session.abort()
            await self.registry.wait_empty(5.0)
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
