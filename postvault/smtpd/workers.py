"""SMTP submission in several processes (``[smtp] processes = N``).

One CPython process runs Python on one core at a time, and in ``postvault
serve`` SMTP, IMAP, HTTPS and the outbound worker share that process's
loop (docs/benchmarks.md, "The wall"). With ``processes = N > 1`` the main
process starts N - 1 *submission workers*: real child processes
(``python -m postvault.smtpd.workers``) that open the same home folder
and store and serve only the submission listeners, as Postfix runs several
``smtpd`` processes.

Listening sockets: the main process binds each submission listener as
before and the workers *inherit* those sockets (``pass_fds``); every
process accepts from the same accept queue. Chosen over SO_REUSEPORT
(a socket per process, the kernel hashing connections between them)
because:

- a connection waiting in the queue is never lost: with SO_REUSEPORT the
  connections queued on a worker that dies are reset, and the kernel
  re-hashes whenever a socket joins or leaves the group;
- it is the same for the PROXY protocol listeners (``proxyproto.py``, which
  bind their own sockets) and for port 0 in tests;
- no other process of the same user can join the port (with SO_REUSEPORT
  any can bind it and receive a share of the connections);
- a busy process returns to its loop later and so accepts fewer
  connections: the load balances itself, where a hash cannot.

The cost is that every idle process wakes for a new connection and one wins
the ``accept``; with a handful of processes that is nothing.

The control channel: each worker gets one end of a Unix socket pair.
Worker to parent, frames of a 4-byte big-endian length and a JSON object:
``{"t": "ready"}`` once it listens, and ``{"t": "change", "p": ...}`` for
every committed change of the store (``pgnotify.encode``'s payload: the
account id, mailbox name, kind and UIDs, never content), which the parent
publishes on its own bus (``ChangeBus.deliver_remote``), so IMAP sessions
in IDLE in the main process hear a message a worker filed at once. On
PostgreSQL the workers' ``PgChangeBus`` already tells every process
(LISTEN/NOTIFY), so nothing is relayed. Parent to worker: nothing; its end
of file means the parent is gone, and the worker stops (stops listening at
once, so a new server can bind the ports, then drains its sessions).

What else a delivery starts needs no relay: new-mail notices and
invitations are rows in the outbound queue, which the main process's
outbound worker polls every 2 s; login failures (lockout) and the audit
chain are in the database, and SQLite's ``BEGIN IMMEDIATE`` (``db.py``)
serialises the writers of all processes (each has its own group commit).

Signals: the parent forwards SIGHUP (each worker reloads policy and
certificates; the audit event is the parent's) and, when it stops, SIGTERM;
it waits for the workers to drain before it stops itself. A worker that
ends unexpectedly is started again (at most ``RESTARTS`` times within
``RESTART_WINDOW`` seconds, then left down with an error in the log; the
other processes go on serving), and every IDLE session re-reads its
mailboxes, since the changes it was about to relay are lost. ``postvault
ready`` is printed only once every worker listens.

Limits that count connections (``[smtp] max_connections_per_ip``) count
per process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PostvaultError
from ..store.notify import Change, ChangeBus
from ..store.pgnotify import PgChangeBus, decode, encode, encode_resync_all

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .service import SubmissionService

log = logging.getLogger("postvault.smtpd.workers")

# A worker has this long from its start to listening.
READY_SECONDS = 60.0
# Restarts of one worker within RESTART_WINDOW seconds before it is left down.
RESTARTS, RESTART_WINDOW = 5, 300.0
RESTART_DELAY = 1.0
# Frames larger than this are not ours (a change notice is at most 8 KB).
MAX_FRAME = 1 << 20
# Changes held for the parent before they are replaced by one "resync all".
MAX_PENDING = 10_000
_HEADER = struct.Struct(">I")


def frame(message: dict[str, Any]) -> bytes:
    """One control message: length, then compact JSON."""
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next control message; None at the end of the stream. Raises
    ``ValueError`` or ``TypeError`` for a frame that is not ours."""
    try:
        size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
        if size > MAX_FRAME:
            raise ValueError("control frame too large")
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    message = json.loads(body)
    if not isinstance(message, dict):
        raise TypeError("control frame is not an object")
    return message


# -- the worker's side ----------------------------------------------------------------------------


