"""Read and flag audits on the real server after issue 9's per-command work:
FETCH's ``message.read`` goes through the store's group-commit writer and
STORE's ``message.flags`` into the transaction that changes the flags; every
command is still audited once, and its event is committed before its tagged
OK (a reader of the database right after the OK finds it). A small FETCH
sends nothing of the message before its read is committed."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from sqlalchemy import select

from postvault.store.models import AuditEvent

from .conftest import PASSWORD, Server
from .test_imaplib import raw_session

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases

SESSIONS = 4
FETCHES = 8


def _events(server: Server, account: str, event: str) -> list[AuditEvent]:
    with server.store._sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.account == account, AuditEvent.event == event)
                              .order_by(AuditEvent.id)))


def test_concurrent_fetches_and_stores_are_each_audited_before_their_ok(server: Server) -> None:
    members = [server.account("member") for _ in range(SESSIONS)]
    pids: dict[str, dict[int, str]] = {}
    for m in members:
        for n in range(3):
            server.store.deliver(f"Subject: a{n}\r\n\r\nbody {n}\r\n".encode(), server.sender, [m])
        session = server.store.login(m, PASSWORD)
        pids[m] = {c.uid: c.message_id for c in server.store.snapshot(session, "INBOX").messages}
    # One login at a time (cold logins derive keys), then all at once.
    clients = [raw_session(server, m) for m in members]
    for c in clients:
        assert c.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
    failures: list[BaseException] = []
    start = threading.Barrier(SESSIONS)

    def work(i: int) -> None:
        c, m = clients[i], members[i]
        try:
            start.wait(30)
            for k in range(FETCHES):
                uid = 1 + (k + i) % 3
                lines = c.command(f"f{k}", f"UID FETCH {uid} BODY.PEEK[]")
                assert lines[-1].startswith(f"f{k} OK".encode()), lines[-1]
                assert f"body {uid - 1}".encode() in lines[0]
                # Committed before the OK: this read's event is there now.
                got = [e.message for e in _events(server, m, "message.read")]
                assert len(got) == k + 1 and got[-1] == pids[m][uid], got
            lines = c.command("st", "UID STORE 2 +FLAGS (\\Flagged)")
            assert lines[-1].startswith(b"st OK") and b"\\Flagged" in lines[0]
            flagged = _events(server, m, "message.flags")
            assert [e.message for e in flagged] == [pids[m][2]]
            assert flagged[0].detail.startswith("folder=INBOX mode=add") and flagged[0].protocol == "imap"
            lines = c.command("sm", "UID STORE 1:3 -FLAGS.SILENT (\\Flagged)")
            assert lines[-1].startswith(b"sm OK")
            many = _events(server, m, "message.flags")[-1]
            assert many.message is None and "count=3" in many.detail
            assert sorted(many.detail.split("messages=")[1].split(",")) == sorted(pids[m].values())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in clients:
        c.close()
    assert not any(t.is_alive() for t in threads)
    if failures:
        raise failures[0]
    for i, m in enumerate(members):
        reads = _events(server, m, "message.read")
        assert [e.message for e in reads] == [pids[m][1 + (k + i) % 3] for k in range(FETCHES)]
        assert all(e.actor == m and e.protocol == "imap" and e.client_ip == "127.0.0.1" for e in reads)
        session = server.store.login(m, PASSWORD)
        assert not any("\\Flagged" in c.flags for c in server.store.snapshot(session, "INBOX").messages)


def test_a_small_fetch_sends_nothing_before_its_read_is_committed(server: Server) -> None:
    member = server.account("member")
    server.store.deliver(b"Subject: held\r\n\r\nthe held body\r\n", server.sender, [member])
    c = raw_session(server, member)
    try:
        assert c.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
        # Hold the database's write lock from here (the server is another
        # process): the read's audit event can't commit until it is let go.
        engine = server.store.engine
        if engine.dialect.name == "sqlite":
            lock = sqlite3.connect(str(engine.url.database), isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
        else:
            lock = engine.raw_connection()
            lock.cursor().execute("LOCK TABLE audit_events IN EXCLUSIVE MODE")
        try:
            c.send(b"f UID FETCH 1 BODY.PEEK[]\r\n")
            c.sock.settimeout(1.5)
            try:
                early = c.sock.recv(65536)
            except TimeoutError:
                early = b""
            assert early == b"", "FETCH content went out before its audit event was committed"
        finally:
            lock.rollback()
            lock.close()
        c.sock.settimeout(15)
        lines = [c.response()]
        while not lines[-1].startswith(b"f "):
            lines.append(c.response())
        assert lines[-1].startswith(b"f OK") and b"the held body" in lines[0]
        assert len(_events(server, member, "message.read")) == 1
    finally:
        c.close()
