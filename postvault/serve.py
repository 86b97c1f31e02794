"""``postvault serve``: every service in one process on one asyncio loop
(with ``[smtp] processes = N > 1``, plus N - 1 processes that serve only
SMTP submission on the same listening sockets: ``smtpd/workers.py``).

Start-up: config, policy, TLS and the store (schema upgraded) are loaded
first, so a mistake stops the server before it listens. Then each service
starts its listeners and a line "postvault ready: ..." goes to standard
output (tests and init scripts wait for it).

Signals: SIGHUP reloads policy and certificates (``Runtime.reload``; the
submission workers reload too); SIGTERM and SIGINT stop accepting
connections, let open sessions finish for up to ``DRAIN_SECONDS`` (the
workers' too) and then close them. A message is acknowledged only
after it is stored, so closing a session mid-transaction loses nothing that
was acknowledged.

Debugging memory: SIGUSR1 logs one line with the process's VmRSS, the
memory SQLite's own allocator holds (page caches, schemas, statements:
outside Python's heap), glibc malloc's totals (in use, free but kept in
its arenas, mmapped), Python's allocated blocks and, if tracing, Python's
traced heap. Started with
Python's own ``PYTHONTRACEMALLOC=N`` (N frames per allocation), the server
also writes a ``tracemalloc`` snapshot to ``HOME/tracemalloc-<unix
time>.snap``, for comparing offline (``bench/tracemalloc_diff.py``).
Snapshots hold code locations and sizes only, never data.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import sys
import threading
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


def build_services(runtime: Runtime, drain_seconds: float = DRAIN_SECONDS) -> list[Service]:
    from .audit_service import AuditService
    from .imapd.service import IMAPService
    from .node_service import NodeLink
    from .outbound.service import outbound_service
    from .smtpd.service import SubmissionService
    from .smtpd.workers import SubmissionWorkers
    from .sweep_service import LeftoverSweep
    from .web.service import WebService

    submission = SubmissionService(runtime)
    # The sweep first: crash leftovers kept in the database go before any
    # listener opens (see sweep_service). The submission workers
    # ([smtp] processes > 1) right after the listeners they inherit.
    return [LeftoverSweep(runtime), submission, SubmissionWorkers(runtime, submission, drain_seconds), IMAPService(runtime),
            outbound_service(runtime), WebService(runtime), AuditService(runtime), NodeLink(runtime)]


def _sqlite_heap() -> tuple[int, int] | None:
    """SQLite's allocator: bytes held now and at most, process-wide (the
    library Python's sqlite3 module is linked with)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    except OSError:
        return None  # linked statically: not reachable this way
    lib.sqlite3_memory_used.restype = lib.sqlite3_memory_highwater.restype = ctypes.c_int64
    return int(lib.sqlite3_memory_used()), int(lib.sqlite3_memory_highwater(0))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_text() -> str:
    """glibc's view of the C heap: bytes in use, free but kept in its
    arenas (fragmentation), and in mmapped blocks."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return "malloc unknown"  # not glibc 2.33+
    return (f"malloc in use {info.uordblks // 1024} KiB, free in arenas {info.fordblks // 1024} KiB, "
            f"mmapped {info.hblkhd // 1024} KiB")


def _vm_rss_kib() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def memory_report(home: Path) -> Path | None:
    """SIGUSR1: one log line on where the memory is; with tracemalloc on,
    a snapshot in the home folder too (its path is returned)."""
    sqlite = _sqlite_heap()
    sqlite_text = "unknown" if sqlite is None else f"{sqlite[0] // 1024} KiB (peak {sqlite[1] // 1024} KiB)"
    traced = f"{tracemalloc.get_traced_memory()[0] // 1024} KiB" if tracemalloc.is_tracing() else "not traced"
    log.info("memory: VmRSS %d KiB, SQLite heap %s, Python heap %s, %s, %d Python objects' blocks, %d threads",
             _vm_rss_kib(), sqlite_text, traced, _malloc_text(), sys.getallocatedblocks(), threading.active_count())
    if not tracemalloc.is_tracing():
        return None
    path = home / f"tracemalloc-{time.time():.0f}.snap"
    tracemalloc.take_snapshot().dump(str(path))
    return path


def _reload(runtime: Runtime, services: list[Service]) -> None:
    """SIGHUP: reload here, then in the services' own processes (the
    submission workers)."""
    runtime.reload()
    for service in services:
        forward = getattr(service, "reloaded", None)
        if forward is not None:
            forward()


async def _run(runtime: Runtime, drain_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    services = build_services(runtime, drain_seconds)
    listening: list[str] = []
    for service in services:
        listening += await service.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, runtime, services)
    loop.add_signal_handler(signal.SIGUSR1, memory_report, runtime.home)
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


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard one; the new soft limit.

    Every connection is a file descriptor, and the usual soft limit (1,024)
    would refuse connections long before memory or CPU run out (a node is
    meant to hold 1,000 idle IMAP connections and more: docs/scaling.md). The
    hard limit is the administrator's word (systemd's LimitNOFILE), so it is
    kept; Go's runtime and nginx's worker_rlimit_nofile do the same.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # kept as it was; logged below
    return soft


def serve(home: Path, drain_seconds: float = DRAIN_SECONDS) -> int:
    runtime = Runtime.open(home)
    # With submission workers, every line says which process wrote it
    # (theirs: "[smtp N pid P]", see smtpd/workers.py).
    configure_logging(runtime.config.log,
                      tag=f"[main pid {os.getpid()}]" if runtime.config.smtp.processes > 1 else None)
    log.info("open file limit %d (each connection takes one)", raise_open_file_limit())
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
