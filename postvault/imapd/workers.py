"""The IMAP service's worker threads, and the way their results come back.

Why not Twisted's ``ThreadPool`` with ``deferToThreadPool``: every result
came back through ``reactor.callFromThread``, which on the asyncio reactor
is ``call_soon_threadsafe`` (a write to the loop's self-pipe) of a
``callLater(0, ...)`` (a ``DelayedCall``, the reactor's timer heap and an
asyncio timer re-armed), and the way in went through the pool's team,
coordinator and worker objects, each with its own lock and queue. With
ten clients fetching single messages that machinery was about a fifth of
the reactor thread's time. Here a job is one ``SimpleQueue.put``; results
are appended to one queue and the loop is woken once per burst (a result
that finds a wake-up already pending rides on it), and the Deferreds fire
straight from that one loop callback. The group-commit writer's futures
(``settle``) come back the same way: the audit events of many sessions
committed together cost one wake-up, not one each. The change bus's
notifications come the same way (``call_from_thread``), so that a change a
job published before it returned reaches the session before the job's
result does (RENAME INBOX announces its own EXPUNGEs), as it did when both
went through ``callFromThread``.

Invariants:
- ``run`` and ``settle`` are called on the reactor thread, and every
  Deferred they return fires on it; results, settled futures and
  ``call_from_thread`` calls are handled in the order they arrived.
- At most ``threads`` worker threads; they start when work needs them.
  ``stop`` lets queued jobs finish, then ends every thread.
- A job's exception reaches its Deferred as a ``Failure`` with the
  worker's traceback; nothing a job raises ends its thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from ..errors import PostvaultError

log = logging.getLogger("postvault.imapd")
T = TypeVar("T")


class WorkersStopped(PostvaultError):
    """Work was handed to the IMAP worker threads after they stopped."""


class Workers:
    """Worker threads whose results fire Deferreds on the reactor thread."""

    def __init__(self, threads: int, name: str) -> None:
        self._max = max(1, threads)
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...],
                                            dict[str, Any]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Jobs handed out whose result has not been delivered yet (touched
        # on the reactor thread only): a new thread starts only when every
        # thread may be busy.
        self._outstanding = 0
        # (Deferred, succeeded, value, counts_as_job) - or (None, _,
        # (function, args), _) for ``call_from_thread`` - appended by any
        # thread, emptied by ``_drain`` on the reactor thread.
        self._done: deque[tuple[defer.Deferred[Any] | None, bool, Any, bool]] = deque()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    def start(self) -> None:
        """Called on the reactor (asyncio loop) thread, before any ``run``."""
        self._loop = asyncio.get_running_loop()
        self._stopped = False

    def run(self, f: Callable[..., T], *args: Any, **kw: Any) -> defer.Deferred[T]:
        """``f(*args, **kw)`` on a worker thread; its result or exception
        fires the Deferred on the reactor thread."""
        d: defer.Deferred[T] = defer.Deferred()
        if self._stopped:
            d.errback(Failure(WorkersStopped("the IMAP worker threads have stopped")))
            return d
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._outstanding += 1
        if self._outstanding > len(self._threads) and len(self._threads) < self._max:
            t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        self._jobs.put((d, f, args, kw))
        return d

    def settle(self, future: Future[T]) -> defer.Deferred[T]:
        """A Deferred that fires on the reactor thread with ``future``'s
        outcome (another thread resolves it, e.g. the store's writer)."""
        d: defer.Deferred[T] = defer.Deferred()

        def done(f: Future[T]) -> None:
            exc = f.exception()
            if exc is not None:
                self._deliver(d, False, Failure(exc), False)
            else:
                self._deliver(d, True, f.result(), False)

        future.add_done_callback(done)
        return d

    def call_from_thread(self, f: Callable[..., Any], *args: Any) -> None:
        """``f(*args)`` on the reactor thread, in order with the results
        (callable from any thread)."""
        self._deliver(None, True, (f, args), False)

    def stop(self) -> None:
        """Let queued jobs finish, then end the threads (blocks: call it off
        the reactor thread)."""
        self._stopped = True
        threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            t.join()
        self._threads = []

    # -- worker side ----------------------------------------------------------------

    def _work(self) -> None:
        get = self._jobs.get
        while True:
            job = get()
            if job is None:
                return
            d, f, args, kw = job
            del job
            try:
                result = f(*args, **kw)
            except BaseException:  # noqa: BLE001 - handed to the caller's Deferred, as Twisted's pool does
                self._deliver(d, False, Failure(), True)
            else:
                self._deliver(d, True, result, True)
                del result
            del d, f, args, kw

    def _deliver(self, d: defer.Deferred[Any] | None, ok: bool, value: Any, job: bool) -> None:
        self._done.append((d, ok, value, job))
        # Set only here and reset first thing in ``_drain``: a result
        # appended after the drain's last look finds the flag clear and
        # wakes the loop again; one appended before it is drained.
        if not self._wake_pending:
            self._wake_pending = True
            loop = self._loop
            assert loop is not None
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                # The loop is closed (the process is ending): no one is
                # left to take the result.
                log.debug("IMAP worker result dropped: the event loop is closed")

    # -- reactor side ---------------------------------------------------------------

    def _drain(self) -> None:
        self._wake_pending = False
        done = self._done
        while done:
            d, ok, value, job = done.popleft()
            if job:
                self._outstanding -= 1
            try:
                if d is None:
                    f, args = value
                    f(*args)
                elif ok:
                    d.callback(value)
                else:
                    d.errback(value)
            except Exception:  # one bad delivery must not hold up the others
                log.exception("delivering an IMAP worker result failed")
