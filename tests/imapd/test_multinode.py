"""Two ``postvault serve`` nodes on one PostgreSQL database act as one
server (issue 9 item 2): what one node commits, IMAP sessions on the other
hear at once (LISTEN/NOTIFY, ``store/pgnotify.py``), and login limits and a
password change hold on both.

Two real server processes on distinct ports over one home folder, the
store a database of the throwaway cluster (``tests/pgcluster.py``), in
every run whatever ``--db`` says. IDLE's poll of the database is set to an
hour on both nodes, so an update that arrives at all within these tests'
waits came from a notice, not from polling.
"""

from __future__ import annotations

import imaplib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from postvault.store.api import Store
from postvault.store.notify import Change
from postvault.store.pgnotify import CHANNEL, encode
from tests.pgcluster import Cluster
from tests.support import free_port, set_policy
from tests.web.conftest import Client as WebClient

from .client import Client
from .conftest import HOST, PASSWORD, Server, start_server, stop_server
from .test_imaplib import imaps, raw_session, read_until, send

NEW_PASSWORD = "a quite different passphrase 42"
# Generous waits for a loaded machine; the wake-up itself is timed below.
WAIT = 15.0


class Nodes:
    def __init__(self, a: Server, b: Server, https: list[int]) -> None:
        self.a, self.b, self.https = a, b, https


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, pg_cluster: Cluster) -> Iterator[Nodes]:
    home = tmp_path_factory.mktemp("nodes") / "home"
    init_home(home, HOST, {"store.url": pg_cluster.new_database(), "store.blobs": "database",
                           "store.kdf_iterations": 1})
    # Limits small enough to reach quickly: the third failure locks, none
    # is delayed before it, and the client address (every test's) is not
    # throttled.
    set_policy(home, throttle_after=3, lockout_after=3, ip_throttle_after=1000)
    store = open_store(load_config(home))
    https = [free_port(), free_port()]
    started: list[Server] = []
    try:
        for port in https:
            proc, ports, log = start_server(home, {"POSTVAULT_IMAP_IDLE_POLL_SECONDS": "3600",
                                                   "POSTVAULT_LISTEN_HTTPS": f"127.0.0.1:{port}"})
            started.append(Server(home, ports["imaps"], ports["imap"], ports["submissions"], ports["submission"],
                                  store, proc, log))
        yield Nodes(started[0], started[1], https)
    finally:
        for server in started:
            stop_server(server.proc)
        store.close()
    for server in started:
        # A clean SIGTERM: the node stopped its notice threads and exited 0.
        assert server.proc.returncode == 0, server.log.read_text()


def idle(server: Server, user: str) -> Client:
    c = raw_session(server, user)
    assert c.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
    c.send(b"i IDLE\r\n")
    assert c.response() == b"+ idling"
    return c


