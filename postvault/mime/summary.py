"""The message summary: everything IMAP needs for ENVELOPE and
BODYSTRUCTURE (RFC 3501 §7.4.2), and where every part lies in the raw
message, computed once when a message is stored so that listing a folder
never decrypts a body.

``summarize(raw)`` is pure and never raises: hostile input gives a summary
of what could be made of it. The store keeps the result sealed (it holds the
subject: PHI).

Format (plain JSON types; version ``v`` = 1)::

    summary = {
        "v": 1,
        "size": int,           # octets of the whole message
        "header_size": int,    # octets of the header, blank line included
        "envelope": envelope,
        "body": part,          # the message's own body part (see below)
        "limited": bool,       # True if a cap below cut the structure short
    }
    envelope = {               # RFC 3501 §7.4.2 ENVELOPE, in that order
        "date", "subject": str | None,
        "from", "sender", "reply_to", "to", "cc", "bcc": [address, ...] | None,
        "in_reply_to", "message_id": str | None,
    }
    address = [name, adl, mailbox, host]      # each str | None
    part = {
        "type", "subtype": str,               # lower case
        "params": [[name, value], ...],       # Content-Type parameters
        "id", "description": str | None,      # Content-ID, Content-Description
        "encoding": str,                      # Content-Transfer-Encoding, lower case, "7bit" if none
        "size": int,                          # octets of the body as in the message (encoded)
        "lines": int | None,                  # text/* and message/rfc822 only
        "md5": str | None,                    # Content-MD5
        "disposition": [type, [[name, value], ...]] | None,   # type lower case
        "language": [str, ...] | None,        # Content-Language
        "location": str | None,               # Content-Location
        "parts": [part, ...],                 # multipart/*: at least one; else []
        "envelope": envelope | None,          # message/rfc822: the inner message's
        "body": part | None,                  # message/rfc822: the inner message's body part
        "offsets": [start, header_length, body_length],
    }

Strings. Header values are the field's bytes after the colon, unfolded
(RFC 5322 §2.2.3: the line breaks of folding removed, nothing else), with
surrounding white space stripped, decoded as UTF-8 with ``surrogateescape``:
``value.encode("utf-8", "surrogateescape")`` gives back the exact bytes. No
RFC 2047 decoding: IMAP sends header text as it is and clients decode it.
The first occurrence of a field counts.

Addresses (RFC 3501 §7.4.2). ``name`` is the display name (quotes and
quoted-pairs removed; a comment stands in when there is no display name),
``adl`` the obsolete source route ("@a,@b"), ``mailbox`` the local part and
``host`` the domain. Group syntax: ``[None, None, group_name, None]`` opens a
group and ``[None, None, None, None]`` closes it. A mailbox with no domain
gets ``host = "MISSING_DOMAIN"`` (never None, which would read as a group),
an empty local part ``"MISSING_MAILBOX"`` (Dovecot's convention). An absent
or empty address field is None (IMAP NIL); ``sender`` and ``reply_to``
default to ``from`` (RFC 3501 §7.4.2).

Parameters. Names lower case, values as in the message with quoting
removed; RFC 2231 continuations are joined (``name*0``, ``name*1`` →
``name``; if any segment is extended, ``name*`` with the charset'language'
prefix kept and the value still percent-encoded, as Dovecot does).

Parts. A part without Content-Type is text/plain; charset=us-ascii
(RFC 2045 §5.2), or message/rfc822 inside multipart/digest (RFC 2046
§5.1.5). A multipart without a boundary is read as text/plain; one whose
boundary never occurs gets a single empty text/plain part (IMAP needs at
least one). A message/rfc822 part with a transfer encoding other than
7bit/8bit/binary (RFC 2046 §5.2.1 forbids that) cannot be mapped to
offsets and is described as application/octet-stream. ``lines`` counts
line feeds, plus one for a last line without one.

Offsets. ``offsets`` are absolute octet positions in the raw message:
the part's MIME header starts at ``start`` and is ``header_length`` octets
long (blank line included, 0 when the part has none), and its body follows
for ``body_length`` octets (the CRLF before a boundary belongs to the
boundary, RFC 2046 §5.1.1). The message's own ``body`` part has offsets
``[0, header_size, size - header_size]``; the inner message of a
message/rfc822 part starts at its body and its header is
``part["body"]["offsets"][1]`` octets long. So any section of RFC 3501
§6.4.5 is one byte range, which ``section_range`` computes; a FETCH of
``BODY[1.2]`` seeks a ``SealedReader`` there and opens only the chunks it
covers.

A header ends at the first empty line (or the end of its part: then the
part has no body); line ends may be CRLF or bare LF. A boundary delimiter is
a line of "--" + boundary, then "--" for the last, then optional spaces and
tabs (RFC 2046 §5.1.1).

Work is bounded: at most ``MAX_DEPTH`` levels of nesting, ``MAX_PARTS``
parts in all, ``MAX_HEADER_FIELDS`` fields in the first ``MAX_HEADER_SCAN``
octets of a header, ``MAX_ADDRESSES`` addresses in the first
``MAX_ADDRESS_FIELD`` characters of a field, ``MAX_NEAR_MISSES`` lines per
multipart that look like a boundary but are not one; beyond them the
structure is cut short (a too-deep multipart or message becomes an
application/octet-stream leaf) and ``limited`` is set. Offsets stay exact
whatever is cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

__all__ = [
    "MAX_DEPTH",
    "MAX_PARTS",
    "SUMMARY_VERSION",
    "locate",
    "section_range",
    "summarize",
]

SUMMARY_VERSION = 1
# The attachment policy's defaults (max_mime_depth 20, max_parts 500) refuse
# anything deeper or larger at the door; these caps are only the backstop
# for messages stored some other way, so a little more generous.
MAX_DEPTH = 32
MAX_PARTS = 1000
MAX_HEADER_FIELDS = 1000
MAX_ADDRESSES = 1000
MAX_PARAMS = 100
# Header bytes read for fields, per part; offsets stay exact beyond it.
MAX_HEADER_SCAN = 256 * 1024
# Characters of one address field parsed (about a thousand addresses).
MAX_ADDRESS_FIELD = 64 * 1024
# Lines that start like a delimiter but are not one ("--boundaryX"), per
# multipart: each costs a step in Python, so a hostile body of millions of
# them is cut short instead of costing seconds.
MAX_NEAR_MISSES = 10_000
_MAX_CONTINUATION = 999  # RFC 2231 segment numbers we accept

MISSING_DOMAIN = "MISSING_DOMAIN"
MISSING_MAILBOX = "MISSING_MAILBOX"

_IDENTITY = frozenset({"7bit", "8bit", "binary"})
_ENVELOPE_FIELDS = (
    "date", "subject", "from", "sender", "reply-to", "to", "cc", "bcc", "in-reply-to", "message-id",
)
_MIME_FIELDS = (
    "content-type", "content-transfer-encoding", "content-id", "content-description", "content-md5",
    "content-disposition", "content-language", "content-location",
)
_WANTED_TOP = frozenset(_ENVELOPE_FIELDS + _MIME_FIELDS)
_WANTED_PART = frozenset(_MIME_FIELDS)

Part = dict[str, Any]
Summary = dict[str, Any]


class _State:
    """Budget shared by one walk."""

    __slots__ = ("limited", "parts")

    def __init__(self) -> None:
        self.parts = 0
        self.limited = False


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------
# Header blocks
# --------------------------------------------------------------------------


def _header_end(raw: bytes, start: int, end: int) -> int:
    """Offset just past the blank line that ends the header at ``start``,
    or ``end`` if the part has no blank line (all header, no body)."""
    if start >= end:
        return start
    if raw.startswith(b"\r\n", start, end):
        return start + 2
    if raw.startswith(b"\n", start, end):
        return start + 1
    crlf = raw.find(b"\n\r\n", start, end)
    lf = raw.find(b"\n\n", start, end)
    if crlf < 0 and lf < 0:
        return end
    if lf < 0 or (0 <= crlf < lf):
        return crlf + 3
    return lf + 2


def header_size(raw: bytes) -> int:
    """Octets of the top-level header, blank line included: a summary's
    ``header_size`` for ``raw`` (the whole message, or a prefix of it that
    holds the blank line)."""
    return _header_end(raw, 0, len(raw))


def _fields(raw: bytes, start: int, end: int, wanted: frozenset[str], state: _State) -> dict[str, str]:
    """The first occurrence of each ``wanted`` field in the header block
    ``raw[start:end]``, unfolded; names lower case."""
    out: dict[str, str] = {}
    name: str | None = None
    pieces: list[bytes] = []
    count = 0

    def finish() -> None:
        if name is not None and name in wanted and name not in out:
            out[name] = _text(b"".join(pieces)).strip(" \t\r\n")

    if end - start > MAX_HEADER_SCAN:
        state.limited = True
        end = start + MAX_HEADER_SCAN
    for line in raw[start:end].split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            break  # the blank line
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                pieces.append(line)  # unfolding drops only the line break
            continue
        finish()
        name, pieces = None, []
        colon = line.find(b":")
        if colon <= 0:
            continue  # not a field; it also ends the one before
        count += 1
        if count > MAX_HEADER_FIELDS:
            state.limited = True
            break
        name = _text(line[:colon]).strip(" \t").lower()
        pieces = [line[colon + 1 :]]
    finish()
    return out


# --------------------------------------------------------------------------
# MIME parameters (RFC 2045 §5.1, RFC 2183, RFC 2231)
# --------------------------------------------------------------------------


def _strip_comments_split(value: str) -> list[str]:
    """Split a structured MIME field on ";" outside quoted strings, with
    comments (RFC 822 "(...)", nesting allowed) removed."""
    segments: list[str] = []
    buf: list[str] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == '"':
            j = i + 1
            while j < n and value[j] != '"':
                j += 2 if value[j] == "\\" else 1
            buf.append(value[i : j + 1])
            i = j + 1
        elif c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if value[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(value[j], 0)
                j += 1
            i = j
        elif c == ";":
            segments.append("".join(buf))
            buf = []
            i += 1
        else:
            j = i + 1
            while j < n and value[j] not in '"(;':
                j += 1
            buf.append(value[i:j])
            i = j
    segments.append("".join(buf))
    return segments


_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_CONTINUATION = re.compile(r"(.+?)\*([0-9]{1,3})(\*?)")
_ATTR_CHAR = re.compile(r"[A-Za-z0-9!#$&+\-.^_`|~]")


def _unquote(value: str) -> str:
    value = value.strip(" \t\r\n")
    if not value.startswith('"'):
        return value
    # Up to the closing quote (an unterminated one runs to the end).
    m = re.match(r'"((?:[^"\\]|\\.)*)', value, re.DOTALL)
    return _QUOTED_PAIR.sub(r"\1", m.group(1) if m else value[1:])


def _percent(value: str) -> str:
    # A plain segment joined to RFC 2231 extended ones must be percent-encoded
    # like them (RFC 2231 §4.1).
    out = []
    for ch in value:
        if _ATTR_CHAR.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def _params(segments: Sequence[str], state: _State) -> list[list[str]]:
    raw: list[tuple[str, str]] = []
    for seg in segments:
        if "=" not in seg:
            continue
        key, _, value = seg.partition("=")
        key = key.strip(" \t\r\n").lower()
        if not key:
            continue
        if len(raw) >= MAX_PARAMS:
            state.limited = True
            break
        raw.append((key, _unquote(value)))
    # RFC 2231 §3: name*0, name*1, ... (and name*0*, extended) form one value.
    groups: dict[str, dict[int, tuple[bool, str]]] = {}
    order: list[tuple[str, str | None]] = []  # (key, value) or (name, None) for a group
    for key, value in raw:
        m = _CONTINUATION.fullmatch(key)
        if m is not None and int(m.group(2)) <= _MAX_CONTINUATION:
            name = m.group(1)
            if name not in groups:
                groups[name] = {}
                order.append((name, None))
            groups[name].setdefault(int(m.group(2)), (bool(m.group(3)), value))
        else:
            order.append((key, value))
    out: list[list[str]] = []
    seen: set[str] = set()
    for key, maybe in order:
        if maybe is None:
            segs = [groups[key][i] for i in sorted(groups[key])]
            if any(ext for ext, _ in segs):
                key = key + "*"
                text = "".join(v if ext else _percent(v) for ext, v in segs)
            else:
                text = "".join(v for _, v in segs)
        else:
            text = maybe
        if key not in seen:
            seen.add(key)
            out.append([key, text])
    return out


def _mime_value(value: str, state: _State) -> tuple[str, list[list[str]]]:
    """``main; k=v; ...`` → (main with white space removed, parameters)."""
    segments = _strip_comments_split(value)
    main = re.sub(r"[ \t\r\n]+", "", segments[0])
    return main, _params(segments[1:], state)


def _simple(value: str | None) -> str | None:
    """A token field (Content-Transfer-Encoding) without comments, lower case."""
    if value is None:
        return None
    return re.sub(r"[ \t\r\n]+", "", _strip_comments_split(value)[0]).lower() or None


# --------------------------------------------------------------------------
# Addresses (RFC 5322 §3.4, lenient; RFC 3501 §7.4.2 form)
# --------------------------------------------------------------------------

_ADDR_TOKEN = re.compile(
    r'[ \t\r\n]+'
    r'|"(?P<q>(?:[^"\\]|\\.)*)"?'
    r'|(?P<l>\[[^\]]*\]?)'
    r'|(?P<sp>[<>@,;:])'
    r'|(?P<c>\()'
    r'|(?P<w>[^ \t\r\n"(<>@,;:\[]+)',
    re.DOTALL,
)


def _comment(value: str, i: int) -> tuple[str, int]:
    """The comment opening at ``value[i]`` (nesting allowed, RFC 5322
    §3.2.2) and the position after it; an unclosed one runs to the end."""
    depth, j, buf = 1, i + 1, []
    n = len(value)
    while j < n:
        ch = value[j]
        if ch == "\\" and j + 1 < n:
            buf.append(value[j + 1])
            j += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return "".join(buf), j + 1
        buf.append(ch)
        j += 1
    return "".join(buf), n


def _addr_tokens(value: str) -> list[tuple[str, str]]:
    """(kind, text) with kind one of w (atom), q (quoted, unescaped), l
    (domain literal), c (comment text), or the special character itself."""
    toks: list[tuple[str, str]] = []
    pos = 0
    while pos < len(value):
        # finditer until a comment, which needs a hand-written scan
        # (nesting); then resume after it.
        for m in _ADDR_TOKEN.finditer(value, pos):
            kind = m.lastgroup
            if kind is None:
                continue  # white space
            if kind == "c":
                text, pos = _comment(value, m.start())
                toks.append(("c", text))
                break
            text = m.group(kind)
            if kind == "q":
                toks.append(("q", _QUOTED_PAIR.sub(r"\1", text) if "\\" in text else text))
            elif kind == "sp":
                toks.append((text, text))
            else:
                toks.append((kind, text))
        else:
            break
    return toks


def _joined(tokens: Sequence[tuple[str, str]], sep: str) -> str:
    return sep.join(text for _, text in tokens)


def _comment_name(comments: Sequence[str]) -> str | None:
    for c in reversed(comments):
        if c.strip():
            return c.strip()
    return None


def _addr_spec(tokens: Sequence[tuple[str, str]]) -> tuple[str, str]:
    ats = [i for i, (k, _) in enumerate(tokens) if k == "@"]
    if not ats:
        return _joined(tokens, "") or MISSING_MAILBOX, MISSING_DOMAIN
    at = ats[-1]
    local = _joined(tokens[:at], "") or MISSING_MAILBOX
    domain = _joined(tokens[at + 1 :], "") or MISSING_DOMAIN
    return local, domain


def _addresses(value: str | None, state: _State) -> list[list[str | None]] | None:
    if value is None:
        return None
    if len(value) > MAX_ADDRESS_FIELD:
        state.limited = True
        value = value[:MAX_ADDRESS_FIELD]
    toks = _addr_tokens(value)
    out: list[list[str | None]] = []
    in_group = False
    i, n = 0, len(toks)
    while i < n:
        if len(out) >= MAX_ADDRESSES:
            state.limited = True
            break
        words: list[tuple[str, str]] = []
        comments: list[str] = []
        while i < n and toks[i][0] not in (",", ";", "<") and not (toks[i][0] == ":" and not in_group):
            if toks[i][0] == "c":
                comments.append(toks[i][1])
            else:
                words.append(toks[i])
            i += 1
        kind = toks[i][0] if i < n else None
        if kind == ":":
            out.append([None, None, _joined(words, " ") or "", None])
            in_group = True
            i += 1
            continue
        if kind == "<":
            i += 1
            inner: list[tuple[str, str]] = []
            while i < n and toks[i][0] != ">":
                if toks[i][0] == "c":
                    comments.append(toks[i][1])
                else:
                    inner.append(toks[i])
                i += 1
            i += 1  # the ">"
            while i < n and toks[i][0] not in (",", ";"):  # junk after the angle address
                if toks[i][0] == "c":
                    comments.append(toks[i][1])
                i += 1
            colons = [k for k, (kind_, _) in enumerate(inner) if kind_ == ":"]
            route = _joined(inner[: colons[-1]], "") or None if colons else None
            local, domain = _addr_spec(inner[colons[-1] + 1 :] if colons else inner)
            name = _joined(words, " ") or _comment_name(comments)
            out.append([name or None, route, local, domain])
        elif words:
            local, domain = _addr_spec(words)
            out.append([_comment_name(comments), None, local, domain])
        if i < n and toks[i][0] == ";":
            if in_group:
                out.append([None, None, None, None])
                in_group = False
            i += 1
        elif i < n and toks[i][0] == ",":
            i += 1
    if in_group:
        out.append([None, None, None, None])
    return out or None


def _envelope(fields: dict[str, str], state: _State) -> dict[str, Any]:
    frm = _addresses(fields.get("from"), state)
    return {
        "date": fields.get("date"),
        "subject": fields.get("subject"),
        "from": frm,
        # RFC 3501 §7.4.2: absent or empty Sender and Reply-To are From.
        "sender": _addresses(fields.get("sender"), state) or frm,
        "reply_to": _addresses(fields.get("reply-to"), state) or frm,
        "to": _addresses(fields.get("to"), state),
        "cc": _addresses(fields.get("cc"), state),
        "bcc": _addresses(fields.get("bcc"), state),
        "in_reply_to": fields.get("in-reply-to"),
        "message_id": fields.get("message-id"),
    }


# --------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------


def _lines(raw: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    n = raw.count(b"\n", start, end)
    return n if raw[end - 1] == 0x0A else n + 1


def _delimiters(raw: bytes, start: int, end: int, boundary: bytes, state: _State) -> list[tuple[int, int, bool]]:
    """Boundary delimiter lines in ``raw[start:end]``: (line start, line end
    incl. its line break, is the close delimiter), up to the close one."""
    delim = b"--" + boundary
    found: list[tuple[int, int, bool]] = []
    misses = 0
    # Only line starts are candidates: search for LF + delimiter, so that
    # occurrences inside lines are skipped at C speed.
    i = start if raw.startswith(delim, start, end) else -1
    search = start  # where the next LF + delimiter may begin
    while len(found) <= MAX_PARTS:
        if i < 0:
            j = raw.find(b"\n" + delim, search, end)
            if j < 0:
                break
            i = j + 1
        pos, k, i = i, i + len(delim), -1
        search = pos  # past this candidate's LF
        close = raw.startswith(b"--", k, end)
        if close:
            k += 2
        while k < end and raw[k] in (0x20, 0x09):  # transport padding
            k += 1
        if k >= end:
            line_end = end
        elif raw[k] == 0x0A:
            line_end = k + 1
        elif raw[k] == 0x0D and (k + 1 == end or raw[k + 1] == 0x0A):
            line_end = min(k + 2, end)
        else:
            misses += 1  # "--boundaryX": another boundary, or text
            if misses > MAX_NEAR_MISSES:
                state.limited = True
                break
            continue
        found.append((pos, line_end, close))
        if close:
            break
        # From the line break that ends this delimiter: the next delimiter
        # may follow at once.
        search = line_end - 1
    return found


def _before_break(raw: bytes, floor: int, at: int) -> int:
    """``at`` moved before the line break that precedes it (RFC 2046 §5.1.1:
    that CRLF belongs to the delimiter), never below ``floor``."""
    if at > floor and raw[at - 1] == 0x0A:
        at -= 1
        if at > floor and raw[at - 1] == 0x0D:
            at -= 1
    return at


def _leaf_as(part: Part, type_: str, subtype: str, params: list[list[str]]) -> None:
    part["type"], part["subtype"], part["params"] = type_, subtype, params
    part["lines"] = None


def _part(raw: bytes, start: int, end: int, depth: int, digest: bool, state: _State, top: bool) -> tuple[Part, dict[str, str]]:
    """The part in ``raw[start:end]`` (its MIME header first) and its header
    fields."""
    state.parts += 1
    hend = _header_end(raw, start, end)
    fields = _fields(raw, start, hend, _WANTED_TOP if top else _WANTED_PART, state)
    ctype = fields.get("content-type")
    main, params = _mime_value(ctype, state) if ctype is not None else ("", [])
    type_, slash, subtype = main.lower().partition("/")
    if not slash or not type_ or not subtype:
        # RFC 2045 §5.2: missing or invalid Content-Type means text/plain
        # in US-ASCII (message/rfc822 in a digest, RFC 2046 §5.1.5).
        if digest:
            type_, subtype, params = "message", "rfc822", []
        else:
            type_, subtype = "text", "plain"
            if ctype is None or not params:
                params = [["charset", "us-ascii"]]
    disposition = None
    if fields.get("content-disposition") is not None:
        dmain, dparams = _mime_value(fields["content-disposition"], state)
        if dmain:
            disposition = [dmain.lower(), dparams]
    language = None
    if fields.get("content-language") is not None:
        langs = [re.sub(r"[ \t\r\n]+", "", x) for x in _strip_comments_split(fields["content-language"].replace(",", ";"))]
        language = [x for x in langs if x] or None
    encoding = _simple(fields.get("content-transfer-encoding")) or "7bit"
    part: Part = {
        "type": type_,
        "subtype": subtype,
        "params": params,
        "id": fields.get("content-id"),
        "description": fields.get("content-description"),
        "encoding": encoding,
        "size": end - hend,
        "lines": None,
        "md5": fields.get("content-md5"),
        "disposition": disposition,
        "language": language,
        "location": fields.get("content-location"),
        "parts": [],
        "envelope": None,
        "body": None,
        "offsets": [start, hend - start, end - hend],
    }
    if type_ == "multipart":
        boundary = next((v for k, v in params if k == "boundary"), "")
        if not boundary:
            # Nothing to split on: the body is one text (as Dovecot does).
            _leaf_as(part, "text", "plain", [["charset", "us-ascii"]])
            part["lines"] = _lines(raw, hend, end)
        elif depth >= MAX_DEPTH:
            state.limited = True
            _leaf_as(part, "application", "octet-stream", [])
        else:
            part["parts"] = _children(raw, hend, end, boundary, depth, subtype == "digest", state)
    elif type_ == "message" and subtype == "rfc822":
        if encoding not in _IDENTITY:
            _leaf_as(part, "application", "octet-stream", params)
        elif depth >= MAX_DEPTH:
            state.limited = True
            _leaf_as(part, "application", "octet-stream", params)
        else:
            inner, inner_fields = _part(raw, hend, end, depth + 1, False, state, True)
            part["envelope"] = _envelope(inner_fields, state)
            part["body"] = inner
            part["lines"] = _lines(raw, hend, end)
    elif type_ == "text":
        part["lines"] = _lines(raw, hend, end)
    return part, fields


def _empty_part(at: int) -> Part:
    return {
        "type": "text", "subtype": "plain", "params": [["charset", "us-ascii"]], "id": None, "description": None,
        "encoding": "7bit", "size": 0, "lines": 0, "md5": None, "disposition": None, "language": None,
        "location": None, "parts": [], "envelope": None, "body": None, "offsets": [at, 0, 0],
    }


def _children(raw: bytes, start: int, end: int, boundary: str, depth: int, digest: bool, state: _State) -> list[Part]:
    delims = _delimiters(raw, start, end, boundary.encode("utf-8", "surrogateescape"), state)
    parts: list[Part] = []
    for n, (_, line_end, close) in enumerate(delims):
        if close:
            break
        if state.parts >= MAX_PARTS:
            state.limited = True
            break
        # Up to the next delimiter (its line break excluded), or to the end
        # of the multipart when the close delimiter is missing.
        stop = _before_break(raw, line_end, delims[n + 1][0]) if n + 1 < len(delims) else end
        parts.append(_part(raw, line_end, stop, depth + 1, digest, state, False)[0])
    # IMAP's body-type-mpart needs at least one part (RFC 3501 §9).
    return parts or [_empty_part(end)]


def summarize(raw: bytes) -> Summary:
    """The summary of a message (see the module docstring); never raises."""
    raw = bytes(raw)
    state = _State()
    try:
        body, fields = _part(raw, 0, len(raw), 0, False, state, True)
        envelope = _envelope(fields, state)
    except (RecursionError, MemoryError, ValueError, IndexError, KeyError, TypeError, UnicodeError):
        # Nothing above should raise on any input (the property tests feed it
        # garbage); if a bug makes it, describe the message as one plain
        # body rather than fail the delivery.
        return _fallback(raw)
    return {
        "v": SUMMARY_VERSION,
        "size": len(raw),
        "header_size": body["offsets"][1],
        "envelope": envelope,
        "body": body,
        "limited": state.limited,
    }


def _fallback(raw: bytes) -> Summary:
    hend = _header_end(raw, 0, len(raw))
    body = _empty_part(0)
    body.update(size=len(raw) - hend, lines=_lines(raw, hend, len(raw)), offsets=[0, hend, len(raw) - hend])
    envelope = {k: None for k in ("date", "subject", "from", "sender", "reply_to", "to", "cc", "bcc",
                                  "in_reply_to", "message_id")}
    return {"v": SUMMARY_VERSION, "size": len(raw), "header_size": hend, "envelope": envelope, "body": body,
            "limited": True}


# --------------------------------------------------------------------------
# Sections (RFC 3501 §6.4.5)
# --------------------------------------------------------------------------


def _is_message(part: Part) -> bool:
    return part.get("body") is not None


def locate(summary: Summary, path: Sequence[int]) -> Part | None:
    """The part a section number names (``(1, 2)`` for ``BODY[1.2]``), or
    None if there is no such part.

    RFC 3501 §6.4.5: a message's parts are its body's parts if that body is
    multipart, else the body alone is part 1; a message/rfc822 part's
    sub-parts are those of the message inside it; a leaf has none.
    """
    if not path:
        return None
    part: Part | None = None
    for number in path:
        if part is None or _is_message(part):
            inner = summary["body"] if part is None else part["body"]
            children = inner["parts"] if inner["type"] == "multipart" else [inner]
        elif part["type"] == "multipart":
            children = part["parts"]
        else:
            return None
        if not 1 <= number <= len(children):
            return None
        part = children[number - 1]
    return part


Section = Literal["", "HEADER", "TEXT", "MIME"]


def section_range(summary: Summary, path: Sequence[int] = (), which: Section = "") -> tuple[int, int] | None:
    """(offset, length) in the raw message of ``BODY[path.which]``, or None
    if the message has no such section.

    ``which`` is "" (the part's body; with an empty path the whole message),
    "HEADER" and "TEXT" (of the message, or of a message/rfc822 part's inner
    message; HEADER.FIELDS filters the HEADER range), or "MIME" (a part's
    own MIME header; needs a path).
    """
    if not path:
        size, head = summary["size"], summary["header_size"]
        if which == "":
            return 0, size
        if which == "HEADER":
            return 0, head
        if which == "TEXT":
            return head, size - head
        return None
    part = locate(summary, path)
    if part is None:
        return None
    start, head, body = part["offsets"]
    if which == "":
        return start + head, body
    if which == "MIME":
        return start, head
    if not _is_message(part):
        return None
    start, head, body = part["body"]["offsets"]
    if which == "HEADER":
        return start, head
    if which == "TEXT":
        return start + head, body
    return None
