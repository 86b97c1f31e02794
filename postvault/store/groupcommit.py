"""Group commit: many callers' writes done by one thread, several per
transaction.

SQLite admits one writer at a time and every commit costs an fsync of the
WAL; PostgreSQL's commit costs a WAL flush too. Callers that each ran their
own write transaction queued on the write lock (SQLite's busy handler sleeps
in steps of up to 100 ms while it waits) and paid one commit each. A
``GroupRunner`` hands every submitted item to one worker thread, which takes
whatever has queued up meanwhile (up to ``max_batch``) and passes the items
to their ``run_batch`` function, all items of one function at once: one
transaction, one commit, for all of them. Items of different functions
(the store's deliveries, the SMTP server's notifications) share the thread,
so they never wait on each other's locks either. Each caller's future is
resolved only after its ``run_batch`` returned, i.e. after the commit that
holds its item.

``run_batch`` gets its items in submission order and returns one outcome per
item, a result or the exception for that item alone; it must never let one
item's failure decide another's (``MailStore._commit_deliveries`` retries
the rest one by one). If ``run_batch`` itself raises, every item it was
given gets that exception.

The worker thread starts on the first ``submit`` and ends after
``idle_seconds`` without work (a later ``submit`` starts a new one), so an
idle store holds no thread and nothing needs closing.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BatchFunction = Callable[[Sequence[Any]], Sequence[Any]]


class GroupRunner:
    """One worker thread running batch functions over what callers submit."""

    def __init__(self, *, name: str, max_batch: int = 64, idle_seconds: float = 2.0) -> None:
        self._name = name
        self._max_batch = max_batch
        self._idle_seconds = idle_seconds
        self._queue: deque[tuple[BatchFunction, Any, Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, run_batch: Callable[[Sequence[T]], Sequence[R | BaseException]], item: T) -> Future[R]:
        """Queue ``item`` for ``run_batch``; the future is resolved after
        its batch ran (committed)."""
        future: Future[R] = Future()
        with self._cond:
            self._queue.append((run_batch, item, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._worker.start()
            else:
                self._cond.notify()
        return future

    def _take(self) -> list[tuple[BatchFunction, Any, Future[Any] | None]]:
        with self._cond:
            if not self._queue:
                self._cond.wait(self._idle_seconds)
            if not self._queue:
                self._worker = None  # a submit after this starts a new worker
                return []
            n = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
        # A caller that cancelled its future before now gave up waiting, not
        # the item: it is still run (as if the caller had gone away just
        # after the commit), its outcome simply has no one to go to. After
        # this call a future can no longer be cancelled.
        return [(fn, item, future if future.set_running_or_notify_cancel() else None) for fn, item, future in batch]

    def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            groups: dict[BatchFunction, list[tuple[Any, Future[Any] | None]]] = {}
            for fn, item, future in batch:
                groups.setdefault(fn, []).append((item, future))
            for fn, entries in groups.items():
                self._run(fn, entries)

    def _run(self, fn: BatchFunction, entries: list[tuple[Any, Future[Any] | None]]) -> None:
        try:
            outcomes: Sequence[Any] = fn([item for item, _ in entries])
            if len(outcomes) != len(entries):
                raise RuntimeError("a batch function returned the wrong number of outcomes")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            log.warning("%s: a batch of %d failed (%s)", self._name, len(entries), type(exc).__name__)
            outcomes = [exc] * len(entries)
        for (_, future), outcome in zip(entries, outcomes):
            if future is None:
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
