"""The DATA reader across reads: what fuzz/smtp_data.py found
(docs/hardening.md section 1), each with the input that crashed.

The reader takes a message in large reads, so its answer must not depend
on where a read ends. The unit tests run the real protocol object's reader
(``SubmissionProtocol._read_message``) over a real ``asyncio.StreamReader``
fed piece by piece, each piece read before the next is fed; the last test
shows the first bug over TLS against the real server.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from postvault.conf.schema import SmtpConfig
from postvault.smtpd.protocol import SubmissionProtocol

from .client import transaction
from .conftest import COLLEAGUE, MEMBER, Server


class _Registry:
    def admit(self, proto: Any) -> bool:
        return True

    def release(self, proto: Any) -> None:
        pass


def read(pieces: list[bytes], limit: int = 0) -> tuple[bytes | None, str | None, bytes]:
    """(content, refusal rule, bytes left for the command reader)."""

    async def run() -> tuple[bytes | None, str | None, bytes]:
        loop = asyncio.get_running_loop()
        proto = SubmissionProtocol(object(), registry=_Registry(), limits=SmtpConfig(),  # type: ignore[arg-type]
                                   implicit_tls=True, tls_context=None, hostname="mx.test",
                                   data_size_limit=limit, loop=loop)
        reader = asyncio.StreamReader(loop=loop)
        proto._reader = reader

        async def feed() -> None:
            for piece in pieces:
                reader.feed_data(piece)
                while reader._buffer and not task.done():  # type: ignore[attr-defined]
                    await asyncio.sleep(0)  # until the protocol has read it
            reader.feed_eof()

        task = asyncio.ensure_future(proto._read_message())
        await feed()
        content, refusal = await task
        if proto._timeout_handle is not None:
            proto._timeout_handle.cancel()
        return content, refusal[0] if refusal else None, bytes(reader._buffer)  # type: ignore[attr-defined]

    return asyncio.run(run())


def splits(stream: bytes) -> list[list[bytes]]:
    """The stream in one piece, and cut in two at every position."""
    return [[stream]] + [[stream[:i], stream[i:]] for i in range(1, len(stream))]


def test_a_lone_dot_then_crlf_ends_the_message() -> None:
    # fuzz/corpus/smtp_data/crash-dot-then-crlf: after a first read of ".",
    # the search for the end started at -1 (from the end of the buffer) and
    # never found the CR LF . CR LF: the client waited for a reply forever.
    assert read([b".", b"\r\n"]) == (b"", None, b"")
    assert read([b".", b"\r", b"\n", b"NOOP\r\n"]) == (b"", None, b"NOOP\r\n")


@pytest.mark.parametrize("stream", [b".\r\n", b"..\r\n.\r\n", b"a\r\n.\r\n", b"\r\n.\r\n"])
def test_the_end_is_found_wherever_the_reads_end(stream: bytes) -> None:
    want = read([stream])
    assert want[0] is not None
    for pieces in splits(stream + b"QUIT\r\n"):
        assert read(pieces) == (want[0], None, b"QUIT\r\n"), pieces


def test_a_message_of_exactly_the_limit_passes_however_it_is_read() -> None:
    # fuzz/corpus/smtp_data/crash-limit-straddling-end: a read ending in
    # "\r\n.\r" counted that CR as content, so an 8-octet message with an
    # 8-octet limit was refused as too big.
    stream = b"abcdef\r\n.\r\n"
    for pieces in splits(stream):
        assert read(pieces, limit=8) == (b"abcdef\r\n", None, b""), pieces
    # Stuffed dots do not count either (RFC 5321 section 4.5.2).
    for pieces in splits(b"..\r\n..\r\n.\r\n"):
        assert read(pieces, limit=6) == (b".\r\n.\r\n", None, b""), pieces


def test_one_octet_over_the_limit_is_refused_however_it_is_read() -> None:
    for pieces in splits(b"abcdefg\r\n.\r\nNOOP\r\n"):
        assert read(pieces, limit=8) == (None, "data.too-big", b"NOOP\r\n"), pieces


def test_size_is_refused_before_a_bare_line_break_however_it_is_read() -> None:
    # fuzz/corpus/smtp_data/crash-size-before-bare-lf: over the limit with a
    # bare LF, read at once, was refused for the LF; the same bytes in
    # several reads were refused as too big. Now always too big (552).
    stream = b"ab\ncdefghij\r\n.\r\n"
    for pieces in splits(stream):
        assert read(pieces, limit=8) == (None, "data.too-big", b""), pieces
    for pieces in splits(b"ab\ncd\r\n.\r\n"):
        assert read(pieces, limit=8) == (None, "data.bare-line-break", b""), pieces


def test_a_lone_dot_read_over_tls_gets_its_reply(server: Server) -> None:
    """The first bug against the real server: "." and its CR LF in two TLS
    records. Before the fix the server never answered (the client's
    timeout ended the wait); now the empty message is refused for its
    missing From header."""
    c = server.session(MEMBER)
    code, _ = c.cmd(f"MAIL FROM:<{MEMBER}>")
    assert code == 250
    assert c.cmd(f"RCPT TO:<{COLLEAGUE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b".")
    time.sleep(0.5)  # the server reads "." alone
    c.send(b"\r\n")
    code, lines = c.reply(timeout=10)
    assert code == 553 and "no From header" in lines[0], lines
    # And the session is in step: a whole transaction still works.
    assert transaction(c, [COLLEAGUE], b".\r\n", sender=MEMBER)[0] == 553
    c.close()
