"""The IMAP command grammar (RFC 3501 §9, RFC 9051 §9), as small parsers
over one complete command.

The server reads a whole command first: its lines and the literals between
them (each literal checked against the limits before a byte of it is
accepted, see ``server.py``). A :class:`Cursor` then walks that command;
each grammar rule is a method or function that consumes what it matches and
raises :class:`BadCommand` with a reason a person can read otherwise. So a
malformed command is answered ``BAD <reason>`` and never reaches a handler
half-parsed.

Invariants:
- Parsers never block and never do I/O; they see bytes only.
- A literal is only ever taken where the grammar allows a string
  (``astring``, ``string``, ``nstring``); elsewhere it is a syntax error.
- Sequence sets keep ``*`` symbolic (``None``) until the caller knows the
  mailbox's largest number (RFC 3501 §9 ``seq-number``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

# RFC 3501 §9: ATOM-CHAR is any CHAR except atom-specials.
_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0x00, 0x20)) | {0x7F}
ATOM_CHARS = frozenset(c for c in range(0x01, 0x80) if c not in _ATOM_SPECIALS)
# ASTRING-CHAR = ATOM-CHAR / resp-specials ("]").
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
# list-mailbox = 1*list-char; list-char = ATOM-CHAR / list-wildcards / resp-specials
LIST_CHARS = ASTRING_CHARS | {ord("%"), ord("*")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}
# A flag may start with a backslash (RFC 3501 §9 flag-extension).
_FLAG_CHARS = ATOM_CHARS

LITERAL_MARK = re.compile(rb"\{(\d{1,20})(\+?)\}\Z")

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class BadCommand(Exception):
    """The command does not parse; the text says why (sent after BAD)."""


@dataclass(frozen=True)
class Literal:
    """The octets of one literal, as received."""

    data: bytes


class Cursor:
    """A position in a complete command: text segments, each but the last
    ending in a literal marker ``{N}`` or ``{N+}``, with the literal's
    octets between them."""

    def __init__(self, parts: list[bytes | Literal]) -> None:
        self.parts = parts
        self.i = 0
        self.pos = 0

    # -- low level ---------------------------------------------------------

    @property
    def text(self) -> bytes:
        part = self.parts[self.i]
        assert isinstance(part, bytes)
        return part

    def peek(self) -> int | None:
        text = self.text
        return text[self.pos] if self.pos < len(text) else None

    def at_end(self) -> bool:
        return self.i == len(self.parts) - 1 and self.pos >= len(self.text)

    def end(self) -> None:
        """The command must end here."""
        if not self.at_end():
            raise BadCommand("Unexpected extra arguments at the end of the command.")

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise BadCommand("Expected a space between arguments.")
        self.pos += 1

    def maybe_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def expect(self, token: bytes) -> None:
        if self.text[self.pos:self.pos + len(token)].upper() != token.upper():
            raise BadCommand(f"Expected {token.decode()}.")
        self.pos += len(token)

    def accept(self, token: bytes) -> bool:
        if self.text[self.pos:self.pos + len(token)].upper() == token.upper():
            self.pos += len(token)
            return True
        return False

    def _chars(self, allowed: frozenset[int]) -> bytes:
        text = self.text
        start = self.pos
        while self.pos < len(text) and text[self.pos] in allowed:
            self.pos += 1
        return text[start:self.pos]

    # -- grammar rules -------------------------------------------------------

    def atom(self, what: str = "an atom") -> bytes:
        out = self._chars(ATOM_CHARS)
        if not out:
            raise BadCommand(f"Expected {what}.")
        return out

    def tag(self) -> bytes:
        out = self._chars(TAG_CHARS)
        if not out:
            raise BadCommand("Missing command tag.")
        return out

    def number(self, what: str = "a number") -> int:
        digits = self._chars(frozenset(b"0123456789"))
        if not digits or len(digits) > 10 or int(digits) > 0xFFFFFFFF:
            raise BadCommand(f"Expected {what}.")
        return int(digits)

    def literal(self) -> bytes | None:
        """A literal if one starts here, else None."""
        m = LITERAL_MARK.match(self.text, self.pos)
        if not m:
            return None
        nxt = self.parts[self.i + 1] if self.i + 1 < len(self.parts) else None
        if not isinstance(nxt, Literal):
            raise BadCommand("Malformed literal.")
        self.i += 2
        self.pos = 0
        return nxt.data

    def quoted(self) -> bytes:
        text = self.text
        if self.peek() != 0x22:
            raise BadCommand("Expected a quoted string.")
        out = bytearray()
        p = self.pos + 1
        while p < len(text):
            c = text[p]
            if c == 0x5C:  # backslash: only \" and \\ (RFC 3501 §9 QUOTED-CHAR)
                if p + 1 >= len(text) or text[p + 1] not in b'"\\':
                    raise BadCommand("Bad escape in a quoted string.")
                out.append(text[p + 1])
                p += 2
            elif c == 0x22:
                self.pos = p + 1
                return bytes(out)
            else:
                out.append(c)
                p += 1
        raise BadCommand("Unterminated quoted string.")

    def string(self) -> bytes:
        if self.peek() == 0x22:
            return self.quoted()
        lit = self.literal()
        if lit is None:
            raise BadCommand("Expected a string.")
        return lit

    def astring(self, what: str = "a string") -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == 0x7B:
            lit = self.literal()
            if lit is not None:
                return lit
        out = self._chars(ASTRING_CHARS)
        if not out:
            raise BadCommand(f"Expected {what}.")
        return out

    def nstring(self) -> bytes | None:
        if self.accept(b"NIL"):
            return None
        return self.string()

    def list_mailbox(self) -> bytes:
        """RFC 3501 §9 list-mailbox: a string, or atom chars with wildcards."""
        c = self.peek()
        if c == 0x22 or c == 0x7B:
            return self.astring()
        out = self._chars(LIST_CHARS)
        if not out:
            raise BadCommand("Expected a mailbox name or pattern.")
        return out

    def mailbox(self) -> str:
        return decode_mailbox(self.astring("a mailbox name"))

    def flag_list(self) -> list[str]:
        """``(flag ...)`` or, for STORE, a bare list of flags."""
        paren = self.accept(b"(")
        flags: list[str] = []
        while True:
            c = self.peek()
            if c is None or (paren and c == 0x29):
                break
            if flags:
                self.sp()
            backslash = self.accept(b"\\")
            name = self._chars(_FLAG_CHARS)
            if not name:
                raise BadCommand("Expected a flag such as \\Seen or a keyword.")
            flags.append(("\\" if backslash else "") + name.decode("ascii"))
            if not paren and self.peek() != 0x20:
                break
        if paren:
            self.expect(b")")
        return flags

    def seq_set(self) -> SeqSet:
        raw = self._chars(frozenset(b"0123456789:,*"))
        if not raw:
            raise BadCommand("Expected a message set such as 1:5 or 2,4:*.")
        return SeqSet.parse(raw)

    def date(self) -> datetime:
        """RFC 3501 §9 date: ``1-Feb-2024`` or ``"1-Feb-2024"``."""
        quoted = self.peek() == 0x22
        raw = self.quoted() if quoted else self._chars(ATOM_CHARS)
        return parse_date(raw)

    def date_time(self) -> datetime:
        return parse_date_time(self.quoted())


# -- values ----------------------------------------------------------------


@dataclass(frozen=True)
class SeqSet:
    """A sequence set; ``None`` stands for ``*`` (RFC 3501 §9)."""

    ranges: tuple[tuple[int | None, int | None], ...]

    @classmethod
    def parse(cls, raw: bytes) -> SeqSet:
        ranges = []
        for item in raw.split(b","):
            lo_raw, colon, hi_raw = item.partition(b":")
            lo = _seq_number(lo_raw)
            hi = _seq_number(hi_raw) if colon else lo
            ranges.append((lo, hi))
        return cls(tuple(ranges))

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Inclusive (low, high) ranges once ``*`` means ``largest``."""
        out = []
        for lo, hi in self.ranges:
            a = largest if lo is None else lo
            b = largest if hi is None else hi
            out.append((min(a, b), max(a, b)))
        return out

    def contains(self, n: int, largest: int) -> bool:
        return any(lo <= n <= hi for lo, hi in self.resolve(largest))

    def __str__(self) -> str:
        def one(v: int | None) -> str:
            return "*" if v is None else str(v)

        return ",".join(one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.ranges)


