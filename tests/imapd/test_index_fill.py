"""The search index and header cache filled in the background after login
(imapd/indexfill.py), end to end: the real server over TLS, mail delivered
through the store as delivery does (no entries), the entries looked for in
the database.

The fill's own server runs with one message per round
(``[imap] index_round_messages = 1``), so a fill of a hundred messages
lasts long enough to see LOGOUT stop it; the shared ``server`` runs with
``index_on_login = false`` (conftest.py)."""

from __future__ import annotations

import imaplib
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import func, select

from postvault.store.db import sessions
from postvault.store.models import Mailbox, MessageCopy

from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from tests.imapd.conftest import HOST, PASSWORD, Server, _server, start_server, stop_server
from tests.support import cheap_home_env
from tests.searchcorpus import CORPUS, expected


@pytest.fixture(scope="module")
def fill_server(tmp_path_factory: pytest.TempPathFactory,
                store_overrides: Callable[[], dict[str, str]]) -> Iterator[Server]:
    yield from _server(tmp_path_factory, store_overrides, allow_user_folders=False,
                       extra_env={"POSTVAULT_IMAP_INDEX_ROUND_MESSAGES": "1"})


def _imaps(server: Server, user: str) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=server.context(), timeout=30)
    client.login(user, PASSWORD)
    return client


def _counts(server: Server, who: str) -> dict[str, tuple[int, int, int]]:
    """Per folder of ``who``: copies, copies with a search entry, copies
    with a header cache entry."""
    acct_id = server.store.accounts([who])[who].id
    with sessions(server.store.engine)() as s:
        rows = s.execute(
            select(Mailbox.name, func.count(MessageCopy.uid), func.count(MessageCopy.sealed_search),
                   func.count(MessageCopy.sealed_header))
            .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
            .where(Mailbox.account_id == acct_id).group_by(Mailbox.name)
        ).all()
    return {name: (n, search, header) for name, n, search, header in rows}


def _filled(server: Server, who: str) -> int:
    return sum(search for _, search, _ in _counts(server, who).values())


def _wait_for(done: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.1)
    return done()


def test_login_fills_every_folder_without_a_search(fill_server: Server) -> None:
    server = fill_server
    member, other = server.account("member"), server.account("member")
    for raw in CORPUS:
        server.store.deliver(raw, server.sender, [member], save_sent=False)
    for raw in CORPUS[:4]:
        server.store.deliver(raw, member, [other], save_sent=True)  # member's Sent
    assert _counts(server, member) == {"INBOX": (len(CORPUS), 0, 0), "Sent": (4, 0, 0)}
    client = _imaps(server, member)
    try:
        want = {"INBOX": (len(CORPUS),) * 3, "Sent": (4,) * 3}
        assert _wait_for(lambda: _counts(server, member) == want), _counts(server, member)
        client.select("INBOX")
        typ, data = client.uid("SEARCH", "SUBJECT", '"x-ray"')
        assert typ == "OK"
        assert [int(n) for n in data[0].split()] == expected(CORPUS, ("SUBJECT", "x-ray")) != []
    finally:
        client.logout()
    assert _counts(server, other) == {"INBOX": (4, 0, 0)}  # nobody logged in as other
    log = server.log.read_text("utf-8", "replace")
    assert "search index filled: account" in log
    assert "x-ray" not in log.lower() and member not in log


def test_no_fill_when_switched_off(server: Server) -> None:
    member = server.account("member")
    for raw in CORPUS[:3]:
        server.store.deliver(raw, server.sender, [member], save_sent=False)
    client = _imaps(server, member)
    try:
        client.select("INBOX")
        time.sleep(1.5)  # with the fill on, three messages take well under that
        assert _counts(server, member) == {"INBOX": (3, 0, 0)}
    finally:
        client.logout()


def test_logout_stops_the_fill(fill_server: Server) -> None:
    server = fill_server
    member = server.account("member")
    n = 150
    for i in range(n):
        server.store.deliver(CORPUS[i % len(CORPUS)], server.sender, [member], save_sent=False)
    client = _imaps(server, member)
    try:
        assert _wait_for(lambda: _filled(server, member) >= 3)
    finally:
        client.logout()
    time.sleep(0.5)  # the round that was running when the session ended
    stopped = _filled(server, member)
    time.sleep(1.5)  # at one message per round, many more rounds' time
    assert _filled(server, member) == stopped < n


def test_a_second_session_keeps_the_fill_going(fill_server: Server) -> None:
    server = fill_server
    member = server.account("member")
    n = 40
    for i in range(n):
        server.store.deliver(CORPUS[i % len(CORPUS)], server.sender, [member], save_sent=False)
    first, second = _imaps(server, member), _imaps(server, member)
    try:
        assert _wait_for(lambda: _filled(server, member) >= 3)
        first.logout()
        assert _wait_for(lambda: _filled(server, member) == n)
    finally:
        second.logout()


def test_shutdown_does_not_wait_for_the_fill(tmp_path_factory: pytest.TempPathFactory,
                                             store_overrides: Callable[[], dict[str, str]]) -> None:
    home = tmp_path_factory.mktemp("fill-stop") / "home"
    with cheap_home_env():
        init_home(home, HOST, store_overrides())
        store = open_store(load_config(home))
    proc, ports, log = start_server(home, {"POSTVAULT_IMAP_INDEX_ROUND_MESSAGES": "1"})
    try:
        server = Server(home, ports["imaps"], ports["imap"], ports["submissions"], ports["submission"], store,
                        proc, log)
        member = server.account("member")
        for i in range(100):
            store.deliver(CORPUS[i % len(CORPUS)], server.sender, [member], save_sent=False)
        client = _imaps(server, member)
        assert _wait_for(lambda: _filled(server, member) >= 3)
        proc.send_signal(signal.SIGTERM)  # the session still logged in, the fill running
        assert proc.wait(15) == 0  # BYE to the idle session, the fill's round, then out
        assert _filled(server, member) < 100
        client.shutdown()
    finally:
        stop_server(proc)
        store.close()
