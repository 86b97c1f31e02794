"""The change bus between processes on PostgreSQL (``store/pgnotify.py``).

The payload rules run without a database; the rest runs two buses, each
with its own engine, on one database of the throwaway cluster
(``tests/pgcluster.py``, whatever ``--db`` says): what one publishes the
other delivers, never its own notices twice, a change too big to name
arrives as a resync, and a listener whose connection the server kills
comes back and tells its sessions to re-read everything.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from postvault.store.api import Store
from postvault.store.db import make_engine
from postvault.store.notify import Change, ChangeBus
from postvault.store.pgnotify import (
    PAYLOAD_LIMIT,
    PgChangeBus,
    decode,
    encode,
    encode_resync_all,
    parse_ranges,
    uid_ranges,
)
from tests.pgcluster import Cluster

WAIT = 10.0


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.cond = threading.Condition()

    def __call__(self, change: Change) -> None:
        with self.cond:
            self.changes.append(change)
            self.cond.notify_all()

    def wait_for(self, test: Callable[[Change], bool], timeout: float = WAIT) -> Change:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for c in self.changes:
                    if test(c):
                        return c
                left = deadline - time.monotonic()
                assert left > 0, f"not heard; got {self.changes}"
                self.cond.wait(left)


# ---------------------------------------------------------------- the payload


def test_uid_ranges_round_trip() -> None:
    assert uid_ranges([]) == ""
    assert uid_ranges([5, 1, 2, 3, 9, 10, 3]) == "1:3,5,9:10"
    assert parse_ranges("1:3,5,9:10") == (1, 2, 3, 5, 9, 10)
    with pytest.raises(ValueError):
        parse_ranges("9:1")
    with pytest.raises(ValueError):
        parse_ranges("0:3")


def test_payload_round_trip_carries_ids_and_uids_only() -> None:
    change = Change(7, "Clients/Ärzte", "flags", (1, 2, 3, 10))
    payload = encode("node1", change)
    assert json.loads(payload) == {"v": 1, "n": "node1", "a": 7, "k": "flags", "m": "Clients/Ärzte", "u": "1:3,10"}
    assert decode(payload) == ("node1", change)
    assert decode(encode("n", Change(7, "", "logout", ()))) == ("n", Change(7, "", "logout", ()))
    assert decode(encode_resync_all("n")) == ("n", None)


def test_a_change_too_big_for_a_notice_becomes_a_resync_of_its_mailbox() -> None:
    # Every other UID: no ranges to compress into.
    gappy = tuple(range(1, 40_000, 2))
    payload = encode("n", Change(3, "INBOX", "expunge", gappy))
    assert len(payload.encode()) <= PAYLOAD_LIMIT
    assert decode(payload) == ("n", Change(3, "INBOX", "resync", ()))
    # A long contiguous run still fits as a range ...
    assert decode(encode("n", Change(3, "INBOX", "expunge", tuple(range(1, 100_001)))))[1].uids[-1] == 100_000  # type: ignore[union-attr]
    # ... but a receiver does not spell out millions of UIDs: it re-reads.
    huge = encode("n", Change(3, "INBOX", "expunge", tuple(range(1, 2_000_001))))
    assert len(huge) < 100 and decode(huge) == ("n", Change(3, "INBOX", "resync", ()))
    # A mailbox name too long to carry: every mailbox of the account.
    assert decode(encode("n", Change(3, "x" * 9000, "exists", (1,)))) == ("n", Change(3, "", "resync", ()))


@pytest.mark.parametrize("bad", ['{"v": 2}', "[]", "not json", '{"v":1,"n":"x","a":1,"k":"drop","m":"","u":""}',
                                 '{"v":1,"n":"x","a":null,"k":"exists","m":"","u":""}',
                                 '{"v":1,"n":"x","a":"1","k":"exists","m":"","u":""}'])
def test_malformed_notices_are_refused(bad: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode(bad)


# ---------------------------------------------------------------- two buses, one database


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    return pg_cluster.new_database()


@pytest.fixture
def buses(pg_url: str) -> Iterator[Callable[[], PgChangeBus]]:
    made: list[PgChangeBus] = []

    def make() -> PgChangeBus:
        bus = PgChangeBus(make_engine(pg_url))
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.stop()
        bus.engine.dispose()


def test_a_change_on_one_node_reaches_the_other_once(buses: Callable[[], PgChangeBus]) -> None:
    a, b = buses(), buses()
    assert a.start() and b.start()
    on_a, on_b, other_account, remote_a, remote_b = Recorder(), Recorder(), Recorder(), Recorder(), Recorder()
    a.subscribe(1, on_a)
    b.subscribe(1, on_b)
    b.subscribe(2, other_account)
    a.watch_remote(remote_a)
    b.watch_remote(remote_b)
    for change in (Change(1, "INBOX", "exists", (4,)), Change(1, "INBOX", "flags", (1, 2, 3)),
                   Change(1, "Sent", "expunge", (9,)), Change(1, "", "logout", ())):
        a.publish(change)
        assert on_b.wait_for(lambda c, want=change: c == want) == change  # type: ignore[misc]
    # A heard each change once, from itself; its own notices came back to
    # its listener and were dropped.
    deadline = time.monotonic() + 1.0
    while a.received == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(on_a.changes) == 4 and a.received == 0
    assert b.received == 4 and other_account.changes == []
    # Watchers hear every account's changes, but only other processes'.
    assert remote_b.changes == on_b.changes and remote_a.changes == []


def test_a_burst_is_merged_and_a_huge_change_resyncs(buses: Callable[[], PgChangeBus]) -> None:
    a, b = buses(), buses()
    assert a.start() and b.start()
    heard = Recorder()
    b.subscribe(5, heard)
    for uid in range(1, 201):
        a.publish(Change(5, "INBOX", "exists", (uid,)))
    heard.wait_for(lambda c: c.kind == "exists" and 200 in c.uids)
    got = sorted(u for c in heard.changes for u in c.uids)
    assert got == list(range(1, 201))  # every UID, in however many notices
    a.publish(Change(5, "INBOX", "expunge", tuple(range(1, 40_000, 2))))
    assert heard.wait_for(lambda c: c.kind == "resync") == Change(5, "INBOX", "resync", ())


def test_a_process_that_never_started_its_threads_is_heard_too(buses: Callable[[], PgChangeBus]) -> None:
    # The CLI's store: publish sends at once through the engine.
    cli, node = buses(), buses()
    assert node.start()
    heard = Recorder()
    node.subscribe(3, heard)
    cli.publish(Change(3, "INBOX", "expunge", (2,)))
    assert heard.wait_for(lambda c: True) == Change(3, "INBOX", "expunge", (2,))


def test_a_killed_listen_connection_comes_back_and_everyone_resyncs(pg_url: str, buses: Callable[[], PgChangeBus]) -> None:
    a, b = buses(), buses()
    assert a.start() and b.start()
    heard = Recorder()
    b.subscribe(8, heard)
    admin = make_engine(pg_url)
    try:
        with admin.begin() as conn:
            killed = conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       "WHERE application_name = :name"),
                                  {"name": f"postvault-listen-{b.node}"}).scalars().all()
        assert killed == [True]
        # Back: the session is told to re-read every mailbox (what was sent
        # meanwhile is lost to it) ...
        assert heard.wait_for(lambda c: c.kind == "resync") == Change(8, "", "resync", ())
        assert b.reconnects == 1 and b.listening
        # ... and hears new changes again.
        a.publish(Change(8, "INBOX", "exists", (1,)))
        heard.wait_for(lambda c: c.kind == "exists")
    finally:
        admin.dispose()


def test_a_killed_send_connection_loses_nothing(pg_url: str, buses: Callable[[], PgChangeBus],
                                               caplog: pytest.LogCaptureFixture) -> None:
    a, b = buses(), buses()
    assert a.start() and b.start()
    heard = Recorder()
    b.subscribe(9, heard)
    a.publish(Change(9, "INBOX", "exists", (1,)))
    heard.wait_for(lambda c: c.uids == (1,))
    admin = make_engine(pg_url)
    try:
        with admin.begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name"),
                         {"name": f"postvault-send-{a.node}"})
    finally:
        admin.dispose()
    a.publish(Change(9, "INBOX", "exists", (2,)))
    heard.wait_for(lambda c: c.uids == (2,))
    # It went through the retry: the first try met the dead connection.
    assert "could not announce changes to other nodes (AdminShutdown); retrying" in caplog.text


def test_stop_is_prompt_and_later_changes_still_go_out(buses: Callable[[], PgChangeBus]) -> None:
    a, b = buses(), buses()
    assert a.start() and b.start()
    heard = Recorder()
    b.subscribe(4, heard)
    t = time.monotonic()
    a.stop()
    assert time.monotonic() - t < 5 and not a.listening
    a.publish(Change(4, "INBOX", "exists", (1,)))  # a draining node's change
    heard.wait_for(lambda c: c.uids == (1,))


def test_only_a_postgresql_store_gets_the_cross_process_bus(pg_url: str, tmp_path: Path) -> None:
    sqlite = Store.open(f"sqlite:///{tmp_path / 'one.db'}", tmp_path / "blobs")
    pg = Store.open(pg_url, "database")
    try:
        assert type(sqlite.bus) is ChangeBus
        assert isinstance(pg.bus, PgChangeBus) and not pg.bus.listening
    finally:
        sqlite.close()
        pg.close()