class ControlChannel:
    """The worker's end of the control socket: frames out, on a thread of
    its own, so that the store's writer thread (which publishes changes)
    never waits for the parent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self._cond = threading.Condition()
        self._pending: deque[bytes] = deque()
        self._lost = False  # too many pending: one "resync all" replaces them
        self._closed = False
        self._thread = threading.Thread(target=self._send, name="postvault-smtp-relay", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._pending) >= MAX_PENDING:
                self._pending.clear()
                self._lost = True
            if not self._lost:
                self._pending.append(frame(message))
            self._cond.notify()

    def _send(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._lost and not self._closed:
                    self._cond.wait()
                if not self._pending and not self._lost:
                    return  # closed, all sent
                out = b"".join(self._pending)
                if self._lost:
                    out += frame({"t": "change", "p": encode_resync_all(f"pid{os.getpid()}")})
                self._pending.clear()
                self._lost = False
            try:
                self.sock.sendall(out)
            except OSError:
                # The parent is gone; the watcher below stops this worker.
                with self._cond:
                    self._closed = True
                    self._pending.clear()
                return

    def close(self, timeout: float = 5.0) -> None:
        """Send what is pending, then stop the sending thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def watch_parent(self, gone: Any) -> None:
        """Call ``gone()`` (from a thread) when the parent's end closes."""

        def wait() -> None:
            try:
                while self.sock.recv(4096):
                    pass  # the parent sends nothing; read and drop
            except OSError:
                pass
            gone()

        threading.Thread(target=wait, name="postvault-smtp-parent", daemon=True).start()


class RelayBus(ChangeBus):
    """The worker's change bus on SQLite: this process has no subscribers
    (it serves no IMAP), so each change goes to the parent, which
    publishes it to its own (see the module docstring)."""

    def __init__(self, channel: ControlChannel, node: str) -> None:
        super().__init__()
        self.channel = channel
        self.node = node

    def publish(self, change: Change) -> None:
        self.deliver(change)
        self.channel.send({"t": "change", "p": encode(self.node, change)})


