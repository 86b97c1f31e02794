"""Crash leftovers, cleared when ``postvault serve`` starts.

A process killed between writing a message's sealed blob and committing the
row that refers to it leaves an unreferenced blob (or a temporary file of a
blob being written). Nothing is lost, since nothing was acknowledged, but
``postvault fsck`` would report them until ``fsck --repair`` deletes them an
hour later. The previous process is gone when this one starts, so what it
left can go at once:

- blobs kept in a folder: swept on a worker thread after the listeners
  opened (a walk of the whole folder should not delay the start), only
  entries older than this start, so this process's own deliveries in
  progress are never touched;
- blobs kept in the database: their rows carry no age, so they are swept
  before any listener opens, in one statement.

Only with SQLite, where this process is the store's one writer; with a
database server that other processes may share, ``postvault fsck --repair``
removes leftovers by age instead.

Counts go to the log; never ids of anything that was content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from .runtime import Runtime
from .store.fsck import sweep_leftovers, sweep_table_leftovers

log = logging.getLogger("postvault.sweep")
# File systems stamp times from a coarse clock that can lag time.time() by
# a few milliseconds; a margin keeps this start's own new files out.
CLOCK_MARGIN = 1.0


class LeftoverSweep:
    """A ``serve`` service with no listener; starts before all others."""

    name = "sweep"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        if self.runtime.store.engine.dialect.name != "sqlite":
            # A shared database server may have other writers, whose blob
            # rows (or files) this start cannot tell from crash leftovers;
            # there `fsck --repair` removes them by age.
            return []
        root = self.runtime.config.store.blobs
        if root is None:
            try:
                removed = await asyncio.to_thread(sweep_table_leftovers, self.runtime.store)
            except SQLAlchemyError as exc:
                log.warning("leftover sweep failed: %s", type(exc).__name__)
            else:
                log.info("leftover sweep done: %d unreferenced blobs removed from the database", removed)
            return []
        before = time.time() - CLOCK_MARGIN
        self._task = asyncio.get_running_loop().create_task(self._sweep_folder(before))
        return []

    async def _sweep_folder(self, before: float) -> None:
        root = self.runtime.config.store.blobs
        assert root is not None
        try:
            result = await asyncio.to_thread(sweep_leftovers, self.runtime.store, root, before, self._stop.is_set)
        except (OSError, SQLAlchemyError) as exc:
            log.warning("leftover sweep failed: %s", type(exc).__name__)
            return
        log.info("leftover sweep done: %d unreferenced blobs and %d temporary files removed",
                 result.blobs, result.temp_files)

    async def stop(self, drain_seconds: float) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
