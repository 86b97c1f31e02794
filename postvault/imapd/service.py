"""The IMAP service of ``postvault serve``: listeners, thread pool, sessions.

Two listeners from ``[listen]``: ``imaps`` (implicit TLS, RFC 8314) and
``imap`` (STARTTLS required before any login). Both use the runtime's
``TLSContextHolder`` through asyncio (``transport.py``), so SIGHUP's new
certificate applies to the next handshake on either port. On a listener
named in ``[proxy] listeners`` a PROXY protocol header comes first
(``proxyproto.py``), and ``getPeer`` is the client it names.

Invariants:
- Store calls, password checks and decryption run on the service's own
  worker threads (``workers.Workers``, at most ``[imap] threads``), started
  in ``start`` and stopped in ``stop`` after the last session is gone; the
  reactor never blocks.
- At most ``[imap] max_connections_per_ip`` connections per client address;
  the next one gets ``* BYE`` and is closed before it can log in.
- ``stop`` stops listening, tells idle sessions BYE at once, lets running
  commands finish for up to ``drain_seconds``, then closes what is left.
- The search index fill after login (``indexfill.py``) runs on its own
  thread; ``stop`` ends it first and waits at most ``FILL_STOP_SECONDS``
  for its running round.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from twisted.internet import defer

from ..proxyproto import Listener, start_listener
from ..runtime import Runtime
from .cred import make_portal
from .indexfill import IndexFiller
from .mailbox import RecentClaims
from .server import SWITCHABLE, IMAPServer
from .transport import Bridge
from .workers import Workers

log = logging.getLogger("postvault.imapd")
T = TypeVar("T")

# How long ``stop`` waits for the index fill's running round (one round is
# well under a second; a daemon thread does not hold up the exit anyway).
FILL_STOP_SECONDS = 2.0


class IMAPService:
    """What ``serve.build_services`` starts and stops."""

    name = "imap"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limits = runtime.config.imap
        self.store = runtime.store
        self.bus = getattr(runtime.store, "bus", None)
        self.recent = RecentClaims()
        self.portal = make_portal(self)
        self.pool = Workers(self.limits.threads, "postvault-imap")
        self.indexer = IndexFiller(self.store, self.limits.index_on_login, self.limits.index_round_messages)
        self.sessions: set[IMAPServer] = set()
        self._per_ip: Counter[str] = Counter()
        self._servers: list[Listener] = []
        self._gone: asyncio.Event | None = None

    # -- what sessions use ------------------------------------------------------

    @property
    def policy(self) -> Any:
        return self.runtime.policy.policy

    def tls_context(self) -> Any:
        return self.runtime.tls.context

    def run(self, f: Callable[..., T], *args: Any, **kw: Any) -> defer.Deferred[T]:
        return self.pool.run(f, *args, **kw)

    def call_from_thread(self, f: Callable[..., Any], *args: Any) -> None:
        """``f(*args)`` on the reactor thread, in order with the worker
        threads' results (the change bus's notifications)."""
        self.pool.call_from_thread(f, *args)

    def settle(self, future: Future[T]) -> defer.Deferred[T]:
        """A Deferred firing on the reactor thread with ``future``'s outcome
        (the store's group-commit writer resolves it)."""
        return self.pool.settle(future)

    def disabled_for(self, client: str, account: str) -> set[str]:
        """Capabilities switched off for this client ID name and account."""
        out: set[str] = set()
        client, account = client.lower(), account.lower()
        for who, caps in self.limits.disable_for_clients:
            if client and who in client:
                out |= caps
        for who, caps in self.limits.disable_for_accounts:
            if account and who == account:
                out |= caps
        return out & SWITCHABLE

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> list[str]:
        self.pool.start()
        self._gone = asyncio.Event()
        listening = []
        listen = self.runtime.config.listen
        for kind, endpoint, implicit in (("imaps", listen.imaps, True), ("imap", listen.imap, False)):
            if endpoint is None:
                continue
            # Plain TCP from asyncio; TLS is ours (transport.py, tls.py), so
            # on a PROXY-protocol listener the header comes before it.
            server = await start_listener(kind, endpoint, lambda implicit=implicit: self._bridge(implicit),
                                          self.runtime.config.proxy)
            self._servers.append(server)
            listening.append(f"{kind} {endpoint}")
        return listening

    def _bridge(self, implicit: bool) -> Bridge:
        return Bridge(lambda: self._protocol(implicit), secure=implicit, on_close=self._closed,
                      tls=(lambda: self.runtime.tls.context) if implicit else None)

    def _protocol(self, implicit: bool) -> Any:
        proto = IMAPServer(self, implicit)
        return _Guard(self, proto)

    def admit(self, proto: IMAPServer) -> bool:
        ip = proto.client_ip
        if self._per_ip[ip] >= self.limits.max_connections_per_ip:
            return False
        self._per_ip[ip] += 1
        self.sessions.add(proto)
        return True

    def _closed(self, bridge: Bridge) -> None:
        pass

    def release(self, proto: IMAPServer) -> None:
        if proto in self.sessions:
            self.sessions.discard(proto)
            self._per_ip[proto.client_ip] -= 1
            if self._per_ip[proto.client_ip] <= 0:
                del self._per_ip[proto.client_ip]
        if not self.sessions and self._gone is not None:
            self._gone.set()

    async def stop(self, drain_seconds: float) -> None:
        for server in self._servers:
            server.close()
        await asyncio.get_running_loop().run_in_executor(None, self.indexer.stop, FILL_STOP_SECONDS)
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions and self._gone is not None:
            self._gone.clear()
            try:
                await asyncio.wait_for(self._gone.wait(), drain_seconds)
            except asyncio.TimeoutError:
                log.warning("closing %d IMAP sessions that did not finish in time", len(self.sessions))
                for session in list(self.sessions):
                    if session.transport is not None:
                        session.transport.abortConnection()
        for server in self._servers:
            await server.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, self.pool.stop)


class _Guard:
    """Wraps a session for the per-address limit (a Twisted protocol proxy:
    the first call after the TCP accept decides admission)."""

    def __init__(self, service: IMAPService, proto: IMAPServer) -> None:
        self.service = service
        self.proto = proto
        self.admitted = False

    def makeConnection(self, transport: Any) -> None:
        self.proto.client_ip = transport.getPeer().host
        if not self.service.admit(self.proto):
            transport.write(b"* BYE Too many connections from your address; close some and try again\r\n")
            transport.loseConnection()
            return
        self.admitted = True
        self.proto.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.admitted:
            self.proto.dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        if self.admitted:
            try:
                self.proto.connectionLost(reason)
            finally:
                self.service.release(self.proto)
