"""The change bus: every mutating store call announces its committed change
to the account's subscribers (what IMAP IDLE listens to)."""

from __future__ import annotations

import logging
import threading

import pytest

from postvault.store.api import Store
from postvault.store.notify import Change, ChangeBus
from tests.conftest import PASSWORD

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def raw(msgid: str = "<n1@dental.test>", subject: str = "Hello") -> bytes:
    return (f"From: office@dental.test\r\nTo: dr@ortho.test\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n\r\n"
            "body\r\n").encode()


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.lock = threading.Lock()

    def __call__(self, change: Change) -> None:
        with self.lock:
            self.changes.append(change)


# ---------------------------------------------------------------- the bus alone


def test_subscribe_publish_unsubscribe() -> None:
    bus = ChangeBus()
    a, b, other = Recorder(), Recorder(), Recorder()
    stop_a = bus.subscribe(1, a)
    bus.subscribe(1, b)
    bus.subscribe(2, other)
    change = Change(1, "INBOX", "exists", (3,))
    bus.publish(change)
    assert a.changes == [change] and b.changes == [change] and other.changes == []
    stop_a()
    stop_a()  # idempotent
    bus.publish(Change(1, "INBOX", "flags", (3,)))
    assert len(a.changes) == 1 and len(b.changes) == 2 and bus.subscribers(1) == 1


def test_the_in_process_bus_has_no_remote_changes_to_tell() -> None:
    bus = ChangeBus()
    watcher, local = Recorder(), Recorder()
    unwatch = bus.watch_remote(watcher)
    bus.subscribe(1, local)
    bus.publish(Change(1, "INBOX", "exists", (1,)))
    assert watcher.changes == [] and len(local.changes) == 1 and bus.accounts() == [1]
    # What another process made (pgnotify's listener calls this): both hear it.
    bus.deliver_remote(Change(1, "INBOX", "flags", (1,)))
    assert len(watcher.changes) == 1 and len(local.changes) == 2
    unwatch()
    bus.deliver_remote(Change(2, "INBOX", "flags", (1,)))
    assert len(watcher.changes) == 1


def test_a_failing_listener_is_logged_without_content_and_others_still_hear(caplog: pytest.LogCaptureFixture) -> None:
    bus = ChangeBus()
    heard = Recorder()

    def broken(change: Change) -> None:
        raise RuntimeError("Subject: Patient secret")

    bus.subscribe(1, broken)
    bus.subscribe(1, heard)
    with caplog.at_level(logging.WARNING, logger="postvault.store.notify"):
        bus.publish(Change(1, "INBOX", "exists", (1,)))
    assert len(heard.changes) == 1
    assert "RuntimeError" in caplog.text and "secret" not in caplog.text


def test_a_listener_may_unsubscribe_while_being_called() -> None:
    bus = ChangeBus()
    calls: list[Change] = []
    stop: list[object] = []

    def once(change: Change) -> None:
        calls.append(change)
        stop[0]()  # type: ignore[operator]

    stop.append(bus.subscribe(7, once))
    bus.publish(Change(7, "INBOX", "exists", (1,)))
    bus.publish(Change(7, "INBOX", "exists", (2,)))
    assert len(calls) == 1 and bus.subscribers(7) == 0


