"""New-mail notifications: no PHI in what is queued or sent, preferences
every / batched / off, the notification address."""

from __future__ import annotations

import dataclasses
from email.message import EmailMessage

from postvault.conf.schema import Config, Relay
from postvault.notices.hooks import after_delivery, notify_filed, outbound_queue, sweep_held
from postvault.outbound.sender import Sender
from postvault.outbound.worker import run_once
from postvault.store.api import Store
from tests.conftest import PASSWORD
from tests.outbound.conftest import Clock
from tests.outbound.sink import Certs, sink

MARKERS = ("SUBJECT-MARKER-7f3a", "BODY-MARKER-91c2", "ATTACHMENT-MARKER-5d0e", "PATIENT-MARKER-Jane-Roe")


def phi_mail(msgid: str = "<phi@dental.test>") -> bytes:
    m = EmailMessage()
    m["From"] = "office@dental.test"
    m["To"] = "dr@ortho.test"
    m["Subject"] = f"{MARKERS[0]} about {MARKERS[3]}"
    m["Message-ID"] = msgid
    m.set_content(f"{MARKERS[1]}: findings for {MARKERS[3]}\n")
    m.add_attachment(b"%PDF-1.4 x-ray", maintype="application", subtype="pdf", filename=f"{MARKERS[2]}.pdf")
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def queued_bodies(store: Store, config: Config) -> list[bytes]:
    queue = outbound_queue(store, config)
    return [queue.body(e.id) for e in queue.entries() if e.kind == "notification"]


def scan(data: bytes) -> list[str]:
    text = data.decode("ascii", "replace").replace("=\r\n", "")
    return [m for m in MARKERS if m.lower() in text.lower()]


def test_notification_carries_no_phi_queued_or_sent(
    store: Store, config: Config, people: dict[str, str], certs: Certs
) -> None:
    result = store.deliver(phi_mail(), people["member"], [people["colleague"]])
    assert after_delivery(store, config, result, people["member"]) == 1
    [body] = queued_bodies(store, config)
    assert scan(body) == []
    assert b"Subject: New secure message from Smile Dental" in body
    assert b"mail.example.test" in body and b"To: dr@ortho.test" in body

    with sink(certs) as (handler, port):
        notify = dataclasses.replace(config.notify, relay=Relay("127.0.0.1", port), relay_ca=certs.ca)
        run_once(outbound_queue(store, config), Sender(notify, config.hostname, timeout=10))
    [sent] = handler.received
    assert scan(sent.data) == [] and sent.rcpt_tos == [people["colleague"]]
    assert queued_bodies(store, config) == [b""]  # emptied once sent


