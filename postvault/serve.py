"""``postvault serve``: every service in one process on one asyncio loop.

Start-up: config, policy, TLS and the store (schema upgraded) are loaded
first, so a mistake stops the server before it listens. Then each service
starts its listeners and a line "postvault ready: ..." goes to standard
output (tests and init scripts wait for it).

Signals: SIGHUP reloads policy and certificates (``Runtime.reload``);
SIGTERM and SIGINT stop accepting connections, let open sessions finish for
up to ``DRAIN_SECONDS`` and then close them. A message is acknowledged only
after it is stored, so closing a session mid-transaction loses nothing that
was acknowledged.

Debugging memory: started with Python's own ``PYTHONTRACEMALLOC=N`` (N
frames per allocation), the server writes a ``tracemalloc`` snapshot to
``HOME/tracemalloc-<unix time>.snap`` on each SIGUSR1, for comparing
offline (``bench/tracemalloc_diff.py``). Snapshots hold code locations and
sizes only, never data.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Protocol

from .logs import configure_logging
from .runtime import Runtime

log = logging.getLogger("postvault.serve")
DRAIN_SECONDS = 30.0


class Service(Protocol):
    name: str

    async def start(self) -> list[str]:
        """Start listening; returns "kind host:port" for each listener."""
        ...

    async def stop(self, drain_seconds: float) -> None:
        """Stop listening, wait for open sessions, then close what is left."""
        ...


def build_services(runtime: Runtime) -> list[Service]:
    from .audit_service import AuditService
    from .imapd.service import IMAPService
    from .node_service import NodeLink
    from .outbound.service import outbound_service
    from .smtpd.service import SubmissionService
    from .sweep_service import LeftoverSweep
    from .web.service import WebService

    # The sweep first: crash leftovers kept in the database go before any
    # listener opens (see sweep_service).
    return [LeftoverSweep(runtime), SubmissionService(runtime), IMAPService(runtime), outbound_service(runtime), WebService(runtime),
            AuditService(runtime), NodeLink(runtime)]


def dump_tracemalloc(home: Path) -> Path:
    """Write a tracemalloc snapshot into the home folder (SIGUSR1, when tracing)."""
    path = home / f"tracemalloc-{time.time():.0f}.snap"
    tracemalloc.take_snapshot().dump(str(path))
    log.info("tracemalloc snapshot written (%d KiB traced)", tracemalloc.get_traced_memory()[0] // 1024)
    return path


async def _run(runtime: Runtime, drain_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    services = build_services(runtime)
    listening: list[str] = []
    for service in services:
        listening += await service.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.reload)
    if tracemalloc.is_tracing():
        loop.add_signal_handler(signal.SIGUSR1, dump_tracemalloc, runtime.home)
    print(f"postvault ready: {', '.join(listening) or 'no listeners configured'}", flush=True)
    log.info("ready: %s", ", ".join(listening))
    await stop.wait()
    log.info("stopping: draining open sessions for up to %.0f s", drain_seconds)
    # The audit service stops last: its final checkpoint signs what the others wrote while draining.
    last = [s for s in services if getattr(s, "stops_last", False)]
    await asyncio.gather(*(s.stop(drain_seconds) for s in services if s not in last))
    for service in last:
        await service.stop(drain_seconds)
    log.info("stopped")


def serve(home: Path, drain_seconds: float = DRAIN_SECONDS) -> int:
    runtime = Runtime.open(home)
    configure_logging(runtime.config.log)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Twisted (IMAP, HTTPS) runs on this same asyncio loop: the reactor must
    # be installed before anything imports twisted.internet.reactor.
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    from twisted.internet import defer, reactor
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)
    failures: list[BaseException] = []

    def main() -> None:
        d = defer.Deferred.fromFuture(asyncio.ensure_future(_run(runtime, drain_seconds)))
        d.addErrback(lambda f: failures.append(f.value))
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(main)  # type: ignore[attr-defined]
    try:
        # Our signal handlers live on the asyncio loop (see _run).
        reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
    finally:
        runtime.close()
    sys.stdout.flush()
    if failures:
        raise failures[0]
    return 0