def _seq_number(raw: bytes) -> int | None:
    if raw == b"*":
        return None
    if not raw.isdigit() or raw.startswith(b"0") or len(raw) > 10 or int(raw) > 0xFFFFFFFF:
        raise BadCommand("A message number must be from 1 to 4294967295 or *.")
    return int(raw)


def compact_set(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1:3,7`` (for COPYUID and APPENDUID, RFC 4315 §3)."""
    out: list[str] = []
    start = prev = None
    for n in numbers:
        if start is None:
            start = prev = n
        elif prev is not None and n == prev + 1:
            prev = n
        else:
            out.append(str(start) if start == prev else f"{start}:{prev}")
            start = prev = n
    if start is not None:
        out.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(out)


def decode_mailbox(raw: bytes) -> str:
    """Modified UTF-7 (RFC 3501 §5.1.3) to str."""
    try:
        return raw.decode("imap4-utf-7")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadCommand("The mailbox name is not valid modified UTF-7.") from exc


def encode_mailbox(name: str) -> bytes:
    return name.encode("imap4-utf-7")


def parse_date(raw: bytes) -> datetime:
    m = re.fullmatch(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})", raw)
    if not m:
        raise BadCommand("Expected a date such as 1-Feb-2024.")
    try:
        month = [x.lower() for x in MONTHS].index(m[2].decode().lower()) + 1
        return datetime(int(m[3]), month, int(m[1]), tzinfo=timezone.utc)
    except ValueError as exc:
        raise BadCommand("Expected a date such as 1-Feb-2024.") from exc


def parse_date_time(raw: bytes) -> datetime:
    """RFC 3501 §9 date-time: ``"dd-Mon-yyyy hh:mm:ss +zzzz"``."""
    m = re.fullmatch(rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", raw)
    if not m:
        raise BadCommand('Expected a date-time such as "01-Feb-2024 10:00:00 +0000".')
    try:
        month = [x.lower() for x in MONTHS].index(m[2].decode().lower()) + 1
        offset = timedelta(hours=int(m[8]), minutes=int(m[9])) * (-1 if m[7] == b"-" else 1)
        return datetime(int(m[3]), month, int(m[1]), int(m[4]), int(m[5]), int(m[6]), tzinfo=timezone(offset))
    except ValueError as exc:
        raise BadCommand('Expected a date-time such as "01-Feb-2024 10:00:00 +0000".') from exc


def format_date_time(when: datetime) -> str:
    """RFC 3501 §9 date-time for INTERNALDATE (locale independent)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    offset = when.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return (f"{when.day:02d}-{MONTHS[when.month - 1]}-{when.year:04d} "
            f"{when.hour:02d}:{when.minute:02d}:{when.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}")


# -- FETCH attributes (RFC 3501 §6.4.5) --------------------------------------


@dataclass(frozen=True)
class Section:
    """``BODY[<part>.<text>]``: part numbers, then one of "", HEADER,
    HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME."""

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()

    def spec(self) -> str:
        """The section as the FETCH response names it; field names as the
        client could have sent them (``astring``), so the response parses
        back to this section (RFC 3501 §7.4.2 ``section``)."""
        out = ".".join(str(p) for p in self.part)
        if self.text:
            out = f"{out}.{self.text}" if out else self.text
        if self.fields:
            out += " (" + " ".join(_astring_text(f) for f in self.fields) + ")"
        return out


def _astring_text(name: str) -> str:
    """``name`` (ASCII, other bytes as surrogates) as an IMAP astring: an
    atom if it can be one, else a quoted string, else a literal."""
    raw = name.encode("ascii", "surrogateescape")
    if raw and all(c in ASTRING_CHARS for c in raw):
        return name
    if all(0x01 <= c <= 0x7F and c not in (0x0A, 0x0D) for c in raw):
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{{{len(raw)}}}\r\n{name}"


@dataclass(frozen=True)
class FetchItem:
    """One fetch attribute. ``name`` is the attribute as the response names
    it: FLAGS, UID, ENVELOPE, BODY (a section), RFC822, ..."""

    name: str
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None  # (start, length)

    @property
    def content(self) -> bool:
        """Whether the answer is derived from the sealed message (audited)."""
        return self.name not in ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE")

    @property
    def sets_seen(self) -> bool:
        # RFC 3501 §6.4.5: BODY[...] (not .PEEK), RFC822 and RFC822.TEXT set \Seen.
        return (self.name == "BODY" and self.section is not None and not self.peek) or \
            self.name in ("RFC822", "RFC822.TEXT")

    def response_name(self) -> str:
        if self.name == "BODY" and self.section is not None:
            out = f"BODY[{self.section.spec()}]"
            if self.partial is not None:
                out += f"<{self.partial[0]}>"
            return out
        return self.name


_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SIMPLE = {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822",
           "RFC822.HEADER", "RFC822.TEXT"}


def fetch_items(cur: Cursor) -> list[FetchItem]:
    """fetch-att list or macro (RFC 3501 §6.4.5)."""
    c = cur.peek()
    if c == 0x28:
        cur.pos += 1
        items: list[FetchItem] = []
        while True:
            items.append(_fetch_att(cur))
            if cur.accept(b")"):
                break
            cur.sp()
        return items
    word = cur.atom("FETCH data items").decode().upper()
    if word in _MACROS:
        return [FetchItem(n) for n in _MACROS[word]]
    cur.pos -= len(word)
    return [_fetch_att(cur)]


def _fetch_att(cur: Cursor) -> FetchItem:
    text = cur.text
    m = re.compile(rb"[A-Za-z0-9.]+").match(text, cur.pos)
    if not m:
        raise BadCommand("Expected a FETCH data item.")
    cur.pos = m.end()
    name = m[0].decode().upper()
    if name in ("BODY", "BODY.PEEK") and cur.peek() == 0x5B:
        cur.pos += 1
        section = _section(cur)
        cur.expect(b"]")
        partial = None
        if cur.accept(b"<"):
            start = cur.number("a partial start")
            cur.expect(b".")
            length = cur.number("a partial length")
            if length == 0:
                raise BadCommand("A partial fetch needs a length above zero.")
            cur.expect(b">")
            partial = (start, length)
        return FetchItem("BODY", section, peek=name == "BODY.PEEK", partial=partial)
    if name not in _SIMPLE:
        raise BadCommand(f"Unknown FETCH data item {name}.")
    return FetchItem(name)


def _section(cur: Cursor) -> Section:
    part: list[int] = []
    while True:
        c = cur.peek()
        if c is not None and 0x31 <= c <= 0x39:
            part.append(cur.number("a part number"))
            if cur.accept(b"."):
                continue
            return Section(tuple(part))
        break
    if cur.peek() == 0x5D:
        return Section(tuple(part))
    word = cur.atom("a section such as HEADER or TEXT").decode().upper()
    if word == "MIME":
        if not part:
            raise BadCommand("MIME needs a part number, as in BODY[1.MIME].")
        return Section(tuple(part), "MIME")
    if word in ("HEADER", "TEXT"):
        return Section(tuple(part), word)
    if word in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        cur.sp()
        cur.expect(b"(")
        names = []
        while True:
            # Bytes that are not ASCII never match a field name (RFC 5322
            # §2.2); surrogateescape keeps them, to echo them exactly.
            names.append(cur.astring("a header field name").decode("ascii", "surrogateescape").upper())
            if cur.accept(b")"):
                break
            cur.sp()
        return Section(tuple(part), word, tuple(names))
    raise BadCommand(f"Unknown section {word}.")


# -- SEARCH keys (RFC 3501 §6.4.4) ---------------------------------------------


@dataclass
class Key:
    """One search key: ``name`` upper case; ``args`` its arguments; ``sub``
    the keys of NOT (one), OR (two) or a parenthesized list (all)."""

    name: str
    args: tuple[object, ...] = ()
    sub: list[Key] = field(default_factory=list)


_NO_ARG = {"ALL", "ANSWERED", "DELETED", "DRAFT", "FLAGGED", "NEW", "OLD", "RECENT", "SEEN", "UNANSWERED",
           "UNDELETED", "UNDRAFT", "UNFLAGGED", "UNSEEN"}
_STRING_ARG = {"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"}
_DATE_ARG = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}
_NUMBER_ARG = {"LARGER", "SMALLER"}
_ARG_KEYS = _STRING_ARG | _DATE_ARG | _NUMBER_ARG | {"KEYWORD", "UNKEYWORD", "HEADER", "UID", "NOT", "OR"}
# How deeply parentheses, NOT and OR may nest. The grammar (RFC 9051 §9)
# sets no bound, and each level is a Python call: 10,000 "(" would end in
# RecursionError (CWE-674). Real clients nest little, except OR chains
# (one level per alternative: a search over 100 senders is 99 deep).
MAX_SEARCH_DEPTH = 200