def test_preferences_every_batched_off(store: Store, config: Config, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    clock = Clock()

    def deliver(n: int) -> int:
        result = store.deliver(phi_mail(f"<m{n}@dental.test>"), member, [colleague])
        return after_delivery(store, config, result, member, clock=clock)

    assert store.notification_settings(colleague).mode == "every"
    assert [deliver(1), deliver(2)] == [1, 1]

    store.set_notification_settings(colleague, mode="batched", interval_minutes=15)
    clock.advance(minutes=1)
    assert deliver(3) == 0  # one went out a minute ago: held
    assert store.held_notifications() == [colleague]
    clock.advance(minutes=10)
    assert sweep_held(store, config, clock=clock) == 0  # interval not over yet
    clock.advance(minutes=5)
    assert sweep_held(store, config, clock=clock) == 1  # still unread after 15 minutes: one summary
    assert store.held_notifications() == []
    bodies = queued_bodies(store, config)
    assert b"Subject: New secure messages are waiting for you" in bodies[-1] and scan(bodies[-1]) == []

    # Held, then read before the interval ends: nothing more to tell.
    clock.advance(minutes=1)
    assert deliver(4) == 0
    session = store.login(colleague, PASSWORD)
    uids = [m.uid for m in store.snapshot(session, "INBOX").messages]
    store.set_flags(session, "INBOX", uids, ["\\Seen"], "add")
    clock.advance(minutes=30)
    assert sweep_held(store, config, clock=clock) == 0 and store.held_notifications() == []

    store.set_notification_settings(colleague, mode="off")
    assert deliver(5) == 0
    assert len(queued_bodies(store, config)) == 3


def test_notification_address_and_pending_accounts(store: Store, config: Config, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    settings = store.set_notification_settings(colleague, address="front-desk@ortho.test")
    assert settings.address == "front-desk@ortho.test" and settings.custom_address
    store.invite_colleague(member, "pending@ortho.test")
    result = store.deliver(phi_mail(), member, [colleague, "pending@ortho.test"])
    # The invited colleague has its invitation; no notification until sign-up.
    assert after_delivery(store, config, result, member) == 1
    [entry] = [e for e in outbound_queue(store, config).entries() if e.kind == "notification"]
    assert entry.recipient == "front-desk@ortho.test" and entry.account == colleague
    assert store.set_notification_settings(colleague, address=None).address == colleague


def test_notifications_claimed_in_the_filing_transaction(store: Store, config: Config, people: dict[str, str]) -> None:
    """What the SMTP server does (``notify_filed`` as the delivery's hook):
    the same decisions as ``after_delivery``, committed with the message."""
    member, colleague = people["member"], people["colleague"]
    clock = Clock()
    queue = outbound_queue(store, config, clock)
    counts: list[int] = []

    def deliver(n: int, to: list[str] | None = None) -> None:
        prepared = store.prepare_delivery(phi_mail(f"<f{n}@dental.test>"), member, to or [colleague])

        def then(conn, p, result) -> None:  # type: ignore[no-untyped-def]
            counts.append(notify_filed(conn, config, queue, result, p.sender.practice_name, clock=clock))

        store.submit_delivery(prepared, then=then).result(30)

    deliver(1)
    deliver(2)
    # The second says what the first, still untried in the queue, says
    # (add_notifications); once the worker has tried it, a new one is queued.
    assert counts == [1, 0]
    queue.claim_due()
    deliver(2)
    assert counts == [1, 0, 1]
    bodies = queued_bodies(store, config)
    assert len(bodies) == 2 and all(scan(b) == [] for b in bodies)
    assert b"Subject: New secure message from Smile Dental" in bodies[0] and b"To: dr@ortho.test" in bodies[0]
    queue.claim_due()

    store.set_notification_settings(colleague, mode="batched", interval_minutes=15)
    clock.advance(minutes=1)
    deliver(3)
    assert counts[-1] == 0 and store.held_notifications() == [colleague]  # held
    clock.advance(minutes=15)
    deliver(4)
    assert counts[-1] == 1 and store.held_notifications() == []  # interval over: sent, nothing held

    store.set_notification_settings(colleague, mode="off", address="front-desk@ortho.test")
    deliver(5)
    assert counts[-1] == 0
    store.set_notification_settings(colleague, mode="every")
    store.invite_colleague(member, "pending@ortho.test")
    deliver(6, [colleague, "pending@ortho.test"])  # no notification before sign-up
    assert counts[-1] == 1
    entry = [e for e in queue.entries() if e.kind == "notification"][-1]
    assert entry.recipient == "front-desk@ortho.test" and entry.account == colleague
    assert len(queued_bodies(store, config)) == 4


def test_a_notification_waiting_untried_is_not_repeated(store: Store, config: Config, people: dict[str, str]) -> None:
    """Mode "every": while a notification to the same address, saying the
    same (same sender practice), waits untried in the queue, another
    delivery queues none; a different practice, a different address, or
    the first one having been tried (leased by the worker) queues one."""
    member, member2, colleague = people["member"], people["member2"], people["colleague"]
    clock = Clock()
    queue = outbound_queue(store, config, clock)

    def deliver(sender: str, to: str = colleague) -> int:
        prepared = store.prepare_delivery(phi_mail(f"<c{len(queue.entries())}-{clock()}@dental.test>"), sender, [to])
        counts: list[int] = []

        def then(conn, p, result) -> None:  # type: ignore[no-untyped-def]
            counts.append(notify_filed(conn, config, queue, result, p.sender.practice_name, clock=clock))

        store.submit_delivery(prepared, then=then).result(30)
        return counts[0]

    assert [deliver(member) for _ in range(4)] == [1, 0, 0, 0]
    clock.advance(minutes=30)  # later, same words but for Date: still nothing new to say
    assert deliver(member) == 0
    assert deliver(member2) == 1  # "from Family Clinic": another notification
    assert deliver(member, member2) == 1  # another account and address
    store.set_notification_settings(colleague, address="front-desk@ortho.test")
    assert deliver(member) == 1  # another address
    assert len(queue.claim_due()) == 4  # the worker takes them all (attempts 1)
    assert [deliver(member), deliver(member)] == [1, 0]  # tried ones do not count
    bodies = queued_bodies(store, config)
    assert len(bodies) == 5 and all(scan(b) == [] for b in bodies)
    assert sum(b"Subject: New secure message from Family Clinic" in b for b in bodies) == 1
