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
with the same results. Nothing here does I/O or cryptography.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
from datetime import date
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

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


def parse_header(head: bytes) -> email.message.Message:
    return email.message_from_bytes(head, policy=email.policy.compat32)


def decoded(value: str) -> str:
    """An RFC 2047 value decoded; the value as it is if it does not decode."""
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


def entry_of(msg: email.message.Message) -> bytes:
    """The plaintext of a search index entry: JSON ``[version, [values of
    each INDEXED field, decoded and case-folded], sent day ordinal | null]``."""
    values = [[decoded(str(v)).casefold() for v in msg.get_all(name) or []] for name in INDEXED]
    sent = sent_date(msg)
    doc: list[Any] = [ENTRY_VERSION, values, sent.toordinal() if sent is not None else None]
    # Lone surrogates (undecodable octets in a header) survive the round trip.
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


class Fields:
    """One message's search fields, read back from ``entry_of`` output."""

    __slots__ = ("_values", "_sent")

    def __init__(self, values: list[list[str]], sent: int | None) -> None:
        self._values = values
        self._sent = sent

    @classmethod
    def parse(cls, entry: bytes) -> Fields | None:
        """None if ``entry`` is not an entry of this version (rebuild it)."""
        try:
            doc = json.loads(entry.decode("utf-8", "surrogatepass"))
        except (ValueError, UnicodeError):
            return None
        if (not isinstance(doc, list) or len(doc) != 3 or doc[0] != ENTRY_VERSION
                or not isinstance(doc[1], list) or len(doc[1]) != len(INDEXED)):
            return None
        return cls(doc[1], doc[2])

    def has(self, name: str, needle: str) -> bool:
        """``header_has`` for an indexed field; ``needle`` as the client sent it."""
        values = self._values[_POS[name.lower()]]
        if not needle:
            return bool(values)
        folded = needle.casefold()
        return any(folded in v for v in values)

    @property
    def sent(self) -> date | None:
        return None if self._sent is None else date.fromordinal(self._sent)
