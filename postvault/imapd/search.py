"""SEARCH (RFC 3501 §6.4.4) over one session's view and the sealed store.

Keys fall into four costs, and an AND or OR tries the cheaper side first,
so a search such as ``UNSEEN BODY x`` decrypts only unseen messages:

1. **Metadata** (ALL, sequence and UID sets, flags, keywords, RECENT/NEW/
   OLD, sizes, internal dates): evaluated for the whole view at once, as
   bitmaps (one 0/1 octet per message, combined as Python integers with
   ``&``, ``|`` and ``^``; no object per message). Flags come from the
   view's flag index (one test per distinct flag set), sizes and dates from
   one store query (``Store.search_metadata``).
2. **Indexed header fields** (FROM, TO, CC, BCC, SUBJECT, HEADER of an
   indexed field, SENTBEFORE/SENTON/SENTSINCE): from the sealed search
   index (``Store.search_fields``): one small entry per message instead of
   decrypting its header; the store fills missing entries on the way.
3. **Other header fields** (HEADER of any other field): the message's
   header, decrypted.
4. **Content** (BODY, TEXT): the whole message, decrypted, against the
   decoded text of its parts (RFC 2047 words and base64/quoted-printable
   bodies decoded first).

Matching of header fields is ``postvault.mime.searchfields``: case-
insensitive substring of the RFC 2047-decoded value; the index holds the
values decoded and case-folded the same way, so both paths answer alike.

Invariants:
- Sequence numbers are the view's: message n is ``uids[n - 1]``, ghosts
  (expunged by someone else, not yet announced) included, and never in a
  result. A message gone from the store meanwhile matches nothing (not even
  NOT): for size and date keys it is missing from the store's answer, for
  content keys it no longer opens.
- Content keys run on a worker thread, one message at a time: at most one
  decrypted message (and one round of index entries) is held, and it is
  dropped before the next is opened.
- Nothing decrypted leaves this module but the yes/no answer.
"""

from __future__ import annotations

import bisect
import email.message
import email.policy
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from itertools import compress
from typing import Any

from ..errors import MessageNotFound
from ..mime.searchfields import Fields, decoded, header_has, indexed, needle_of, parse_header, position, read_header
from .parse import Key

_CHEAP, _FIELDS, _HEADER, _BODY = 0, 1, 2, 3
_FIELD_KEYS = {"FROM", "TO", "CC", "BCC", "SUBJECT", "SENTBEFORE", "SENTON", "SENTSINCE"}
_METADATA = {"LARGER", "SMALLER", "BEFORE", "ON", "SINCE"}
_FLAG_KEYS = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "DRAFT": "\\Draft", "FLAGGED": "\\Flagged",
              "SEEN": "\\Seen"}


@dataclass
class View:
    """What SEARCH needs of the session's view, copied on the reactor
    thread (the worker must not see it change): UIDs ascending (sequence
    number n is ``uids[n - 1]``), each message's index into ``flag_sets``,
    the \\Recent UIDs and the ghosts."""

    uids: array[int]
    flag_index: array[int]
    flag_sets: list[frozenset[str]]
    recent: frozenset[int]
    ghosts: frozenset[int]


def uses_metadata(key: Key) -> bool:
    """Whether matching ``key`` needs the messages' sizes or internal dates."""
    return key.name in _METADATA or any(uses_metadata(k) for k in key.sub)


def _cost(key: Key) -> int:
    n = key.name
    if key.sub:
        return max(_cost(k) for k in key.sub)
    if n in _FIELD_KEYS:
        # IMAP strings carry no NUL; one that did goes the header way (an
        # index entry joins a field's values with NUL).
        return _FIELDS if "\0" not in str(key.args[0]) else _HEADER
    if n == "HEADER":
        return _FIELDS if indexed(str(key.args[0])) and "\0" not in str(key.args[1]) else _HEADER
    if n in ("BODY", "TEXT"):
        return _BODY
    return _CHEAP


def _uses(key: Key, cost: int) -> bool:
    if key.sub:
        return any(_uses(k, cost) for k in key.sub)
    return _cost(key) == cost


