"""Group commit of deliveries (store/groupcommit.py, store/delivery.py), on a
real store: SQLite file, sealed blobs on disk, several threads at once."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timezone

import pytest
from sqlalchemy import delete, func, select

from postvault.errors import MailboxNotFound
from postvault.store import audit
from postvault.store.api import Store
from postvault.store.groupcommit import GroupRunner
from postvault.store.models import AuditEvent, Mailbox, Message, MessageCopy
from postvault.store.types import DeliveryResult

from ..conftest import PASSWORD
from tests.support import stored_blobs

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def raw(n: int, refs: str = "") -> bytes:
    extra = f"In-Reply-To: {refs}\r\n" if refs else ""
    return (f"From: office@dental.test\r\nTo: front@clinic.test\r\nSubject: note {n}\r\n"
            f"Message-ID: <gc-{n}@dental.test>\r\n{extra}\r\nbody {n}\r\n").encode()


def held_writer(store: Store) -> tuple[threading.Event, Future[int]]:
    """Keep the store's writer thread busy until the event is set, so that
    what is submitted meanwhile lands in one batch."""
    release, started = threading.Event(), threading.Event()

    def block(items: Sequence[int]) -> list[int]:
        started.set()
        assert release.wait(30)
        return list(items)

    future = store.group_write(block, 0)
    assert started.wait(30)
    return release, future


def chain_is_valid(store: Store) -> int:
    """Recompute every audit row's hash as audit.event_hash defines it."""
    with store._sessions() as s:
        rows = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    prev = audit.GENESIS
    for r in rows:
        at = r.at if r.at.tzinfo is not None else r.at.replace(tzinfo=timezone.utc)
        fields = {"at": at.isoformat(), "event": r.event, "actor": r.actor, "account": r.account,
                  "message": r.message, "client_ip": r.client_ip, "protocol": r.protocol, "detail": r.detail}
        assert r.prev_hash == prev
        assert r.hash == audit.event_hash(prev, fields)
        prev = r.hash
    return len(rows)


def test_concurrent_deliveries_are_stored_once_with_distinct_ascending_uids(
        store: Store, people: dict[str, str], config) -> None:  # type: ignore[no-untyped-def]
    n = 60
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: store.deliver(raw(i), people["member"], [people["member2"]],
                                                        client_ip="192.0.2.7", protocol="smtp"), range(n)))
    inbox_uids = [r.delivered[0][1] for r in results]
    sent_uids = [r.sent_uid for r in results]
    assert sorted(inbox_uids) == list(range(1, n + 1))
    assert sorted(sent_uids) == list(range(1, n + 1))  # type: ignore[type-var]
    assert len({r.message_id for r in results}) == n

    reader = store.login(people["member2"], PASSWORD)
    snap = store.snapshot(reader, "INBOX")
    assert [m.uid for m in snap.messages] == list(range(1, n + 1))
    # Each modseq once, growing with the UID: the copies were filed in order.
    assert [m.modseq for m in snap.messages] == sorted({m.modseq for m in snap.messages})
    assert snap.mailbox.uidnext == n + 1
    bodies = set()
    for uid in range(1, n + 1):
        with store.open_message(reader, "INBOX", uid) as f:
            bodies.add(f.read().split(b"\r\n\r\n", 1)[1])
    assert bodies == {f"body {i}\r\n".encode() for i in range(n)}
    with store._sessions() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == n
        assert s.scalar(select(func.count()).select_from(MessageCopy)) == 2 * n
    assert len(stored_blobs(store)) == n
    assert chain_is_valid(store) >= n


def test_one_batch_one_transaction_uids_follow_submission_order(store: Store, people: dict[str, str]) -> None:
    release, blocker = held_writer(store)
    prepared = [store.prepare_delivery(raw(i), people["member"], [people["member2"]]) for i in range(5)]
    futures = [store.submit_delivery(p) for p in prepared]
    release.set()
    assert blocker.result(30) == 0
    results = [f.result(30) for f in futures]
    assert [r.delivered[0][1] for r in results] == [1, 2, 3, 4, 5]
    assert [r.sent_uid for r in results] == [1, 2, 3, 4, 5]
    assert chain_is_valid(store) >= 5


