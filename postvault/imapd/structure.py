"""The MIME structure of a message, as FETCH needs it: the envelope, the
body tree with each part's byte offsets, and the header size.

Normally this comes sealed with the message (``store.summaries``, computed
once at delivery by ``postvault.mime.summary``), so listing a folder never
decrypts a body; :func:`from_summary` turns that dict into these types.
:func:`parse` computes the same from the plaintext, for messages stored
before summaries existed; it runs on a worker thread.

Invariants:
- Offsets are absolute in the raw message: a part's header block is
  ``raw[header_start:body_start]`` and its body ``raw[body_start:body_end]``
  (RFC 3501 §6.4.5: BODY[n.MIME] and BODY[n]).
- Envelope strings are the raw header values, unfolded, never decoded
  (RFC 3501 §7.4.2); addresses are (name, adl, mailbox, host).
"""

from __future__ import annotations

import email.errors
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any

Address = tuple[str | None, str | None, str | None, str | None]


@dataclass
class Envelope:
    date: str | None = None
    subject: str | None = None
    from_: list[Address] | None = None
    sender: list[Address] | None = None
    reply_to: list[Address] | None = None
    to: list[Address] | None = None
    cc: list[Address] | None = None
    bcc: list[Address] | None = None
    in_reply_to: str | None = None
    message_id: str | None = None


@dataclass
class Part:
    type: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=lambda: [("charset", "us-ascii")])
    id: str | None = None
    description: str | None = None
    encoding: str = "7BIT"
    size: int = 0
    lines: int = 0
    md5: str | None = None
    disposition: tuple[str, list[tuple[str, str]]] | None = None
    language: list[str] | None = None
    location: str | None = None
    header_start: int = 0
    body_start: int = 0
    body_end: int = 0
    parts: list[Part] = field(default_factory=list)
    # message/rfc822: the enclosed message's envelope and body.
    envelope: Envelope | None = None
    message: Part | None = None

    @property
    def multipart(self) -> bool:
        return self.type.lower() == "multipart"


@dataclass
class Structure:
    envelope: Envelope
    body: Part
    header_size: int

    def part(self, numbers: tuple[int, ...]) -> Part | None:
        """RFC 3501 §6.4.5 part numbering; None if there is no such part."""
        node = self.body
        for n in numbers:
            if node.multipart:
                if not 1 <= n <= len(node.parts):
                    return None
                node = node.parts[n - 1]
            elif node.message is not None and node.message.multipart:
                inner = node.message
                if not 1 <= n <= len(inner.parts):
                    return None
                node = inner.parts[n - 1]
            elif node.message is not None:
                if n != 1:
                    return None
                node = node.message
            else:
                if n != 1:  # a non-multipart has only part 1: itself
                    return None
        return node


# -- from a sealed summary ---------------------------------------------------


def _g(d: Any, *names: str, default: Any = None) -> Any:
    if not isinstance(d, dict):
        return default
    for n in names:
        if n in d:
            return d[n]
    return default