async def _serve_worker(runtime: Runtime, inherited: dict[str, list[socket.socket]], channel: ControlChannel,
                        drain_seconds: float) -> None:
    from ..node_service import NodeLink
    from .service import SubmissionService

    loop = asyncio.get_running_loop()
    services: list[Any] = [SubmissionService(runtime, inherited)]
    if isinstance(runtime.store.bus, PgChangeBus):
        services.append(NodeLink(runtime))  # its NOTIFYs reach the other processes
    listening: list[str] = []
    for service in services:
        listening += await service.start()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: runtime.reload(record=False))
    channel.watch_parent(lambda: loop.call_soon_threadsafe(stop.set))
    channel.send({"t": "ready", "listening": listening})
    log.info("ready: %s", ", ".join(listening))
    await stop.wait()
    log.info("stopping: draining open sessions for up to %.0f s", drain_seconds)
    for service in services:
        await service.stop(drain_seconds)
    log.info("stopped")


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m postvault.smtpd.workers``: one submission worker (started
    by ``postvault serve``, never by hand)."""
    from ..logs import configure_logging
    from ..runtime import Runtime
    from ..serve import DRAIN_SECONDS

    parser = argparse.ArgumentParser(prog="postvault-smtp-worker")
    parser.add_argument("--home", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[], help="NAME=FD[,FD...]")
    parser.add_argument("--drain-seconds", type=float, default=DRAIN_SECONDS)
    args = parser.parse_args(argv)
    # Ctrl-C at a terminal reaches the whole process group; the parent
    # decides, and sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=args.control)
    inherited: dict[str, list[socket.socket]] = {}
    for item in args.listener:
        name, _, fds = item.partition("=")
        inherited[name] = [socket.socket(fileno=int(fd)) for fd in fds.split(",")]
        for sock in inherited[name]:
            sock.setblocking(False)
    tag = f"[smtp {args.index} pid {os.getpid()}]"
    try:
        runtime = Runtime.open(Path(args.home))
    except PostvaultError as exc:
        print(f"postvault smtp worker {args.index}: {exc}", file=sys.stderr, flush=True)
        return 2
    configure_logging(runtime.config.log, tag=tag)
    channel = ControlChannel(control)
    if not isinstance(runtime.store.bus, PgChangeBus):
        runtime.store.bus = RelayBus(channel, f"pid{os.getpid()}")
    try:
        asyncio.run(_serve_worker(runtime, inherited, channel, args.drain_seconds))
    finally:
        runtime.close()
        channel.close()
    return 0


# -- the parent's side ----------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None
    starts: deque[float] = field(default_factory=deque)


class SubmissionWorkers:
    """The ``serve`` service that runs the N - 1 submission workers (see
    the module docstring). Placed after ``SubmissionService``, whose
    listening sockets it hands down."""

    name = "smtp-workers"

    def __init__(self, runtime: Runtime, submission: SubmissionService, drain_seconds: float | None = None) -> None:
        self.runtime = runtime
        self.submission = submission
        self.count = runtime.config.smtp.processes - 1
        self.workers: list[_Worker] = []
        self._fds: dict[str, list[int]] = {}
        self._stopping = False
        self._drain_seconds = drain_seconds

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids (for tests and the log)."""
        return [w.proc.pid for w in self.workers if w.proc is not None and w.proc.poll() is None]

    async def start(self) -> list[str]:
        if self.count < 1:
            return []
        self._fds = self.submission.listening_sockets()
        if not self._fds:
            log.info("[smtp] processes = %d, but no submission listener is configured: no workers",
                     self.count + 1)
            return []
        self.workers = [_Worker(i) for i in range(1, self.count + 1)]
        for worker in self.workers:
            self._spawn(worker)
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in self.workers if w.ready)), READY_SECONDS)
        except (TimeoutError, PostvaultError) as exc:
            self._stopping = True
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is None:
                    worker.proc.kill()
            for worker in self.workers:
                if worker.proc is not None:
                    await asyncio.to_thread(worker.proc.wait)
            if isinstance(exc, PostvaultError):
                raise
            raise PostvaultError("a submission worker process did not start in time; see the log") from None
        log.info("submission in %d processes: this one and workers %s", self.count + 1,
                 ", ".join(f"{w.index} (pid {w.proc.pid})" for w in self.workers if w.proc))
        return []

    def _spawn(self, worker: _Worker) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [fd for group in self._fds.values() for fd in group]
        cmd = [sys.executable, "-m", "postvault.smtpd.workers", "--home", str(self.runtime.home),
               "--index", str(worker.index), "--control", str(child_end.fileno())]
        for kind, group in self._fds.items():
            cmd += ["--listener", f"{kind}={','.join(map(str, group))}"]
        if self._drain_seconds is not None:
            cmd += ["--drain-seconds", str(self._drain_seconds)]
        try:
            # Standard error (the log, if [log] file is empty) is shared;
            # standard output is the parent's alone ("postvault ready").
            worker.proc = subprocess.Popen(cmd, pass_fds=[child_end.fileno(), *fds], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL)
        finally:
            child_end.close()
        worker.starts.append(time.monotonic())
        worker.ready = asyncio.get_running_loop().create_future()
        worker.task = asyncio.ensure_future(self._watch(worker, parent_end))

    async def _watch(self, worker: _Worker, sock: socket.socket) -> None:
        """Relay the worker's messages until it ends; then restart it."""
        assert worker.proc is not None and worker.ready is not None
        proc, ready = worker.proc, worker.ready
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            try:
                while True:
                    try:
                        message = await read_frame(reader)
                    except (ValueError, TypeError) as exc:
                        log.error("submission worker %d sent a malformed message (%s); stopping it",
                                  worker.index, type(exc).__name__)
                        proc.kill()
                        break
                    if message is None:
                        break
                    self._heard(worker, message)
            finally:
                writer.close()
            code = await asyncio.to_thread(proc.wait)
        except asyncio.CancelledError:
            sock.close()
            raise
        if not ready.done():
            ready.set_exception(PostvaultError(
                f"submission worker process {worker.index} ended before listening (status {code}); see the log"))
        if self._stopping:
            log.info("submission worker %d (pid %d) stopped, status %d", worker.index, proc.pid, code)
            return
        # Changes it committed but had not yet relayed are lost: every
        # IDLE session here re-reads (as after a lost PostgreSQL notice).
        self._resync_everyone()
        now = time.monotonic()
        while worker.starts and now - worker.starts[0] > RESTART_WINDOW:
            worker.starts.popleft()
        if len(worker.starts) >= RESTARTS:
            log.error("submission worker %d (pid %d) ended with status %d after %d starts within %.0f s; "
                      "not starting it again (the other processes go on serving)", worker.index, proc.pid, code,
                      len(worker.starts), RESTART_WINDOW)
            return
        log.warning("submission worker %d (pid %d) ended unexpectedly with status %d; starting it again",
                    worker.index, proc.pid, code)
        await asyncio.sleep(RESTART_DELAY)
        if self._stopping:
            return
        try:
            self._spawn(worker)
        except OSError as exc:
            log.error("submission worker %d could not be started again (%s)", worker.index, type(exc).__name__)
            return
        assert worker.ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), READY_SECONDS)
            log.info("submission worker %d listens again (pid %d)", worker.index, worker.proc.pid)
        except (TimeoutError, PostvaultError):
            log.error("submission worker %d did not listen again in time", worker.index)

    def _heard(self, worker: _Worker, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "ready":
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == "change":
            bus = self.runtime.store.bus
            if isinstance(bus, PgChangeBus):
                return  # the workers' changes come by NOTIFY (never sent here)
            try:
                _, change = decode(str(message["p"]))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignored a malformed change notice from submission worker %d (%s)", worker.index,
                            type(exc).__name__)
                return
            if change is None:
                self._resync_everyone()
            else:
                bus.deliver_remote(change)

    def _resync_everyone(self) -> None:
        bus = self.runtime.store.bus
        for account_id in bus.accounts():
            bus.deliver(Change(account_id, "", "resync", ()))

    def reloaded(self) -> None:
        """SIGHUP in the parent: every worker reloads too."""
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    async def stop(self, drain_seconds: float) -> None:
        self._stopping = True
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        tasks = [w.task for w in self.workers if w.task is not None]
        if not tasks:
            return
        # A worker drains for up to drain_seconds, then cuts what is left.
        _, late = await asyncio.wait(tasks, timeout=drain_seconds + 15.0)
        if late:
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is None:
                    log.warning("submission worker %d (pid %d) did not stop; killing it", worker.index,
                                worker.proc.pid)
                    worker.proc.kill()
            await asyncio.wait(late, timeout=10.0)


if __name__ == "__main__":
    sys.exit(worker_main())