def test_a_failing_message_does_not_affect_the_others_in_its_batch(
        store: Store, people: dict[str, str], config) -> None:  # type: ignore[no-untyped-def]
    good1 = store.prepare_delivery(raw(1), people["member"], [people["member2"]])
    bad = store.prepare_delivery(raw(2), people["member"], [people["colleague"]])
    good2 = store.prepare_delivery(raw(3), people["member"], [people["member2"]])
    # The colleague's INBOX goes away between sealing and filing: that one
    # message cannot be filed.
    with store.engine.begin() as conn:
        colleague = store.get_account(people["colleague"]).id
        conn.execute(delete(Mailbox).where(Mailbox.account_id == colleague, Mailbox.name == "INBOX"))
    # Small messages: each blob is written by the transaction that files
    # it (store/smallblobs.py), none before.
    assert all(p.inline is not None for p in (good1, bad, good2)) and stored_blobs(store) == []

    release, blocker = held_writer(store)
    futures = [store.submit_delivery(p) for p in (good1, bad, good2)]
    release.set()
    blocker.result(30)
    r1, r3 = futures[0].result(30), futures[2].result(30)
    with pytest.raises(MailboxNotFound):
        futures[1].result(30)

    assert [r1.delivered[0][1], r3.delivered[0][1]] == [1, 2]
    with store._sessions() as s:
        stored = set(s.scalars(select(Message.public_id)))
        assert stored == {r1.message_id, r3.message_id}
        # Nothing of the failed message: no row, no copy, no blob.
        assert s.scalar(select(func.count()).select_from(MessageCopy)) == 4
        events = list(s.scalars(select(AuditEvent.message).where(AuditEvent.event == "message.deliver")))
    assert sorted(events) == sorted([r1.message_id, r3.message_id])
    assert len(stored_blobs(store)) == 2
    reader = store.login(people["member2"], PASSWORD)
    assert [m.uid for m in store.snapshot(reader, "INBOX").messages] == [1, 2]
    assert chain_is_valid(store) >= 2


def test_a_reply_in_the_same_batch_joins_the_thread_of_its_parent(store: Store, people: dict[str, str]) -> None:
    release, blocker = held_writer(store)
    first = store.prepare_delivery(raw(1), people["member"], [people["member2"]])
    # The sender holds its own first message (in Sent), so the reply joins.
    reply = store.prepare_delivery(raw(2, refs="<gc-1@dental.test>"), people["member"], [people["member2"]])
    futures = [store.submit_delivery(p) for p in (first, reply)]
    release.set()
    blocker.result(30)
    a, b = (f.result(30) for f in futures)
    with store._sessions() as s:
        threads = dict(s.execute(select(Message.public_id, Message.thread_id)).all())
    assert threads[a.message_id] == threads[b.message_id]


def test_group_runner_gives_each_item_its_own_outcome() -> None:
    runner = GroupRunner(name="test-runner")
    release = threading.Event()
    seen: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int | BaseException]:
        release.wait(30)
        seen.append(list(items))
        return [ValueError(i) if i % 2 else i * 10 for i in items]

    futures = [runner.submit(run, i) for i in range(6)]
    release.set()
    assert [f.result(30) for f in futures[::2]] == [0, 20, 40]
    for f in futures[1::2]:
        with pytest.raises(ValueError):
            f.result(30)
    assert sorted(x for batch in seen for x in batch) == list(range(6))
    assert len(seen) < 6  # what queued behind the first batch went in one


def test_group_runner_a_raising_batch_fails_each_of_its_items() -> None:
    runner = GroupRunner(name="test-runner")

    def run(items: Sequence[int]) -> list[int]:
        raise RuntimeError("database went away")

    futures = [runner.submit(run, i) for i in range(3)]
    for f in futures:
        with pytest.raises(RuntimeError):
            f.result(30)
    ok = runner.submit(lambda items: [x + 1 for x in items], 1)
    assert ok.result(30) == 2


def test_deliver_results_are_delivery_results(store: Store, people: dict[str, str]) -> None:
    r = store.deliver(raw(1), people["member"], [people["member2"], people["colleague"]], save_sent=False)
    assert isinstance(r, DeliveryResult)
    assert sorted(u for _, u in r.delivered) == [1, 1] and r.sent_uid is None


def test_a_failing_then_hook_is_undone_alone_and_its_message_stays(
        store: Store, people: dict[str, str], config) -> None:  # type: ignore[no-untyped-def]
    def hook(fail: bool):  # type: ignore[no-untyped-def]
        def then(conn, prepared, result) -> None:  # type: ignore[no-untyped-def]
            # A write of the hook's own, then (for one of them) a failure.
            audit.record_many(conn, [audit.Event("test.hook", actor="test", message=result.message_id)])
            if fail:
                raise RuntimeError("hook failed")
        return then

    release, blocker = held_writer(store)
    prepared = [store.prepare_delivery(raw(i), people["member"], [people["member2"]]) for i in range(3)]
    futures = [store.submit_delivery(p, then=hook(i == 1)) for i, p in enumerate(prepared)]
    release.set()
    blocker.result(30)
    results = [f.result(30) for f in futures]
    assert [r.delivered[0][1] for r in results] == [1, 2, 3]  # all three stored
    with store._sessions() as s:
        hooked = list(s.scalars(select(AuditEvent.message).where(AuditEvent.event == "test.hook")
                                .order_by(AuditEvent.id)))
        assert s.scalar(select(func.count()).select_from(Message)) == 3
    # The failing hook's write is gone, the others' committed with their message.
    assert hooked == [results[0].message_id, results[2].message_id]
    assert len(stored_blobs(store)) == 3
    assert chain_is_valid(store) >= 5
