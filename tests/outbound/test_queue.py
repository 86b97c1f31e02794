"""The outbound queue survives a restart; claims are leased; the serve
service sends and stops cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest

from postvault.conf.schema import Config, Relay
from postvault.home import open_store
from postvault.outbound.queue import LEASE, Backoff, OutboundQueue
from postvault.outbound.sender import Outcome, Sender
from postvault.outbound.worker import OutboundWorker, run_once
from postvault.store.api import Store
from tests.outbound.conftest import Clock
from tests.outbound.sink import Certs, sink

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


class Refusing:
    """A sender whose next hop always answers 4xx (our SendsMail seam)."""

    def send(self, mail_from: str, rcpt: str, body: bytes) -> Outcome:
        return Outcome("temporary", 421, "4.3.2 shutting down")


def test_queue_survives_a_restart(config: Config, clock: Clock) -> None:
    first = open_store(config)
    queue = OutboundQueue.for_config(first.engine, config.notify, clock)
    queue.enqueue("invitation", "no-reply@mail.example.test", "dr@ortho.test", b"Subject: a\r\n\r\nbody\r\n")
    run_once(queue, Refusing())  # one failed attempt before the "crash"
    first.close()

    again = open_store(config)  # a new process: new engine, same database
    try:
        queue = OutboundQueue.for_config(again.engine, config.notify, clock)
        [entry] = queue.entries()
        assert (entry.state, entry.attempts, entry.has_body) == ("queued", 1, True)
        assert queue.body(entry.id) == b"Subject: a\r\n\r\nbody\r\n"
        clock.advance(seconds=config.notify.retry_first_seconds)
        [item] = queue.claim_due()
        assert item.attempts == 2 and item.recipient == "dr@ortho.test"
    finally:
        again.close()


def test_a_claim_is_leased(store: Store, clock: Clock) -> None:
    queue = OutboundQueue(store.engine, Backoff(), clock)
    queue.enqueue("notification", "no-reply@mail.example.test", "dr@ortho.test", b"x")
    assert len(queue.claim_due()) == 1
    # A second worker (or this one, again) does not get it while leased...
    assert queue.claim_due() == []
    # ...but a worker that died mid-send does not lose it for good.
    clock.advance(seconds=LEASE.total_seconds())
    assert len(queue.claim_due()) == 1


def test_backoff_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(timedelta(seconds=60), timedelta(seconds=600), timedelta(hours=1))
    assert [backoff.delay(n).total_seconds() for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]
    assert backoff.delay(10_000) == timedelta(seconds=600)


def test_service_sends_and_stops(store: Store, config: Config, certs: Certs) -> None:
    queue = OutboundQueue.for_config(store.engine, config.notify)
    queue.enqueue("notification", "no-reply@mail.example.test", "dr@ortho.test", b"Subject: a\r\n\r\nhello\r\n")
    swept: list[int] = []

    async def main(port: int) -> None:
        notify = dataclasses.replace(config.notify, relay=Relay("127.0.0.1", port), relay_ca=certs.ca)
        worker = OutboundWorker(queue, Sender(notify, "mail.example.test", timeout=10),
                                jobs=(lambda: swept.append(1),), poll_seconds=0.05)
        assert await worker.start() == []
        for _ in range(200):
            if queue.entries()[0].state == "sent":
                break
            await asyncio.sleep(0.05)
        await worker.stop(5)

    with sink(certs) as (handler, port):
        asyncio.run(main(port))
    assert queue.entries()[0].state == "sent" and len(handler.received) == 1 and swept


class ByRecipient:
    """A sender whose outcome depends on the recipient (our SendsMail seam)."""

    def send(self, mail_from: str, rcpt: str, body: bytes) -> Outcome:
        if rcpt.startswith("ok"):
            return Outcome("sent", 250, "2.0.0 queued")
        if rcpt.startswith("bad"):
            return Outcome("permanent", 550, "5.1.1 no such user")
        return Outcome("temporary", 451, "4.3.0 later")


def test_one_pass_records_every_outcome_together(store: Store, clock: Clock) -> None:
    from sqlalchemy import select

    from postvault.store.models import AuditEvent

    queue = OutboundQueue(store.engine, Backoff(timedelta(seconds=60)), clock)
    for rcpt in ("ok1@a.test", "bad@a.test", "later@a.test", "ok2@a.test"):
        queue.enqueue("notification", "no-reply@mail.example.test", rcpt, b"x", account=rcpt)
    assert run_once(queue, ByRecipient()) == 4
    got = {e.recipient: (e.state, e.attempts, e.has_body) for e in queue.entries()}
    assert got == {"ok1@a.test": ("sent", 1, False), "bad@a.test": ("failed", 1, False),
                   "later@a.test": ("queued", 1, True), "ok2@a.test": ("sent", 1, False)}
    with store._sessions() as s:
        events = [(e.event, e.account, e.detail) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.event.like("outbound.%")).order_by(AuditEvent.id))]
    assert events == [("outbound.sent", "ok1@a.test", "kind=notification attempts=1"),
                      ("outbound.failed", "bad@a.test", "kind=notification attempts=1 reply=550"),
                      ("outbound.sent", "ok2@a.test", "kind=notification attempts=1")]
    assert queue.claim_due() == []  # the retry waits for its backoff...
    clock.advance(seconds=60)
    [item] = queue.claim_due()  # ...then comes back, its second attempt
    assert (item.recipient, item.attempts) == ("later@a.test", 2)
