"""Header SEARCH through the sealed search index, end to end: the real
server over TLS, a real SQLite file (store/searchindex.py, imapd/search.py).

The answers are those of the old path (the header decrypted and matched
with ``searchfields.header_has``: tests/searchcorpus.py), the first search
fills the index and later ones use it instead of the messages, MOVE and
EXPUNGE take entries along or away, a swapped entry is not trusted, and the
database holds no plaintext of a subject."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.imapd.client import Client
from tests.imapd.conftest import PASSWORD, Server
from tests.searchcorpus import CORPUS, SEARCHES, expected
from tests.support import copy_column, set_copy_column


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    c = Client("127.0.0.1", server.imaps, server.context())
    c.response()  # greeting
    yield c
    c.close()


def login(c: Client, who: str, box: str = "INBOX") -> None:
    assert c.command("l", f'LOGIN {who} "{PASSWORD}"')[-1].startswith(b"l OK")
    assert c.command("s", f"SELECT {box}")[-1].startswith(b"s OK")


def search(c: Client, criteria: str, uid: bool = True) -> list[int]:
    """Non-ASCII strings go as LITERAL+ literals with CHARSET UTF-8."""
    raw = criteria.encode()
    if any(b > 127 for b in raw):
        parts = re.split(rb'"([^"]*)"', raw)
        out = b""
        for i, part in enumerate(parts):
            out += part if i % 2 == 0 else b"{%d+}\r\n" % len(part) + part
        raw = b"CHARSET UTF-8 " + out
    lines = c.command("q", (b"UID SEARCH " if uid else b"SEARCH ") + raw)
    assert lines[-1].startswith(b"q OK"), lines
    found = [line for line in lines if line.startswith(b"* SEARCH")]
    assert len(found) == 1, lines
    return [int(n) for n in found[0].split()[2:]]


def test_header_search_answers_as_before_and_reuses_the_index(server: Server, client: Client) -> None:
    member = server.account("member")
    for raw in CORPUS:
        server.store.deliver(raw, server.sender, [member], save_sent=False)
    login(client, member)
    assert set(copy_column(server.store, member, "INBOX", "sealed_search").values()) == {None}
    first = {text: search(client, text) for text, _ in SEARCHES}
    # The first search filled the index.
    assert all(copy_column(server.store, member, "INBOX", "sealed_search").values())
    # Every copy's key damaged: a search that decrypted messages would fail
    # now (on a new connection: this one's key cache still has the keys).
    for uid in range(1, len(CORPUS) + 1):
        set_copy_column(server.store, member, "INBOX", "wrapped_key", bytes(92), uid=uid)
    again = Client("127.0.0.1", server.imaps, server.context())
    try:
        again.response()
        login(again, member)
        # (Not a header section: the search's fill also wrote the header
        # cache, store/headercache.py, which answers those without the key.)
        assert b"NO" in again.command("f", "UID FETCH 1 BODY.PEEK[TEXT]")[-1]
        nonempty = 0
        for text, key in SEARCHES:
            want = expected(CORPUS, key)
            assert first[text] == want, text
            if key[0] == "HEADER" and key[1] in ("Date", "X-Nothing"):
                continue  # not an indexed field: the header is read (and now fails)
            assert search(again, text) == want, text
            assert search(again, text, uid=False) == want, text  # sequence numbers = UIDs here
            nonempty += bool(want)
        assert nonempty >= 20
    finally:
        again.close()


def test_expunge_and_move_take_entries_with_them(server: Server, client: Client) -> None:
    member = server.account("member")
    for raw in CORPUS[:4]:
        server.store.deliver(raw, server.sender, [member], save_sent=False)
    login(client, member)
    assert search(client, 'SUBJECT "x-ray"') == [1]
    entry = copy_column(server.store, member, "INBOX", "sealed_search")[1]
    assert entry is not None
    assert client.command("m", "UID MOVE 1 Trash")[-1].startswith(b"m OK")
    assert 1 not in copy_column(server.store, member, "INBOX", "sealed_search")
    assert list(copy_column(server.store, member, "Trash", "sealed_search").values()) == [entry]
    assert client.command("d", "UID STORE 2 +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"d OK")
    assert client.command("e", "EXPUNGE")[-1].startswith(b"e OK")
    assert sorted(copy_column(server.store, member, "INBOX", "sealed_search")) == [3, 4]
    # In Trash, the moved entry answers without the message (a new
    # connection: this one's key cache could still open it).
    set_copy_column(server.store, member, "Trash", "wrapped_key", bytes(92), uid=1)
    other = Client("127.0.0.1", server.imaps, server.context())
    try:
        other.response()
        login(other, member, "Trash")
        assert search(other, 'SUBJECT "x-ray"') == [1]
        assert search(other, 'FROM "office"') == [1]
    finally:
        other.close()


def test_a_swapped_entry_is_not_trusted(server: Server, client: Client) -> None:
    member = server.account("member")
    server.store.deliver(CORPUS[0], server.sender, [member], save_sent=False)  # "Referral for X-ray"
    server.store.deliver(CORPUS[7], server.sender, [member], save_sent=False)  # "... PANORAMIC review"
    login(client, member)
    assert search(client, 'SUBJECT "x-ray"') == [1]
    entries = copy_column(server.store, member, "INBOX", "sealed_search")
    # Message 1's entry in message 2's row.
    set_copy_column(server.store, member, "INBOX", "sealed_search", entries[1], uid=2)
    assert search(client, 'SUBJECT "x-ray"') == [1]
    assert search(client, 'SUBJECT "panoramic"') == [2]
    # Re-sealed from the message.
    assert copy_column(server.store, member, "INBOX", "sealed_search")[2] not in (entries[1], None)


def test_another_account_cannot_use_an_entry(server: Server, client: Client) -> None:
    one, two = server.account("member"), server.account("member")
    server.store.deliver(CORPUS[7], server.sender, [one], save_sent=False)  # "... PANORAMIC review"
    server.store.deliver(CORPUS[0], server.sender, [two], save_sent=False)  # "Referral for X-ray"
    login(client, one)
    assert search(client, 'SUBJECT "panoramic"') == [1]
    # Account one's entry planted in account two's row.
    planted = copy_column(server.store, one, "INBOX", "sealed_search")[1]
    set_copy_column(server.store, two, "INBOX", "sealed_search", planted, uid=1)
    other = Client("127.0.0.1", server.imaps, server.context())
    try:
        other.response()
        login(other, two)
        assert search(other, 'SUBJECT "panoramic"') == []
        assert search(other, 'SUBJECT "x-ray"') == [1]
    finally:
        other.close()


def test_the_database_holds_no_subject_in_plaintext(server: Server, client: Client) -> None:
    member = server.account("member")
    subject = "Zebrafish Quokka Referral 4471"
    raw = (f"From: office@dental.test\r\nTo: {member}\r\nSubject: {subject}\r\n"
           "Cc: Marmoset Wombat <mw@clinic.test>\r\n\r\nbody\r\n").encode()
    server.store.deliver(raw, server.sender, [member], save_sent=False)
    login(client, member)
    assert search(client, 'SUBJECT "quokka"') == [1]
    assert search(client, 'CC "wombat"') == [1]
    assert copy_column(server.store, member, "INBOX", "sealed_search")[1]
    data = b"".join(p.read_bytes() for p in (server.home / "data").rglob("*") if p.is_file())
    assert data  # the SQLite file and its WAL are there to search
    for needle in (subject, subject.casefold(), "quokka", "marmoset wombat"):
        assert needle.encode() not in data, needle
