"""FETCH's shortcuts of issue 9 (IMAP per-command CPU) give the bytes the
long way gives: header sections answered from the header length alone, the
first group of small messages read with the metadata, a large message
opened from the row read with it, on the real server over TLS."""

from __future__ import annotations

import re

import pytest

from .conftest import Server
from .test_imaplib import raw_session

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def _literals(line: bytes) -> list[bytes]:
    """The literals of one response line as Client.response gives it: each
    ``{n}`` followed by its n octets, CR and LF written as \\r and \\n
    (the test messages hold no backslash)."""
    out = []
    pos = 0
    while (m := re.compile(rb"\{(\d+)\}").search(line, pos)) is not None:
        n, i, data = int(m[1]), m.end(), bytearray()
        while len(data) < n:
            two = line[i:i + 2]
            if two in (b"\\r", b"\\n"):
                data += b"\r" if two == b"\\r" else b"\n"
                i += 2
            else:
                data += line[i:i + 1]
                i += 1
        out.append(bytes(data))
        pos = i
    return out


def test_header_sections_and_large_messages_read_as_they_are_stored(server: Server) -> None:
    member = server.account("member")
    small = (b"Subject: small one\r\nFrom: a@x.test\r\nX-Other: skip me\r\n"
             b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\npart one\r\n"
             b"--b--\r\n")
    big = b"Subject: big one\r\nFrom: a@x.test\r\n\r\n" + b"".join(b"line %06d\r\n" % i for i in range(90000))
    for raw in (small, big, small):
        server.store.deliver(raw, server.sender, [member])
    c = raw_session(server, member)
    assert c.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
    stored = {}
    for uid in (1, 2, 3):
        lines = c.command("r", f"UID FETCH {uid} BODY.PEEK[]")
        stored[uid] = _literals(lines[0])[0]
    assert len(stored[2]) > 1024 * 1024  # above INLINE_MAX: streamed, not read in the small group

    # Header fields, header, text: from the header length alone.
    lines = c.command("h", "UID FETCH 1:3 (BODY.PEEK[HEADER.FIELDS (Subject From)] BODY.PEEK[TEXT] RFC822.HEADER)")
    assert lines[-1].startswith(b"h OK"), lines[-1]
    for line, uid in zip(lines[:3], (1, 2, 3)):
        fields, text, header = _literals(line)
        head_len = stored[uid].index(b"\r\n\r\n") + 4
        assert header == stored[uid][:head_len]
        assert text == stored[uid][head_len:]
        subject = b"small one" if uid != 2 else b"big one"
        assert fields == b"Subject: " + subject + b"\r\nFrom: a@x.test\r\n\r\n"
    # The same with an item that needs the whole structure (a part).
    lines = c.command("p", "UID FETCH 1 (BODY.PEEK[1] BODY.PEEK[HEADER.FIELDS (Subject)])")
    part, fields = _literals(lines[0])
    assert part == b"part one" and fields == b"Subject: small one\r\n\r\n"
    c.close()