def search_keys(cur: Cursor) -> tuple[str | None, Key]:
    """``[CHARSET name] key *(SP key)``; all keys ANDed into one Key."""
    charset = None
    if cur.accept(b"CHARSET "):
        charset = cur.astring("a charset name").decode("ascii", "replace").upper()
        cur.sp()
    keys = [_search_key(cur, charset, 0)]
    while not cur.at_end():
        cur.sp()
        keys.append(_search_key(cur, charset, 0))
    return charset, Key("AND", sub=keys)


def _text_arg(cur: Cursor, charset: str | None) -> str:
    raw = cur.astring("a search string")
    try:
        return raw.decode("utf-8" if charset in (None, "UTF-8") else "ascii")
    except UnicodeDecodeError as exc:
        raise BadCommand("The search string is not valid in the given charset.") from exc


def _search_key(cur: Cursor, charset: str | None, depth: int) -> Key:
    if depth > MAX_SEARCH_DEPTH:
        raise BadCommand(f"Search keys nest more than {MAX_SEARCH_DEPTH} levels deep.")
    depth += 1
    if cur.accept(b"("):
        keys = [_search_key(cur, charset, depth)]
        while not cur.accept(b")"):
            cur.sp()
            keys.append(_search_key(cur, charset, depth))
        return Key("AND", sub=keys)
    c = cur.peek()
    if c is not None and (0x30 <= c <= 0x39 or c == 0x2A):
        return Key("SEQ", (cur.seq_set(),))
    name = cur.atom("a search key").decode().upper()
    if name in _NO_ARG:
        return Key(name)
    if name not in _ARG_KEYS:
        raise BadCommand(f"Unknown search key {name}.")
    cur.sp()
    if name in _STRING_ARG:
        return Key(name, (_text_arg(cur, charset),))
    if name in _DATE_ARG:
        return Key(name, (cur.date(),))
    if name in _NUMBER_ARG:
        return Key(name, (cur.number("a size in octets"),))
    if name in ("KEYWORD", "UNKEYWORD"):
        return Key(name, (cur.atom("a keyword").decode("ascii"),))
    if name == "HEADER":
        field_name = cur.astring("a header field name").decode("ascii", "replace")
        cur.sp()
        return Key(name, (field_name, _text_arg(cur, charset)))
    if name == "UID":
        return Key(name, (cur.seq_set(),))
    if name == "NOT":
        return Key(name, sub=[_search_key(cur, charset, depth)])
    if name == "OR":
        first = _search_key(cur, charset, depth)
        cur.sp()
        return Key(name, sub=[first, _search_key(cur, charset, depth)])
    raise BadCommand(f"Unknown search key {name}.")
