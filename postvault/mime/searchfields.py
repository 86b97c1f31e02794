"""The header fields IMAP SEARCH matches on, and how they are decoded.

One place for the header semantics of SEARCH (RFC 3501 §6.4.4), shared by
the matcher (``postvault.imapd.search``) and the store, which keeps these
fields per message in a sealed search index (``Store.search_fields``) so
that a header search need not decrypt every message:

- ``read_header`` takes the header block from a plaintext reader (at most
  ``HEADER_LIMIT`` octets), ``parse_header`` parses it (compat32, as
  before: folded and encoded values are kept as they came);
- a field matches when the search string, case-folded, is a substring of
  one of its values after RFC 2047 decoding, case-folded (``decoded``);
  an empty string matches any message that has the field;
- the sent date is the Date field's day, as written (no zone shift).

``entry_of`` turns a parsed header into the compact, versioned plaintext
of an index entry; ``Fields`` reads it back and answers the same questions
with the same results, on the entry's octets (no decoding per search).
Nothing here does I/O or cryptography.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import struct
from datetime import date
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from typing import Protocol

HEADER_LIMIT = 256 * 1024
# The fields an index entry holds, in entry order (lower case). SEARCH
# FROM, TO, CC, BCC, SUBJECT and HEADER with one of these names use it;
# HEADER with any other name decrypts the message's header.
INDEXED = ("from", "to", "cc", "bcc", "subject", "message-id")
_POS = {name: i for i, name in enumerate(INDEXED)}
ENTRY_VERSION = 1


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def read_header(reader: _Reader) -> bytes:
    """The header block (through the blank line), at most ``HEADER_LIMIT``
    octets and a little more; the caller closes ``reader``."""
    head = b""
    while len(head) < HEADER_LIMIT:
        chunk = reader.read(16384)
        if not chunk:
            break
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[: end + 4]
    return head


_HEADERS_ONLY = BytesHeaderParser(policy=email.policy.compat32)


def parse_header(head: bytes) -> email.message.Message:
    """The header block parsed (compat32). Headers only: the fields are
    parsed exactly as ``email.message_from_bytes`` parses them, but the
    (empty) body is not taken for a MIME body, which for a multipart
    message compiled a regular expression per message (three times the
    cost of the whole parse)."""
    return _HEADERS_ONLY.parsebytes(head)


def decoded(value: str) -> str:
    """An RFC 2047 value decoded; the value as it is if it does not decode."""
    if value.isascii() and "=?" not in value:
        # No encoded word: decode_header gives the value back as one chunk,
        # which make_header returns unchanged (the common case, made cheap
        # for filling the search index).
        return value
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def header_has(msg: email.message.Message, name: str, needle: str) -> bool:
    values = msg.get_all(name) or []
    if not needle:
        return bool(values)  # RFC 3501: HEADER name "" matches any message with the field
    return any(needle.casefold() in decoded(str(v)).casefold() for v in values)


def sent_date(msg: email.message.Message) -> date | None:
    value = msg.get("Date")
    if not value:
        return None
    try:
        return parsedate_to_datetime(str(value)).date()
    except (TypeError, ValueError, IndexError):
        return None


def indexed(name: str) -> bool:
    """Whether an index entry answers a search of header field ``name``."""
    return name.lower() in _POS


def position(name: str) -> int:
    """The entry position of an indexed field (``indexed(name)`` is true)."""
    return _POS[name.lower()]


def needle_of(needle: str) -> bytes:
    """A search string as ``Fields.contains`` takes it: case-folded, UTF-8."""
    return needle.casefold().encode("utf-8", "surrogatepass")


# Entry layout: version, the number of values of each INDEXED field, the
# octet length of each field's segment, the sent day's ordinal (0: none);
# then the segments. A segment is the field's values, decoded and
# case-folded, joined by NUL, in UTF-8 (lone surrogates kept): a search is
# a substring test on octets, no decoding. UTF-8 is self-synchronizing, so
# octet and character substrings agree, and a needle without NUL never
# matches across two values (IMAP strings carry no NUL; search.py sends a
# needle with one to the header path).
_HEAD = struct.Struct(f">B{len(INDEXED)}I{len(INDEXED)}II")
_N = len(INDEXED)


def entry_of(msg: email.message.Message) -> bytes:
    """The plaintext of a search index entry (see the layout above)."""
    segments = []
    counts = []
    for name in INDEXED:
        values = [decoded(str(v)).casefold() for v in msg.get_all(name) or []]
        counts.append(len(values))
        segments.append("\0".join(values).encode("utf-8", "surrogatepass"))
    sent = sent_date(msg)
    head = _HEAD.pack(ENTRY_VERSION, *counts, *(len(s) for s in segments), sent.toordinal() if sent else 0)
    return head + b"".join(segments)


class Fields:
    """One message's search fields, read back from ``entry_of`` output."""

    __slots__ = ("_data", "_head")

    def __init__(self, data: bytes, head: tuple[int, ...]) -> None:
        self._data = data
        self._head = head

    @classmethod
    def parse(cls, entry: bytes) -> Fields | None:
        """None if ``entry`` is not an entry of this version (rebuild it)."""
        if len(entry) < _HEAD.size or entry[0] != ENTRY_VERSION:
            return None
        head = _HEAD.unpack_from(entry)
        if _HEAD.size + sum(head[1 + _N:1 + 2 * _N]) != len(entry):
            return None
        return cls(entry, head)

    def contains(self, i: int, needle: bytes) -> bool:
        """Whether field ``i`` (``position``) has a value containing
        ``needle`` (``needle_of``; empty: whether the field is there)."""
        head = self._head
        if not needle:
            return head[1 + i] > 0
        start = _HEAD.size + sum(head[1 + _N:1 + _N + i])
        return needle in self._data[start:start + head[1 + _N + i]]

    def has(self, name: str, needle: str) -> bool:
        """``header_has`` for an indexed field; ``needle`` as the client sent it."""
        return self.contains(position(name), needle_of(needle))

    @property
    def sent(self) -> date | None:
        day = self._head[-1]
        return date.fromordinal(day) if day else None
