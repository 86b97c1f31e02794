"""SEARCH (RFC 3501 §6.4.4) over one session's view and the sealed store.

Flags, dates, sizes, UIDs and sequence numbers come from the view; the
header keys (FROM, TO, CC, BCC, SUBJECT, HEADER, SENT*) decrypt only the
header chunks of a message; BODY and TEXT decrypt the whole message and
compare against the decoded text of its parts (RFC 2047 words and
base64/quoted-printable bodies are decoded first). Matching is
case-insensitive substring matching (RFC 3501: "case-insensitive").

Invariants:
- Runs on a worker thread, one message at a time: at most one decrypted
  message is held, and it is dropped before the next is opened.
- The cheap keys of an AND are tried before the content keys, so a search
  such as ``UNSEEN BODY x`` decrypts only unseen messages.
- Nothing decrypted leaves this module but the yes/no answer.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from typing import Any

from ..errors import MessageNotFound
from .parse import Key

_CONTENT = {"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO", "HEADER", "SENTBEFORE", "SENTON", "SENTSINCE"}
_HEADER_LIMIT = 256 * 1024


@dataclass
class Candidate:
    seq: int
    uid: int
    flags: frozenset[str]
    recent: bool
    # Read only when a key needs them (``uses_metadata``).
    size: int | None = None
    internal_date: datetime | None = None


class _Lazy:
    """The decrypted header block and decoded text of one message."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener
        self._header: email.message.Message | None = None
        self._text: str | None = None

    def header(self) -> email.message.Message:
        if self._header is None:
            reader = self._opener()
            try:
                head = b""
                while len(head) < _HEADER_LIMIT:
                    chunk = reader.read(16384)
                    if not chunk:
                        break
                    head += chunk
                    end = head.find(b"\r\n\r\n")
                    if end >= 0:
                        head = head[: end + 4]
                        break
            finally:
                reader.close()
            self._header = email.message_from_bytes(head, policy=email.policy.compat32)
        return self._header

    def text(self) -> str:
        if self._text is None:
            reader = self._opener()
            try:
                raw = reader.read()
            finally:
                reader.close()
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            del raw
            pieces = []
            for part in msg.walk():
                if part.get_content_maintype() == "text":
                    try:
                        pieces.append(part.get_content())
                    except (LookupError, ValueError, AssertionError):
                        payload = part.get_payload(decode=True) or b""
                        pieces.append(payload.decode("utf-8", "replace") if isinstance(payload, bytes) else "")
            self._text = "\n".join(pieces).casefold()
        return self._text


