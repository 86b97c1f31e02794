"""FETCH of header sections through the sealed header cache, end to end:
Python's imaplib against the real server over TLS (store/headercache.py,
imapd/server.py ``_batch_data``).

Every header item form answers with the same bytes before the cache is
filled (read from the messages) and after (read from the entries, on a
connection that could not open a message if it tried), \\Seen and FLAGS
behave as before, a header above the cap is read from its message as
before, and the database holds no header text in plaintext."""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterator

import pytest

from tests.searchcorpus import CORPUS
from tests.support import copy_column, set_copy_column

from .conftest import PASSWORD, Server

# The FETCH tests run on SQLite, and on PostgreSQL with --db postgresql
# (tests/conftest.py); the one that reads the SQLite file, on SQLite only.
databases = pytest.mark.databases

# Messages whose headers are awkward for a byte-exact copy: the search
# corpus (encoded words, folding, 8-bit octets, repeated fields), bare LF
# line ends, a header with no body at all, an empty header, a long folded
# field, and a name that differs in case from the one asked for.
EXTRA = [
    b"From: lf@dental.test\nSubject: bare LF lines\nX-Folded: one\n  two\n\nbody\n",
    b"From: nobody@dental.test\r\nSubject: header only, no blank line",
    b"\r\nbody of a message with an empty header\r\n",
    b"FROM: upper@dental.test\r\nsubject: lower case name\r\nX-Long: " + b"w " * 3000 + b"\r\n\tend\r\n\r\nb\r\n",
]
MESSAGES = CORPUS + EXTRA
FIELDS = "(From Subject Date X-Folded Message-ID)"
FORMS = [
    f"BODY.PEEK[HEADER.FIELDS {FIELDS}]",
    "BODY.PEEK[HEADER.FIELDS (SUBJECT)]<2.9>",
    "BODY.PEEK[HEADER.FIELDS.NOT (Subject To)]",
    "BODY.PEEK[HEADER]",
    "BODY.PEEK[HEADER]<0.17>",
    "BODY.PEEK[HEADER]<40.100000>",
    "RFC822.HEADER",
    f"(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS {FIELDS}] RFC822.HEADER)",
    "BODY[HEADER.FIELDS (From)]",  # not PEEK: sets \\Seen, and FLAGS comes along
    "(BODY[HEADER] BODY.PEEK[HEADER.FIELDS.NOT (From)]<1.30>)",
]


def _imaps(server: Server, user: str) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=server.context(), timeout=30)
    client.login(user, PASSWORD)
    return client


@pytest.fixture
def filled(server: Server) -> Iterator[tuple[str, imaplib.IMAP4_SSL]]:
    member = server.account("member")
    for raw in MESSAGES:
        server.store.deliver(raw, server.sender, [member], save_sent=False)
    # A first session takes \Recent, so the two sessions compared below
    # both see the messages without it.
    first = _imaps(server, member)
    first.select("INBOX")
    first.logout()
    client = _imaps(server, member)
    client.select("INBOX")
    yield member, client
    client.logout()


def _fetch(client: imaplib.IMAP4_SSL, form: str, uids: str = "1:*") -> list[object]:
    """The untagged FETCH data of one UID FETCH, as imaplib parsed it:
    each response's text and literals, byte for byte."""
    typ, data = client.uid("FETCH", uids, form)
    assert typ == "OK", (form, data)
    return data


def _literals(data: list[object]) -> list[bytes]:
    return [item[1] for item in data if isinstance(item, tuple)]


def _unseen(client: imaplib.IMAP4_SSL) -> None:
    typ, _ = client.uid("STORE", "1:*", "-FLAGS.SILENT", "(\\Seen)")
    assert typ == "OK"


@databases
def test_every_header_form_answers_the_same_from_the_cache(server: Server,
                                                           filled: tuple[str, imaplib.IMAP4_SSL]) -> None:
    member, client = filled
    n = len(MESSAGES)
    whole = _fetch(client, "BODY.PEEK[]")
    stored = _literals(whole)
    assert len(stored) == n
    before: dict[str, list[object]] = {}
    for form in FORMS:
        set_copy_column(server.store, member, "INBOX", "sealed_header", None)  # each form read the long way
        _unseen(client)
        before[form] = _fetch(client, form)
        assert all(copy_column(server.store, member, "INBOX", "sealed_header").values())  # and its entries written
    # The plain header forms are the stored message's first octets.
    header = _literals(before["BODY.PEEK[HEADER]"])
    assert [raw[:len(h)] for raw, h in zip(stored, header)] == header
    assert all(h.endswith((b"\n\n", b"\n\r\n")) or h in (raw, b"\r\n") for h, raw in zip(header, stored))
    assert _literals(before[f"BODY.PEEK[HEADER.FIELDS {FIELDS}]"])[1].startswith(b"From: =?utf-8?q?Dr=2E_J=C3=BCrgen")
    # Every content key damaged: a new connection (no key cache) can open
    # no message, so what it answers comes from the entries.
    set_copy_column(server.store, member, "INBOX", "wrapped_key", bytes(92))
    other = _imaps(server, member)
    try:
        other.select("INBOX")
        typ, _ = other.uid("FETCH", "1", "BODY.PEEK[]")
        assert typ == "NO"
        for form in FORMS:
            _unseen(other)
            assert _fetch(other, form) == before[form], form
        # \\Seen was set by the forms without PEEK, and only by them.
        _unseen(other)
        _fetch(other, "BODY.PEEK[HEADER]")
        assert b"\\Seen" not in _fetch(other, "FLAGS")[0]  # type: ignore[operator]
        _fetch(other, "BODY[HEADER.FIELDS (From)]", "2")
        flags = _fetch(other, "FLAGS")
        assert [b"\\Seen" in line for line in flags] == [i == 1 for i in range(n)]  # type: ignore[operator]
    finally:
        other.logout()


