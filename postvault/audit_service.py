"""The audit log's housekeeping inside ``postvault serve``: a signed
checkpoint after ``[audit] checkpoint_events`` new events or
``checkpoint_seconds`` (whichever first) and at shutdown, and pruning by
``retention_days`` once a day (see store/auditlog.py for why)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy.exc import SQLAlchemyError

from .errors import PostvaultError, storage_full
from .runtime import Runtime
from .store.auditsign import ensure_signing_key

log = logging.getLogger("postvault.audit")
PRUNE_EVERY = 24 * 3600.0
# How often the event count is looked at; a checkpoint is at most this late.
POLL_SECONDS = 5.0


class AuditService:
    """A timer on the serve loop; listens on nothing."""

    name = "audit"
    stops_last = True

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._task: asyncio.Task[None] | None = None
        self._last_checkpoint = time.monotonic()
        self._last_prune: float | None = None

    async def start(self) -> list[str]:
        # Homes made before checkpoints existed get their key here.
        ensure_signing_key(self.runtime.home)
        await asyncio.to_thread(self.runtime.store.record_event, "server.start", actor="postvault")
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return []

    async def stop(self, drain_seconds: float) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # After the other services drained: this signs everything they wrote.
        await asyncio.to_thread(self.runtime.store.record_event, "server.stop", actor="postvault")
        await asyncio.to_thread(self._checkpoint, "shutdown")

    def _checkpoint(self, kind: str) -> None:
        self.runtime.store.audit_checkpoint(self.runtime.home, kind, only_if_new=True)
        self._last_checkpoint = time.monotonic()

    def _due(self) -> bool:
        audit = self.runtime.config.audit
        unsigned, _ = self.runtime.store.audit_unsigned()
        if unsigned >= audit.checkpoint_events:
            return True
        return unsigned > 0 and time.monotonic() - self._last_checkpoint >= audit.checkpoint_seconds

    def _prune(self) -> None:
        days = self.runtime.config.audit.retention_days
        self._last_prune = time.monotonic()
        if days:
            cutoff = datetime.now(timezone.utc) - timedelta(days=days)
            self.runtime.store.audit_prune(self.runtime.home, cutoff, actor="postvault")

    async def _loop(self) -> None:
        poll = min(POLL_SECONDS, float(self.runtime.config.audit.checkpoint_seconds))
        while True:
            try:
                if self._last_prune is None or time.monotonic() - self._last_prune >= PRUNE_EVERY:
                    await asyncio.to_thread(self._prune)
                if await asyncio.to_thread(self._due):
                    await asyncio.to_thread(self._checkpoint, "periodic")
            except (PostvaultError, SQLAlchemyError, OSError) as exc:
                # A broken chain stays unpruned and keeps being reported;
                # the servers keep serving. A full disk (the checkpoint row
                # or certs/audit-head.json not written) must not end this
                # loop either: the checkpoint is made once space is back.
                if storage_full(exc) is not None:
                    log.warning("audit housekeeping: checkpoint postponed, the storage is full")
                else:
                    log.error("audit housekeeping: %s", type(exc).__name__ if isinstance(exc, OSError) else exc)
            await asyncio.sleep(poll)