def _decoded(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def _header_has(msg: email.message.Message, name: str, needle: str) -> bool:
    values = msg.get_all(name) or []
    if not needle:
        return bool(values)  # RFC 3501: HEADER name "" matches any message with the field
    return any(needle.casefold() in _decoded(str(v)).casefold() for v in values)


def _sent_date(msg: email.message.Message) -> date | None:
    value = msg.get("Date")
    if not value:
        return None
    try:
        return parsedate_to_datetime(str(value)).date()
    except (TypeError, ValueError, IndexError):
        return None


_METADATA = {"LARGER", "SMALLER", "BEFORE", "ON", "SINCE"}


def uses_metadata(key: Key) -> bool:
    """Whether matching ``key`` needs the messages' sizes or internal dates."""
    return key.name in _METADATA or any(uses_metadata(k) for k in key.sub)


def _is_cheap(key: Key) -> bool:
    if key.name in _CONTENT:
        return False
    return all(_is_cheap(k) for k in key.sub)


class Matcher:
    def __init__(self, largest_seq: int, largest_uid: int) -> None:
        self.largest_seq = largest_seq
        self.largest_uid = largest_uid

    def match(self, key: Key, c: Candidate, lazy: _Lazy) -> bool:
        n = key.name
        if n == "AND":
            subs = sorted(key.sub, key=lambda k: not _is_cheap(k))
            return all(self.match(k, c, lazy) for k in subs)
        if n == "NOT":
            return not self.match(key.sub[0], c, lazy)
        if n == "OR":
            a, b = sorted(key.sub, key=lambda k: not _is_cheap(k))
            return self.match(a, c, lazy) or self.match(b, c, lazy)
        if n == "ALL":
            return True
        if n == "SEQ":
            return key.args[0].contains(c.seq, self.largest_seq)  # type: ignore[attr-defined]
        if n == "UID":
            return key.args[0].contains(c.uid, self.largest_uid)  # type: ignore[attr-defined]
        flag_keys = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "DRAFT": "\\Draft", "FLAGGED": "\\Flagged",
                     "SEEN": "\\Seen"}
        if n in flag_keys:
            return flag_keys[n] in c.flags
        if n.startswith("UN") and n[2:] in flag_keys:
            return flag_keys[n[2:]] not in c.flags
        if n == "KEYWORD":
            return key.args[0] in c.flags
        if n == "UNKEYWORD":
            return key.args[0] not in c.flags
        if n == "RECENT":
            return c.recent
        if n == "NEW":
            return c.recent and "\\Seen" not in c.flags
        if n == "OLD":
            return not c.recent
        if n == "LARGER":
            assert c.size is not None
            return c.size > key.args[0]  # type: ignore[operator]
        if n == "SMALLER":
            assert c.size is not None
            return c.size < key.args[0]  # type: ignore[operator]
        if n in ("BEFORE", "ON", "SINCE"):
            assert c.internal_date is not None
            # RFC 3501: dates compare without time and timezone; we use UTC.
            day = c.internal_date.astimezone(timezone.utc).date() if c.internal_date.tzinfo else c.internal_date.date()
            return _compare(n, day, key.args[0].date())  # type: ignore[attr-defined]
        if n in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            sent = _sent_date(lazy.header())
            return sent is not None and _compare(n[4:], sent, key.args[0].date())  # type: ignore[attr-defined]
        if n in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
            return _header_has(lazy.header(), n.capitalize() if n != "BCC" else "Bcc", str(key.args[0]))
        if n == "HEADER":
            return _header_has(lazy.header(), str(key.args[0]), str(key.args[1]))
        if n == "BODY":
            return str(key.args[0]).casefold() in lazy.text()
        if n == "TEXT":
            needle = str(key.args[0]).casefold()
            head = lazy.header()
            in_head = any(needle in _decoded(str(v)).casefold() for v in head.values())
            return in_head or needle in lazy.text()
        raise ValueError(f"unknown search key {n}")


def _compare(op: str, value: date, ref: date) -> bool:
    if op == "BEFORE":
        return value < ref
    if op == "ON":
        return value == ref
    return value >= ref


class _Readers:
    """Readers of the candidates in UID order, from one ``open_messages``
    pass (one query and one batch key unwrap for the folder, where opening
    each message on its own cost two queries, four fifths of a header
    search's time). A message asked for twice (TEXT reads the header, then
    the whole message) or out of order is opened on its own."""

    def __init__(self, store: Any, session: Any, mailbox: str, uids: list[int], keys: Any) -> None:
        self._one = lambda uid: store.open_message(session, mailbox, uid, keys)
        self._it = store.open_messages(session, mailbox, uids, keys) if uids else iter(())
        self._ahead: tuple[int, Any] | None = None
        self._last = 0

    def open(self, uid: int) -> Any:
        if uid <= self._last:
            return self._one(uid)
        self._last = uid
        while True:
            if self._ahead is None:
                nxt = next(self._it, None)
                if nxt is None:
                    return self._one(uid)  # MessageNotFound if it is gone
                self._ahead = nxt
            u, reader = self._ahead
            if u > uid:
                return self._one(uid)
            self._ahead = None
            if u == uid:
                if isinstance(reader, Exception):
                    raise reader
                return reader
            if not isinstance(reader, Exception):
                reader.close()  # skipped: a cheap key ruled it out

    def close(self) -> None:
        if self._ahead is not None and not isinstance(self._ahead[1], Exception):
            self._ahead[1].close()
        self._ahead = None
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def run_search(store: Any, session: Any, mailbox: str, key: Key, candidates: list[Candidate],
               largest_seq: int, largest_uid: int, keys: Any = None) -> list[Candidate]:
    """The candidates that match; on a worker thread. ``keys``: the
    connection's ``ContentKeyCache``, passed on to the store."""
    matcher = Matcher(largest_seq, largest_uid)
    out = []
    readers = _Readers(store, session, mailbox, [] if _is_cheap(key) else [c.uid for c in candidates], keys)
    try:
        for c in candidates:
            lazy = _Lazy(lambda uid=c.uid: readers.open(uid))
            try:
                if matcher.match(key, c, lazy):
                    out.append(c)
            except MessageNotFound:
                continue  # expunged by another session meanwhile
    finally:
        readers.close()
    return out