def test_mail_flags_and_expunge_on_node_a_show_in_idle_on_node_b(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    member = a.account("member")
    watcher = idle(b, member)

    # Submitted on A (SMTP, filed on A's writer thread): B's idler wakes.
    office = a.account("member")
    send(a, office, member, subject="Referral")
    acked = time.monotonic()
    lines = read_until(watcher, b"* 1 EXISTS", WAIT)
    waited = time.monotonic() - acked
    assert b"* 1 EXISTS" in lines[-1], lines
    # Issue 9: within one second (the poll is an hour away).
    assert waited < 1.0, waited

    actor = imaps(a, member)
    actor.select("INBOX")
    actor.store("1", "+FLAGS", "(\\Flagged)")
    line = read_until(watcher, b"FETCH", WAIT)[-1]
    assert re.match(rb"\* 1 FETCH \(UID \d+ FLAGS \(.*\\Flagged.*\)\)", line), line

    send(a, office, member, subject="Second")
    assert b"* 2 EXISTS" in read_until(watcher, b"* 2 EXISTS", WAIT)[-1]
    actor.store("1", "+FLAGS", "(\\Deleted)")
    actor.expunge()
    assert read_until(watcher, b"EXPUNGE", WAIT)[-1] == b"* 1 EXPUNGE"
    actor.logout()

    watcher.send(b"DONE\r\n")
    assert watcher.response().startswith(b"i OK")
    # B's view agrees with the database: one message left, the second.
    lines = watcher.command("f", "FETCH 1:* (FLAGS)")
    # (\Recent is this node's: B's session claimed it, A's may have too.)
    assert lines[-1].startswith(b"f OK") and [line for line in lines if line.startswith(b"* ")] == [
        b"* 1 FETCH (FLAGS (\\Recent))"], lines


def test_a_resync_notice_makes_node_b_re_read_the_mailbox(nodes: Nodes) -> None:
    # What a change too big for a notice (tests/store/test_pgnotify.py)
    # or a listener that reconnected sends: "re-read this mailbox".
    a, b = nodes.a, nodes.b
    member = a.account("member")
    for n in range(3):
        a.store.deliver(f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode(), a.sender, [member])
    watcher = idle(b, member)
    # A process that announces nothing (a plain in-process bus) removes
    # the second message ...
    quiet = Store(a.store.engine, a.store.blobs, a.store.kdf)
    session = quiet.login(member, PASSWORD)
    quiet.set_flags(session, "INBOX", [2], ["\\Deleted"], "add")
    assert quiet.expunge(session, "INBOX") == [2]
    # ... which B does not hear of (its poll is an hour away) ...
    watcher.sock.settimeout(1.0)
    with pytest.raises((socket.timeout, TimeoutError)):
        watcher.response()
    # ... until a resync notice for the mailbox comes.
    with a.store.engine.begin() as conn:
        conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                     {"channel": CHANNEL, "payload": encode("elsewhere", Change(session.account_id, "INBOX", "resync", ()))})
    assert read_until(watcher, b"EXPUNGE", WAIT)[-1] == b"* 2 EXPUNGE"
    watcher.send(b"DONE\r\n")
    assert watcher.response().startswith(b"i OK")
    assert watcher.command("n", "UID SEARCH ALL")[0] == b"* SEARCH 1 3"


def test_failed_logins_on_both_nodes_lock_the_account_on_both(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    member = a.account("member")
    # B logged this account in a moment ago: its login cache holds it.
    imaps(b, member).logout()

    def login(server: Server, password: str) -> tuple[str, bytes]:
        client = imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=server.context(), timeout=30)
        try:
            typ, data = client.login(member, password)
            client.logout()
            return typ, data[0]
        except imaplib.IMAP4.error as exc:
            return "NO", str(exc).encode()
        finally:
            client.shutdown()

    # Three failures, split between the nodes: the count is the database's.
    assert login(a, "wrong one")[0] == "NO"
    assert login(b, "wrong two")[0] == "NO"
    assert login(a, "wrong three")[0] == "NO"
    for server in (b, a):
        typ, text = login(server, PASSWORD)
        assert typ == "NO" and b"UNAVAILABLE" in text, text


def test_a_password_change_on_node_a_ends_imap_and_web_sessions_on_node_b(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    member = a.account("member")
    watcher = idle(b, member)
    browser_on_b = WebClient(nodes.https[1], b.context())
    browser_on_b.login(member, PASSWORD)
    assert browser_on_b.get("/account").status == 200
    web = WebClient(nodes.https[0], a.context())
    web.login(member, PASSWORD)
    done = web.submit("/password", "/password", {"old": PASSWORD, "new": NEW_PASSWORD, "new2": NEW_PASSWORD})
    assert done.status == 303, done.text
    assert web.get("/account").status == 200  # the browser that changed it stays in
    assert b"BYE" in read_until(watcher, b"BYE", WAIT)[-1]
    # The web session on B ended too (B heard the same notice as its IMAP
    # session, which has just said BYE, so this is no race).
    assert browser_on_b.get("/account").status == 303
    # B's login cache knew the old password: it no longer opens the account there.
    with pytest.raises(imaplib.IMAP4.error):
        imaps(b, member)
    client = imaplib.IMAP4_SSL("127.0.0.1", b.imaps, ssl_context=b.context(), timeout=30)
    assert client.login(member, NEW_PASSWORD)[0] == "OK"
    client.logout()


def test_both_nodes_share_one_home_and_one_database(nodes: Nodes) -> None:
    # Guards the premise of the tests above: two processes, two port sets.
    assert nodes.a.proc.pid != nodes.b.proc.pid and nodes.a.imaps != nodes.b.imaps
    assert Path(nodes.a.home) == Path(nodes.b.home)
