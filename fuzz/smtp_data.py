"""Fuzz harness: the SMTP DATA reader (``SubmissionProtocol._read_message``).

The reader takes the message in large chunks rather than line by line, so
everything that depends on where a chunk ends is where it can go wrong:
an end of data, a stuffed dot, a CR LF or a line split across two reads.
The harness runs the real protocol object's reader over a stream handed
out in fuzzer-chosen pieces (a stand-in for asyncio's ``StreamReader``
with the same ``read`` and ``_buffer``), and compares what it decides with
a plain reference that looks at the whole stream at once:

- the message ends at the first CR LF . CR LF, counting the CR LF of the
  DATA line (RFC 5321 section 4.1.1.4) and at no other "end" (the SMTP
  smuggling variants ``\\n.\\n``, ``\\r.\\r\\n``, ...); the bytes after
  it go back to the command reader unchanged (RFC 2920 pipelining);
- the content is the data up to there, dot-unstuffed (RFC 5321 section
  4.5.2), byte for byte;
- refusals, in this order: over the size limit (the unstuffed size, exactly:
  a message of the limit's size passes whatever the chunking), a line
  longer than the line limit (its length counts everything before the LF),
  a bare CR or LF anywhere (RFC 5321 section 2.3.8);
- no end before the client hangs up: nothing is delivered; past the size
  limit by more than ``DISCARD_BEYOND`` without an end: the connection is
  closed, and only then.

Input: byte 0 picks the size limit, byte 1 the line limit, bytes 2-3 the
chunking (a seed and the largest piece); the rest is what the client sends
after ``DATA``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import asyncio
import dataclasses
import random
from typing import Any

from fuzz._common import check, fuzzing, instrumented, main, patched, quiet

with instrumented(fuzzing(__name__), ["postvault.smtpd.protocol"]):
    from postvault.conf.schema import SmtpConfig
    from postvault.smtpd import protocol

LIMITS = (0, 1, 2, 3, 4, 5, 8, 16, 64, 256)
LINE_LIMITS = (1, 2, 3, 4, 8, 16, 80, 1000)
# Small, so that the "never ends" path is reachable with small inputs.
DISCARD_BEYOND = 32
END = b"\r\n.\r\n"


class ChunkReader:
    """Hands out ``data`` in the given piece sizes; ``_buffer`` holds what
    is not read yet, as in asyncio's StreamReader (the protocol gives back
    pipelined bytes by inserting them at its front)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._buffer = bytearray(data)
        self._sizes = sizes
        self.consumed = 0

    async def read(self, n: int) -> bytes:
        if not self._buffer:
            return b""
        size = self._sizes.pop() if self._sizes else len(self._buffer)
        size = max(1, min(n, size, len(self._buffer)))
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.consumed += size
        return out


class Probe(protocol.SubmissionProtocol):
    """The real protocol class; ``close_with`` only records (no transport)."""

    closed_with: str | None = None

    def close_with(self, reply: str) -> None:
        self.closed_with = reply


_LOOP = asyncio.new_event_loop()


class _Registry:
    def admit(self, proto: Any) -> bool:
        return True

    def release(self, proto: Any) -> None:
        pass


def _probe(limit: int, max_line: int) -> Probe:
    limits = dataclasses.replace(SmtpConfig(), max_line_length=max_line)
    return Probe(object(), registry=_Registry(), limits=limits, implicit_tls=True,  # type: ignore[arg-type]
                 tls_context=None, hostname="mx.fuzz.test", data_size_limit=limit, loop=_LOOP)


def _longest_line(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\n"))


def reference(stream: bytes, limit: int, max_line: int) -> tuple[str, Any, bytes]:
    """What the reader must decide, from the whole stream at once:
    ("ok", content, rest), ("refused", rule, rest) or ("no-end", None, b"")."""
    full = b"\r\n" + stream
    end = full.find(END)
    if end < 0:
        return "no-end", None, b""
    kept = full[: end + 2]
    rest = full[end + 5:]
    body = kept.replace(b"\r\n.", b"\r\n")[2:]
    if limit and len(body) > limit:
        return "refused", "data.too-big", rest
    if _longest_line(stream[: end + 3]) > max_line:
        return "refused", "data.line-too-long", rest
    crlf = kept.count(b"\r\n")
    if kept.count(b"\r") != crlf or kept.count(b"\n") != crlf:
        return "refused", "data.bare-line-break", rest
    return "ok", body, rest


def _sizes(seed: int, largest: int, total: int) -> list[int]:
    rng = random.Random(seed)
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(rng.randint(1, max(1, largest)))
    sizes.reverse()  # ChunkReader pops from the end
    return sizes


def one_input(data: bytes) -> None:
    """Run the DATA reader over one chunked stream; compare with ``reference``."""
    if len(data) < 4:
        return
    limit = LIMITS[data[0] % len(LIMITS)]
    max_line = LINE_LIMITS[data[1] % len(LINE_LIMITS)]
    stream = data[4:]
    reader = ChunkReader(stream, _sizes(data[2], data[3], len(stream)))
    probe = _probe(limit, max_line)
    probe._reader = reader  # type: ignore[assignment]
    try:
        with patched(protocol, "DISCARD_BEYOND", DISCARD_BEYOND):
            content, refusal = _LOOP.run_until_complete(probe._read_message())
    finally:
        if probe._timeout_handle is not None:
            probe._timeout_handle.cancel()
    want, value, rest = reference(stream, limit, max_line)
    if probe.closed_with is not None:
        # Only a stream past the limit by DISCARD_BEYOND, with no end yet.
        seen = stream[: reader.consumed]
        ended = (b"\r\n" + seen).find(END) >= 0
        over = reference(seen + END, limit, 10**9)[1] == "data.too-big"
        check(limit and over and not ended and reader.consumed > limit + DISCARD_BEYOND,
              f"closed after {reader.consumed} octets (limit {limit}; ended: {ended}, over: {over})")
        check(content is None and refusal is None, "closed, yet a result was returned")
        return
    got_rest = bytes(reader._buffer)
    if want == "no-end":
        check(content is None and refusal is None, "a message was taken from a stream that never ended")
        return
    if content is None and refusal is None:
        raise AssertionError(f"the end of data was missed (expected {want} {value if want != 'ok' else ''})")
    if want == "ok":
        check(refusal is None, f"refused ({refusal[0] if refusal else ''}) a message the reference accepts")
        check(content == value, "the content differs from the unstuffed data")
    else:
        check(refusal is not None and refusal[0] == value,
              f"expected refusal {value}, got {refusal[0] if refusal else 'acceptance'}")
    check(got_rest == rest, "the bytes after the end of data were not given back unchanged")


if __name__ == "__main__":
    quiet("postvault")  # "oversize message never ended; closing"
    main(one_input)