def _compare(op: str, value: date, ref: date) -> bool:
    if op == "BEFORE":
        return value < ref
    if op == "ON":
        return value == ref
    return value >= ref


# -- 1. metadata, as bitmaps --------------------------------------------------


class _Bitmaps:
    """Metadata keys over the whole view: each a Python integer whose octet
    i (big-endian, of ``n``) is 1 where message i + 1 matches, else 0."""

    def __init__(self, store: Any, session: Any, mailbox: str, view: View, key: Key) -> None:
        self.view = view
        self.n = n = len(view.uids)
        self.ones = int.from_bytes(b"\x01" * n, "big")
        self._flag_octets: bytes | None = None
        self._meta: dict[int, int] = {}
        self.present = self.ones  # messages the store still has (when asked)
        tests: list[Key] = []
        self._collect(key, tests)
        if tests:
            self._load_metadata(store, session, mailbox, tests)

    def _collect(self, key: Key, out: list[Key]) -> None:
        if key.name in _METADATA:
            out.append(key)
        for k in key.sub:
            self._collect(k, out)

    def _load_metadata(self, store: Any, session: Any, mailbox: str, tests: list[Key]) -> None:
        suids, columns = store.search_metadata(session, mailbox, [(k.name, k.args[0]) for k in tests])
        mine = self.view.uids
        if suids == mine:
            present = self.ones
            mapped = columns
        else:
            # The store and the view differ (changes not yet applied to the
            # view): line the store's answer up with the view's positions.
            n = self.n
            where = bytearray(n)
            cols = [bytearray(n) for _ in columns]
            i = 0
            for j, uid in enumerate(suids):
                while i < n and mine[i] < uid:
                    i += 1
                if i == n:
                    break
                if mine[i] == uid:
                    where[i] = 1
                    for col, src in zip(cols, columns):
                        col[i] = src[j]
            present = int.from_bytes(where, "big")
            mapped = [bytes(c) for c in cols]
        self.present = present
        for k, col in zip(tests, mapped):
            self._meta[id(k)] = int.from_bytes(col, "big")

    def _flags(self, test: Callable[[frozenset[str]], bool]) -> int:
        sets = self.view.flag_sets
        if len(sets) <= 256:
            if self._flag_octets is None:
                self._flag_octets = array("B", self.view.flag_index).tobytes()
            table = bytes(1 if test(sets[i]) else 0 for i in range(len(sets))) + bytes(256 - len(sets))
            return int.from_bytes(self._flag_octets.translate(table), "big")
        ok = [1 if test(s) else 0 for s in sets]
        return int.from_bytes(bytes(map(ok.__getitem__, self.view.flag_index)), "big")

    def _recent(self) -> int:
        recent = self.view.recent
        if not recent:
            return 0
        return int.from_bytes(bytes([u in recent for u in self.view.uids]), "big")

    def _ranges(self, ranges: list[tuple[int, int]]) -> int:
        """Positions lo..hi (0-based, inclusive-exclusive pairs) set."""
        out = bytearray(self.n)
        for a, b in ranges:
            if a < b:
                out[a:b] = b"\x01" * (b - a)
        return int.from_bytes(out, "big")

    def of(self, key: Key) -> int:
        """The bitmap of a metadata-only key."""
        n = key.name
        if n == "AND":
            out = self.ones
            for k in key.sub:
                out &= self.of(k)
            return out
        if n == "OR":
            return self.of(key.sub[0]) | self.of(key.sub[1])
        if n == "NOT":
            return self.ones ^ self.of(key.sub[0])
        if n == "ALL":
            return self.ones
        if n == "SEQ":
            largest = self.n
            return self._ranges([(lo - 1, min(hi, largest)) for lo, hi in key.args[0].resolve(largest)])  # type: ignore[attr-defined]
        if n == "UID":
            uids = self.view.uids
            largest = uids[-1] if uids else 0
            return self._ranges([(bisect.bisect_left(uids, lo), bisect.bisect_right(uids, hi))
                                 for lo, hi in key.args[0].resolve(largest)])  # type: ignore[attr-defined]
        if n in _FLAG_KEYS:
            flag = _FLAG_KEYS[n]
            return self._flags(lambda s: flag in s)
        if n.startswith("UN") and n[2:] in _FLAG_KEYS:
            flag = _FLAG_KEYS[n[2:]]
            return self._flags(lambda s: flag not in s)
        if n == "KEYWORD":
            word = key.args[0]
            return self._flags(lambda s: word in s)
        if n == "UNKEYWORD":
            word = key.args[0]
            return self._flags(lambda s: word not in s)
        if n == "RECENT":
            return self._recent()
        if n == "NEW":
            return self._recent() & self._flags(lambda s: "\\Seen" not in s)
        if n == "OLD":
            return self.ones ^ self._recent()
        if n in _METADATA:
            return self._meta[id(key)]
        raise ValueError(f"unknown search key {n}")

    def octets(self, bits: int) -> bytes:
        return bits.to_bytes(self.n, "big")

    def live(self) -> int:
        """Messages of the view that are not ghosts."""
        ghosts = self.view.ghosts
        if not ghosts:
            return self.ones
        out = bytearray(b"\x01" * self.n)
        uids = self.view.uids
        for u in ghosts:
            i = bisect.bisect_left(uids, u)
            if i < len(uids) and uids[i] == u:
                out[i] = 0
        return int.from_bytes(out, "big")


