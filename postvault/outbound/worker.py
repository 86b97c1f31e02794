"""The worker that empties the outbound queue: claims due rows, sends each
with a ``Sender``, and records the outcome (sent / retry later / failed).

``run_once`` is synchronous and does one pass; tests call it directly with
an injected clock. ``OutboundWorker`` is the ``postvault serve`` service
around it: one pass on a worker thread every few seconds (sending blocks,
the event loop must not), plus any periodic jobs it is given (the held
notifications sweep). It stops between two passes, so a message that was
being handed over when SIGTERM came is finished or left to its lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from ..errors import storage_full
from .queue import OutboundQueue
from .sender import Outcome

log = logging.getLogger("postvault.outbound")
POLL_SECONDS = 2.0


class SendsMail(Protocol):
    def send(self, mail_from: str, rcpt: str, body: bytes) -> Outcome: ...


def run_once(queue: OutboundQueue, sender: SendsMail, limit: int = 20) -> int:
    """Send what is due now; returns how many rows were attempted. The
    outcomes of the pass are recorded together, in one transaction (a
    notification is queued for every message delivered, so a write
    transaction and an fsync per outcome weighed on the server under load).
    A crash before that commit leaves the pass's rows to their lease, to be
    tried again, as a crash right after a send always did."""
    items = queue.claim_due(limit)
    outcomes = []
    for item in items:
        outcome = sender.send(item.mail_from, item.recipient, item.body)
        outcomes.append((item, outcome.status, str(outcome), outcome.code))
    for (item, _status, text, _code), done in zip(outcomes, queue.record_outcomes(outcomes)):
        if done == "sent":
            log.info("outbound: %s #%d sent", item.kind, item.id)
        elif done == "failed":
            log.warning("outbound: %s #%d failed permanently: %s", item.kind, item.id, text)
        elif done == "retry":
            log.info("outbound: %s #%d will be retried: %s", item.kind, item.id, text)
        else:
            log.warning("outbound: %s #%d given up: %s", item.kind, item.id, text)
    return len(items)


class OutboundWorker:
    """A ``serve`` service with no listener: the queue's sending loop."""

    name = "outbound"

    def __init__(
        self,
        queue: OutboundQueue,
        sender: SendsMail,
        *,
        jobs: tuple[Callable[[], object], ...] = (),
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.queue = queue
        self.sender = sender
        self.jobs = jobs
        self.poll_seconds = poll_seconds
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="postvault-outbound")
        return []

    async def stop(self, drain_seconds: float) -> None:
        self._stop.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_seconds)
        except asyncio.TimeoutError:
            # A send stuck past the drain time: its row keeps its lease and
            # is retried after the next start.
            self._task.cancel()

    def _pass(self) -> int:
        for job in self.jobs:
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - one failing job must not stop sending
                if storage_full(exc) is not None:
                    log.warning("outbound: periodic job skipped, the storage is full")
                else:
                    log.exception("outbound: periodic job failed")
        return run_once(self.queue, self.sender)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = await asyncio.to_thread(self._pass)
            except Exception as exc:  # noqa: BLE001 - e.g. the database is briefly locked; try again next round
                if storage_full(exc) is not None:
                    # Not a bug: the queue cannot record outcomes until
                    # space is freed; the rows keep their leases and retry.
                    log.warning("outbound: pass skipped, the storage is full; retrying in %.0f s",
                                self.poll_seconds)
                else:
                    log.exception("outbound: pass failed")
                busy = 0
            if busy:
                continue  # more may be due right away
            try:
                await asyncio.wait_for(self._stop.wait(), self.poll_seconds)
            except asyncio.TimeoutError:
                pass