def test_concurrent_publishers_and_subscribers() -> None:
    bus = ChangeBus()
    rec = Recorder()
    bus.subscribe(1, rec)
    errors: list[BaseException] = []

    def publisher(n: int) -> None:
        try:
            for i in range(200):
                bus.publish(Change(1, "INBOX", "exists", (n * 1000 + i,)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def churn() -> None:
        for _ in range(200):
            bus.subscribe(1, lambda c: None)()

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(4)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(rec.changes) == 800 and bus.subscribers(1) == 1


# ---------------------------------------------------------------- the store


def test_every_mutation_publishes_after_commit(store: Store, people: dict[str, str]) -> None:
    member = store.login(people["member"], PASSWORD)
    colleague = store.login(people["colleague"], PASSWORD)
    mine, theirs = Recorder(), Recorder()
    seen_in_db: list[bool] = []

    def check_committed(change: Change) -> None:
        # Called after commit: the new message is already visible to a
        # fresh read (what an IDLE session will do on hearing this).
        if change.kind == "exists" and change.mailbox == "INBOX":
            uids = {m.uid for m in store.snapshot(colleague, "INBOX").messages}
            seen_in_db.append(set(change.uids) <= uids)

    store.bus.subscribe(member.account_id, mine)
    store.bus.subscribe(colleague.account_id, theirs)
    store.bus.subscribe(colleague.account_id, check_committed)

    store.deliver(raw(), people["member"], [people["colleague"]])
    assert theirs.changes == [Change(colleague.account_id, "INBOX", "exists", (1,))]
    assert mine.changes == [Change(member.account_id, "Sent", "exists", (1,))]
    assert seen_in_db == [True]

    theirs.changes.clear()
    store.append(colleague, "Drafts", raw("<d@x>"), ["\\Draft"])
    store.set_flags(colleague, "INBOX", [1], ["\\Seen"], "add")
    store.set_flags(colleague, "INBOX", [1], ["\\Seen"], "add")  # no change: nothing to announce
    store.copy(colleague, "INBOX", [1], "Trash")
    store.move(colleague, "Drafts", [1], "Trash")
    store.set_flags(colleague, "Trash", [1, 2], ["\\Deleted"], "add")
    store.expunge(colleague, "Trash", uids=[1])
    store.expunge(colleague, "INBOX")  # nothing flagged \Deleted: nothing to announce
    cid = colleague.account_id
    assert theirs.changes == [
        Change(cid, "Drafts", "exists", (1,)),
        Change(cid, "INBOX", "flags", (1,)),
        Change(cid, "Trash", "exists", (1,)),
        Change(cid, "Trash", "exists", (2,)),
        Change(cid, "Drafts", "expunge", (1,)),
        Change(cid, "Trash", "flags", (1, 2)),
        Change(cid, "Trash", "expunge", (1,)),
    ]
    assert len(mine.changes) == 1  # another account's changes are not ours


def test_delivery_to_many_announces_each_inbox(store: Store, people: dict[str, str]) -> None:
    heard = Recorder()
    accounts = store.accounts(people.values())
    for info in accounts.values():
        store.bus.subscribe(info.id, heard)
    store.deliver(raw(), people["member"], [people["colleague"], people["member2"]], save_sent=False)
    assert sorted((c.account_id, c.mailbox, c.uids) for c in heard.changes) == sorted([
        (accounts[people["colleague"]].id, "INBOX", (1,)),
        (accounts[people["member2"]].id, "INBOX", (1,)),
    ])


def test_nothing_is_announced_when_the_commit_fails(store: Store, people: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    heard = Recorder()
    store.bus.subscribe(store.get_account(people["colleague"]).id, heard)

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("database went away")

    # record_many: what every audit append (record, and delivery's batch) ends in.
    monkeypatch.setattr("postvault.store.audit.record_many", boom)
    with pytest.raises(RuntimeError):
        store.deliver(raw(), people["member"], [people["colleague"]])
    assert heard.changes == []


def test_a_failing_listener_does_not_fail_the_store_call(store: Store, people: dict[str, str]) -> None:
    colleague = store.login(people["colleague"], PASSWORD)

    def broken(change: Change) -> None:
        raise ValueError("listener bug")

    store.bus.subscribe(colleague.account_id, broken)
    assert store.append(colleague, "Drafts", raw()).uid == 1
    assert [m.uid for m in store.snapshot(colleague, "Drafts").messages] == [1]

    class BrokenBus(ChangeBus):
        def publish(self, change: Change) -> None:
            raise ConnectionError("NOTIFY failed")

    store.bus = BrokenBus()
    assert store.set_flags(colleague, "Drafts", [1], ["\\Seen"], "add") == {1: frozenset({"\\Seen"})}