# -- 2-4. keys that need content, one message at a time ---------------------


class _Lazy:
    """One message's search fields, header and decoded text, each read
    only if a key asks."""

    __slots__ = ("uid", "_search", "_fields", "_header", "_text")

    def __init__(self, uid: int, search: _Content) -> None:
        self.uid = uid
        self._search = search
        self._fields: Fields | None = None
        self._header: email.message.Message | None = None
        self._text: str | None = None

    def fields(self) -> Fields:
        if self._fields is None:
            self._fields = self._search.fields.get(self.uid)
        return self._fields

    def header(self) -> email.message.Message:
        if self._header is None:
            reader = self._search.readers.open(self.uid)
            try:
                head = read_header(reader)
            finally:
                reader.close()
            self._header = parse_header(head)
        return self._header

    def text(self) -> str:
        if self._text is None:
            reader = self._search.readers.open(self.uid)
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


class _Stream:
    """Values of the candidates in UID order from one store iterator of
    ``(uid, value)`` (ascending); asked for in ascending order. A UID the
    iterator skips is gone from the mailbox (``MessageNotFound``)."""

    def __init__(self, it: Iterator[tuple[int, Any]]) -> None:
        self._it = it
        self._ahead: tuple[int, Any] | None = None

    def get(self, uid: int) -> Any:
        while True:
            if self._ahead is None:
                self._ahead = next(self._it, None)
                if self._ahead is None:
                    raise MessageNotFound(f"no message with UID {uid}")
            u, value = self._ahead
            if u > uid:
                raise MessageNotFound(f"no message with UID {uid}")
            self._ahead = None
            if u == uid:
                if isinstance(value, Exception):
                    raise value
                return value
            if not isinstance(value, Exception) and hasattr(value, "close"):
                value.close()  # skipped: another key decided without it

    def close(self) -> None:
        if self._ahead is not None and hasattr(self._ahead[1], "close"):
            self._ahead[1].close()
        self._ahead = None
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class _Readers:
    """Readers of the candidates in UID order, from one ``open_messages``
    pass (one query and one batch key unwrap for the folder). A message
    asked for twice (TEXT reads the header, then the whole message) or out
    of order is opened on its own."""

    def __init__(self, store: Any, session: Any, mailbox: str, uids: list[int], keys: Any) -> None:
        self._one = lambda uid: store.open_message(session, mailbox, uid, keys)
        self._stream = _Stream(store.open_messages(session, mailbox, uids, keys) if uids else iter(()))
        self._last = 0

    def open(self, uid: int) -> Any:
        if uid <= self._last:
            return self._one(uid)
        self._last = uid
        try:
            return self._stream.get(uid)
        except MessageNotFound:
            return self._one(uid)  # MessageNotFound if it is really gone

    def close(self) -> None:
        self._stream.close()


