"""Sending through a smarthost: a real aiosmtpd sink on 127.0.0.1 with the
dev CA's certificate, the real queue in a real store, a clock we move."""

from __future__ import annotations

import dataclasses

from sqlalchemy import select

from postvault.conf.schema import Config, Relay
from postvault.outbound.queue import OutboundQueue
from postvault.outbound.sender import Sender
from postvault.outbound.worker import run_once
from postvault.store.api import Store
from postvault.store.models import AuditEvent
from tests.outbound.conftest import Clock
from tests.outbound.sink import Certs, sink

BODY = b"From: no-reply@mail.example.test\r\nTo: dr@ortho.test\r\nSubject: hello\r\n\r\nNo PHI here.\r\n"


def sender_for(config: Config, port: int, certs: Certs | None, *, implicit: bool = False,
               login: tuple[str, str] | None = None) -> Sender:
    relay = Relay("127.0.0.1", port, *(login or (None, None)))
    notify = dataclasses.replace(
        config.notify, relay=relay, relay_ca=certs.ca if certs else None,
        relay_tls="implicit" if implicit else "starttls",
    )
    return Sender(notify, "mail.example.test", timeout=10)


def queue_for(store: Store, config: Config, clock: Clock) -> OutboundQueue:
    return OutboundQueue.for_config(store.engine, config.notify, clock)


def events(store: Store) -> list[tuple[str, str | None, str]]:
    with store._sessions() as s:
        rows = s.execute(select(AuditEvent.event, AuditEvent.account, AuditEvent.detail)
                         .where(AuditEvent.event.like("outbound.%")).order_by(AuditEvent.id))
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_sent_over_verified_starttls(store: Store, config: Config, certs: Certs, clock: Clock) -> None:
    queue = queue_for(store, config, clock)
    queue.enqueue("notification", "no-reply@mail.example.test", "dr@ortho.test", BODY, account="dr@ortho.test")
    with sink(certs) as (handler, port):
        assert run_once(queue, sender_for(config, port, certs)) == 1
    [got] = handler.received
    assert got.tls and got.rcpt_tos == ["dr@ortho.test"] and got.data.endswith(b"No PHI here.\r\n")
    [entry] = queue.entries()
    assert entry.state == "sent" and not entry.has_body
    assert events(store) == [("outbound.sent", "dr@ortho.test", "kind=notification attempts=1")]


def test_implicit_tls_and_auth(store: Store, config: Config, certs: Certs, clock: Clock) -> None:
    queue = queue_for(store, config, clock)
    queue.enqueue("invitation", "no-reply@mail.example.test", "dr@ortho.test", BODY)
    with sink(certs, implicit=True, login=("relay-user", "relay secret")) as (handler, port):
        run_once(queue, sender_for(config, port, certs, implicit=True, login=("relay-user", "relay secret")))
    [got] = handler.received
    assert got.tls and got.login == "relay-user"


def test_no_starttls_means_not_sent_and_retried(store: Store, config: Config, certs: Certs, clock: Clock) -> None:
    queue = queue_for(store, config, clock)
    queue.enqueue("notification", "no-reply@mail.example.test", "dr@ortho.test", BODY)
    with sink(None, starttls=False) as (handler, port):
        run_once(queue, sender_for(config, port, certs))
        assert handler.received == [] and handler.attempts == 0
    [entry] = queue.entries()
    assert entry.state == "queued" and entry.has_body and entry.attempts == 1
    assert "STARTTLS" in entry.last_error
    assert entry.next_attempt_at == clock.now + queue.backoff.delay(1)
    # Not due yet: nothing is tried.
    with sink(certs) as (handler, port):
        assert run_once(queue, sender_for(config, port, certs)) == 0
        clock.advance(seconds=config.notify.retry_first_seconds)
        assert run_once(queue, sender_for(config, port, certs)) == 1
    assert len(handler.received) == 1 and queue.entries()[0].state == "sent"


def test_untrusted_certificate_is_a_temporary_failure(
    store: Store, config: Config, certs: Certs, clock: Clock, tmp_path
) -> None:
    from tests.outbound.sink import write_certs

    other = write_certs(tmp_path / "other")  # a CA that did not sign the sink's certificate
    queue = queue_for(store, config, clock)
    queue.enqueue("notification", "no-reply@mail.example.test", "dr@ortho.test", BODY)
    with sink(certs) as (handler, port):
        run_once(queue, sender_for(config, port, other))
    assert handler.received == []
    [entry] = queue.entries()
    assert entry.state == "queued" and "certificate" in entry.last_error


def test_4xx_then_success(store: Store, config: Config, certs: Certs, clock: Clock) -> None:
    queue = queue_for(store, config, clock)
    queue.enqueue("notification", "no-reply@mail.example.test", "dr@ortho.test", BODY, account="dr@ortho.test")
    with sink(certs, script=["451 4.3.0 try again later", "452 4.3.1 still busy"]) as (handler, port):
        sender = sender_for(config, port, certs)
        run_once(queue, sender)
        first = queue.entries()[0]
        assert first.state == "queued" and first.last_error.startswith("451")
        clock.advance(seconds=config.notify.retry_first_seconds)
        run_once(queue, sender)
        second = queue.entries()[0]
        assert second.next_attempt_at == clock.now + queue.backoff.delay(2)
        assert queue.backoff.delay(2) == 2 * queue.backoff.delay(1)
        clock.advance(seconds=2 * config.notify.retry_first_seconds)
        run_once(queue, sender)
    assert handler.attempts == 3 and len(handler.received) == 1
    assert queue.entries()[0].state == "sent"
    assert events(store) == [("outbound.sent", "dr@ortho.test", "kind=notification attempts=3")]


def test_5xx_is_permanent(store: Store, config: Config, certs: Certs, clock: Clock) -> None:
    queue = queue_for(store, config, clock)
    queue.enqueue("invitation", "no-reply@mail.example.test", "nobody@ortho.test", BODY, account="nobody@ortho.test")
    with sink(certs, script=["550 5.1.1 <nobody@ortho.test>: no such user"]) as (handler, port):
        sender = sender_for(config, port, certs)
        run_once(queue, sender)
        clock.advance(days=1)
        assert run_once(queue, sender) == 0  # never retried
    [entry] = queue.entries()
    assert entry.state == "failed" and not entry.has_body and entry.last_error.startswith("550")
    # The audit names the account, never the server's text (which quotes the address).
    assert events(store) == [("outbound.failed", "nobody@ortho.test", "kind=invitation attempts=1 reply=550")]


def test_gives_up_after_the_deadline(store: Store, config: Config, certs: Certs, clock: Clock) -> None:
    queue = queue_for(store, config, clock)
    queue.enqueue("notification", "no-reply@mail.example.test", "dr@ortho.test", BODY, account="dr@ortho.test")
    deadline = clock.now + queue.backoff.give_up_after
    attempts = 0
    with sink(None, starttls=False) as (_handler, port):
        sender = sender_for(config, port, certs)
        while queue.entries()[0].state == "queued":
            attempts += run_once(queue, sender)
            entry = queue.entries()[0]
            if entry.state == "queued":
                assert entry.next_attempt_at <= deadline
                clock.now = entry.next_attempt_at
            assert attempts < 200
    [entry] = queue.entries()
    assert entry.state == "failed" and entry.last_error.startswith("gave up after")
    assert clock.now == deadline
    # Backoff capped at retry_max_seconds: 48 h at most 1 h apart, doubling from 60 s.
    assert 48 <= attempts <= 60
    [(event, account, detail)] = events(store)
    assert event == "outbound.failed" and account == "dr@ortho.test" and detail.endswith("gave-up")