def _s(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _addrs(v: Any) -> list[Address] | None:
    if not v:
        return None
    return [tuple(_s(x) for x in (list(a) + [None] * 4)[:4]) for a in v]  # type: ignore[misc]


def _params(v: Any) -> list[tuple[str, str]]:
    if not v:
        return []
    if isinstance(v, dict):
        return [(str(k), str(val)) for k, val in v.items()]
    out = []
    if all(isinstance(x, str) for x in v) and len(v) % 2 == 0:
        return [(v[i], v[i + 1]) for i in range(0, len(v), 2)]
    for item in v:
        out.append((str(item[0]), str(item[1])))
    return out


def _envelope(d: Any) -> Envelope:
    if isinstance(d, (list, tuple)):
        vals = list(d) + [None] * 10
        return Envelope(_s(vals[0]), _s(vals[1]), _addrs(vals[2]), _addrs(vals[3]), _addrs(vals[4]),
                        _addrs(vals[5]), _addrs(vals[6]), _addrs(vals[7]), _s(vals[8]), _s(vals[9]))
    return Envelope(
        _s(_g(d, "date")), _s(_g(d, "subject")), _addrs(_g(d, "from", "from_")), _addrs(_g(d, "sender")),
        _addrs(_g(d, "reply-to", "reply_to")), _addrs(_g(d, "to")), _addrs(_g(d, "cc")), _addrs(_g(d, "bcc")),
        _s(_g(d, "in-reply-to", "in_reply_to")), _s(_g(d, "message-id", "message_id")),
    )


def _part(d: Any) -> Part:
    disp = _g(d, "disposition")
    disposition = None
    if isinstance(disp, dict):
        disposition = (str(_g(disp, "type", "value", default="attachment")), _params(_g(disp, "params")))
    elif isinstance(disp, (list, tuple)) and disp:
        disposition = (str(disp[0]), _params(disp[1] if len(disp) > 1 else None))
    elif isinstance(disp, str):
        disposition = (disp, [])
    lang = _g(d, "language")
    offsets = _g(d, "offsets") or [0, 0, 0]
    start, head_len, body_len = (int(x or 0) for x in (list(offsets) + [0, 0, 0])[:3])
    p = Part(
        type=str(_g(d, "type", default="text")),
        subtype=str(_g(d, "subtype", default="plain")),
        params=_params(_g(d, "params", "parameters")),
        id=_s(_g(d, "id")),
        description=_s(_g(d, "description")),
        encoding=str(_g(d, "encoding", default="7bit")),
        size=int(_g(d, "size", default=0) or 0),
        lines=int(_g(d, "lines", default=0) or 0),
        md5=_s(_g(d, "md5")),
        disposition=disposition,
        language=[lang] if isinstance(lang, str) else (list(lang) if lang else None),
        location=_s(_g(d, "location")),
        header_start=start,
        body_start=start + head_len,
        body_end=start + head_len + body_len,
    )
    p.parts = [_part(c) for c in (_g(d, "parts") or [])]
    inner = _g(d, "body")
    if isinstance(inner, dict):
        # message/rfc822: the enclosed message's envelope and body part.
        p.envelope = _envelope(_g(d, "envelope") or {})
        p.message = _part(inner)
    return p


def from_summary(summary: dict[str, Any]) -> Structure:
    return Structure(_envelope(summary.get("envelope") or {}), _part(summary.get("body") or {}),
                     int(summary.get("header_size") or 0))


# -- from the plaintext ---------------------------------------------------------

_BLANK = re.compile(rb"\r?\n\r?\n")
MAX_DEPTH = 20


def _header_end(raw: bytes, start: int, end: int) -> int:
    """Offset where the body starts (after the blank line)."""
    if raw.startswith(b"\r\n", start) or raw.startswith(b"\n", start):
        return start + (2 if raw.startswith(b"\r\n", start) else 1)
    m = _BLANK.search(raw, start, end)
    return m.end() if m else end


def _unfold(v: str | None) -> str | None:
    if v is None:
        return None
    return re.sub(r"\r?\n[ \t]", " ", v).strip()


def _addr_list(msg: Message, name: str) -> list[Address] | None:
    values = msg.get_all(name)
    if not values:
        return None
    out: list[Address] = []
    for display, address in getaddresses([_unfold(str(v)) or "" for v in values]):
        if not address and not display:
            continue
        local, at, host = address.rpartition("@")
        if not at:
            local, host = address, None
        out.append((display or None, None, local or None, host))
    return out or None


def envelope_of(msg: Message) -> Envelope:
    def one(name: str) -> str | None:
        v = msg.get(name)
        return _unfold(str(v)) if v is not None else None

    from_ = _addr_list(msg, "From")
    # RFC 3501 §7.4.2: sender and reply-to default to from.
    return Envelope(one("Date"), one("Subject"), from_, _addr_list(msg, "Sender") or from_,
                    _addr_list(msg, "Reply-To") or from_, _addr_list(msg, "To"), _addr_list(msg, "Cc"),
                    _addr_list(msg, "Bcc"), one("In-Reply-To"), one("Message-ID"))


# What the email package's parameter parser raises on hostile headers
# ("name*1=a; name*=b": TypeError sorting RFC 2231 sections, found by
# fuzz/mime.py); such a header is read as having no parameters.
_EMAIL_ERRORS = (email.errors.MessageError, IndexError, KeyError, ValueError, TypeError, AttributeError,
                 LookupError)


def _header_params(msg: Message, header: str) -> list[tuple[str, Any]] | None:
    """``msg.get_params(header=...)``, or None if the email package fails on it."""
    try:
        return msg.get_params(header=header)
    except _EMAIL_ERRORS:
        return None


def _parse_part(raw: bytes, start: int, end: int, default_type: tuple[str, str], depth: int) -> tuple[Part, Message]:
    body_start = _header_end(raw, start, end)
    msg = BytesHeaderParser(policy=compat32).parsebytes(raw[start:body_start])

    def get(name: str) -> str | None:
        # compat32 gives a Header object, not a str, for a value with 8-bit
        # bytes (fuzz/mime.py found it).
        value = msg.get(name)
        return None if value is None else str(value)

    ctype = msg.get_content_type() if msg.get("Content-Type") else "/".join(default_type)
    maintype, _, subtype = ctype.partition("/")
    params = [(k, v) for k, v in (_header_params(msg, "Content-Type") or [])[1:]] if msg.get("Content-Type") else []
    if maintype == "text" and not any(k.lower() == "charset" for k, _ in params):
        params.append(("charset", "us-ascii"))
    disp = None
    if msg.get("Content-Disposition"):
        dparams = _header_params(msg, "Content-Disposition") or []
        if dparams:
            disp = (dparams[0][0], [(k, str(v)) for k, v in dparams[1:]])
    body = raw[body_start:end]
    part = Part(
        type=maintype, subtype=subtype, params=[(k, str(v)) for k, v in params],
        id=_unfold(get("Content-ID")), description=_unfold(get("Content-Description")),
        encoding=(get("Content-Transfer-Encoding") or "7BIT").strip().upper(),
        size=end - body_start, lines=body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0),
        md5=_unfold(get("Content-MD5")), disposition=disp,
        language=[x.strip() for x in str(msg.get("Content-Language")).split(",")] if msg.get("Content-Language") else None,
        location=_unfold(get("Content-Location")),
        header_start=start, body_start=body_start, body_end=end,
    )
    if depth >= MAX_DEPTH:
        return part, msg
    if maintype == "multipart":
        boundary = next((v for k, v in (_header_params(msg, "Content-Type") or [])[1:] if k.lower() == "boundary"), None)
        if boundary:
            child_default = ("message", "rfc822") if subtype == "digest" else ("text", "plain")
            for s, e in _split(raw, body_start, end, str(boundary).encode("utf-8", "replace")):
                child, _ = _parse_part(raw, s, e, child_default, depth + 1)
                part.parts.append(child)
        if not part.parts:
            part.parts.append(Part(header_start=body_start, body_start=body_start, body_end=body_start))
    elif ctype == "message/rfc822":
        inner, inner_msg = _parse_part(raw, body_start, end, ("text", "plain"), depth + 1)
        part.message = inner
        part.envelope = envelope_of(inner_msg)
    return part, msg


def _split(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Child (start, end) ranges of a multipart body (RFC 2046 §5.1.1): the
    CRLF before a delimiter belongs to the delimiter."""
    delim = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|\Z)", re.M)
    out = []
    cur = None
    for m in delim.finditer(raw, start, end):
        if cur is not None:
            out.append((cur, m.start()))
        if m.group(1):
            cur = None
            break
        cur = m.end()
    if cur is not None:
        out.append((cur, end))
    return out


def parse(raw: bytes) -> Structure:
    body, msg = _parse_part(raw, 0, len(raw), ("text", "plain"), 0)
    return Structure(envelope_of(msg), body, body.body_start)