class _Content:
    """The sources of one search's content keys."""

    def __init__(self, store: Any, session: Any, mailbox: str, uids: list[int], keys: Any, key: Key) -> None:
        self.fields = _Stream(store.search_fields(session, mailbox, uids, keys) if _uses(key, _FIELDS)
                              else iter(()))
        self.readers = _Readers(store, session, mailbox,
                                uids if _uses(key, _HEADER) or _uses(key, _BODY) else [], keys)

    def close(self) -> None:
        self.fields.close()
        self.readers.close()


Pred = Callable[[int, _Lazy], bool]


def _compile(key: Key, bits: _Bitmaps) -> Pred:
    """A predicate over (position, message) for a key with content parts;
    its metadata-only parts are one octet lookup in their bitmap."""
    cost = _cost(key)
    if cost == _CHEAP:
        octets = bits.octets(bits.of(key))
        return lambda p, m: octets[p] == 1
    n = key.name
    if n == "AND":
        preds = [_compile(k, bits) for k in sorted(key.sub, key=_cost)]
        if len(preds) == 1:
            return preds[0]
        return lambda p, m: all(f(p, m) for f in preds)
    if n == "OR":
        a, b = (_compile(k, bits) for k in sorted(key.sub, key=_cost))
        return lambda p, m: a(p, m) or b(p, m)
    if n == "NOT":
        inner = _compile(key.sub[0], bits)
        return lambda p, m: not inner(p, m)
    if n in ("FROM", "TO", "CC", "BCC", "SUBJECT", "HEADER") and cost == _FIELDS:
        name, needle = (n, str(key.args[0])) if n != "HEADER" else (str(key.args[0]), str(key.args[1]))
        i, octets = position(name), needle_of(needle)
        return lambda p, m: m.fields().contains(i, octets)
    if n in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        name, needle = n.capitalize() if n != "BCC" else "Bcc", str(key.args[0])
        return lambda p, m: header_has(m.header(), name, needle)
    if n in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        op, ref = n[4:], key.args[0].date()  # type: ignore[attr-defined]

        def sent(p: int, m: _Lazy) -> bool:
            day = m.fields().sent
            return day is not None and _compare(op, day, ref)
        return sent
    if n == "HEADER":
        name, needle = str(key.args[0]), str(key.args[1])
        return lambda p, m: header_has(m.header(), name, needle)
    if n == "BODY":
        folded = str(key.args[0]).casefold()
        return lambda p, m: folded in m.text()
    if n == "TEXT":
        folded = str(key.args[0]).casefold()

        def text(p: int, m: _Lazy) -> bool:
            head = m.header()
            if any(folded in decoded(str(v)).casefold() for v in head.values()):
                return True
            return folded in m.text()
        return text
    raise ValueError(f"unknown search key {n}")


def _conjuncts(key: Key) -> list[Key]:
    if key.name != "AND":
        return [key]
    return [c for k in key.sub for c in _conjuncts(k)]


def run_search(store: Any, session: Any, mailbox: str, key: Key, view: View, keys: Any = None) -> list[int]:
    """The 0-based view positions of the messages that match, ascending;
    on a worker thread. ``keys``: the connection's ``ContentKeyCache``,
    passed on to the store."""
    bits = _Bitmaps(store, session, mailbox, view, key)
    parts = _conjuncts(key)
    cheap = [k for k in parts if _cost(k) == _CHEAP]
    rest = [k for k in parts if _cost(k) != _CHEAP]
    found = bits.live() & bits.present
    for k in cheap:
        found &= bits.of(k)
    positions = list(compress(range(bits.n), bits.octets(found))) if found else []
    if not rest or not positions:
        return positions
    pred = _compile(Key("AND", sub=rest), bits)
    uids = view.uids
    content = _Content(store, session, mailbox, [uids[p] for p in positions], keys, Key("AND", sub=rest))
    out = []
    try:
        for p in positions:
            try:
                if pred(p, _Lazy(uids[p], content)):
                    out.append(p)
            except MessageNotFound:
                continue  # expunged by another session meanwhile
    finally:
        content.close()
    return out