@databases
def test_a_header_above_the_cap_is_read_from_its_message(server: Server) -> None:
    member = server.account("member")
    big = b"Subject: long\r\n" + b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"y" * 60) for i in range(1200)) + \
        b"\r\nbody\r\n"
    server.store.deliver(big, server.sender, [member], save_sent=False)
    server.store.deliver(CORPUS[0], server.sender, [member], save_sent=False)
    client = _imaps(server, member)
    try:
        client.select("INBOX")
        first = _fetch(client, "(BODY.PEEK[HEADER.FIELDS (Subject X-Filler-01000)] BODY.PEEK[HEADER])")
        assert first[0][1] == b"Subject: long\r\nX-Filler-01000: " + b"y" * 60 + b"\r\n\r\n"  # type: ignore[index]
        assert first[1][0] == b" BODY[HEADER] {%d}" % (len(big) - 6)  # type: ignore[index]
        entries = copy_column(server.store, member, "INBOX", "sealed_header")
        assert entries[1] is None and entries[2] is not None
        assert _fetch(client, "(BODY.PEEK[HEADER.FIELDS (Subject X-Filler-01000)] BODY.PEEK[HEADER])") == first
    finally:
        client.logout()


def test_the_database_holds_no_header_in_plaintext(server: Server, filled: tuple[str, imaplib.IMAP4_SSL]) -> None:
    member, client = filled
    subject = "Capybara Axolotl Referral 5582"
    raw = (f"From: office@dental.test\r\nTo: {member}\r\nSubject: {subject}\r\n"
           "X-Note: Pangolin Okapi consult\r\n\r\nbody\r\n").encode()
    server.store.deliver(raw, server.sender, [member], save_sent=False)
    uid = len(MESSAGES) + 1
    client.noop()  # the session learns of it
    got = _fetch(client, "BODY.PEEK[HEADER]", str(uid))
    assert subject.encode() in got[0][1]  # type: ignore[index]
    assert copy_column(server.store, member, "INBOX", "sealed_header")[uid]
    data = b"".join(p.read_bytes() for p in (server.home / "data").rglob("*") if p.is_file())
    assert data  # the SQLite file and its WAL are there to search
    for needle in (subject, "Capybara", "Pangolin Okapi"):
        assert needle.encode() not in data, needle
    assert re.search(rb"Referral 5582", data) is None


@databases
def test_a_window_of_large_headers_is_filled_in_parts(server: Server) -> None:
    # 80 headers of about 60 KiB: more than one batch's budget of headers
    # read for their entries (INLINE_BUDGET, 4 MiB), so the first FETCH
    # answers part of the window from what it read for the entries and the
    # rest the usual way, and a second FETCH fills the rest.
    member = server.account("member")
    raws = [b"Subject: large %02d\r\n" % i + b"".join(b"X-Pad-%04d: %s\r\n" % (k, b"p" * 50)
                                                    for k in range(1000)) + b"\r\nbody %02d\r\n" % i
            for i in range(80)]
    for raw in raws:
        server.store.deliver(raw, server.sender, [member], save_sent=False)
    client = _imaps(server, member)
    try:
        client.select("INBOX")
        form = "(BODY.PEEK[HEADER.FIELDS (Subject X-Pad-0999)] BODY.PEEK[HEADER]<100.20>)"
        want = [[b"Subject: large %02d\r\nX-Pad-0999: %s\r\n\r\n" % (i, b"p" * 50), raw[100:120]]
                for i, raw in enumerate(raws)]
        first = _literals(_fetch(client, form))
        assert [first[k:k + 2] for k in range(0, len(first), 2)] == want
        filled = sum(1 for e in copy_column(server.store, member, "INBOX", "sealed_header").values() if e)
        assert 40 < filled < 80
        second = _literals(_fetch(client, form))
        assert second == first
        assert all(copy_column(server.store, member, "INBOX", "sealed_header").values())
    finally:
        client.logout()
