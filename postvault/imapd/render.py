"""IMAP data as bytes: strings, ENVELOPE and BODYSTRUCTURE (RFC 3501 §7.4.2,
§9 ``envelope``, ``body``), from ``structure.Structure``.

Invariants:
- A string is sent quoted when it is short 7-bit text without CR, LF,
  quote or backslash trouble, else as a literal: the output always parses.
- Nothing here decrypts or reads: input is the sealed-at-delivery summary.
"""

from __future__ import annotations

from .structure import Address, Envelope, Part

NIL = b"NIL"


def string(v: str | bytes | None) -> bytes:
    """A quoted string or a literal; NIL for None."""
    if v is None:
        return NIL
    raw = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v
    if len(raw) < 1024 and b"\r" not in raw and b"\n" not in raw and b"\0" not in raw and raw.isascii():
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(raw) + raw


def astring(v: str) -> bytes:
    return string(v)


def _addresses(addrs: list[Address] | None) -> bytes:
    if not addrs:
        return NIL
    return b"(" + b"".join(b"(" + b" ".join(string(x) for x in a) + b")" for a in addrs) + b")"


def envelope(env: Envelope) -> bytes:
    fields = [
        string(env.date), string(env.subject), _addresses(env.from_), _addresses(env.sender),
        _addresses(env.reply_to), _addresses(env.to), _addresses(env.cc), _addresses(env.bcc),
        string(env.in_reply_to), string(env.message_id),
    ]
    return b"(" + b" ".join(fields) + b")"


def _params(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return NIL
    return b"(" + b" ".join(string(k.upper()) + b" " + string(v) for k, v in params) + b")"


def _disposition(part: Part) -> bytes:
    if part.disposition is None:
        return NIL
    kind, params = part.disposition
    return b"(" + string(kind.upper()) + b" " + _params(params) + b")"


def _language(part: Part) -> bytes:
    if not part.language:
        return NIL
    if len(part.language) == 1:
        return string(part.language[0])
    return b"(" + b" ".join(string(x) for x in part.language) + b")"


def body(part: Part, extended: bool) -> bytes:
    """BODYSTRUCTURE (``extended``) or BODY."""
    if part.multipart:
        kids = b"".join(body(p, extended) for p in part.parts) or body(Part(), extended)
        out = kids + b" " + string(part.subtype.upper())
        if extended:
            out += b" " + b" ".join([_params(part.params), _disposition(part), _language(part), string(part.location)])
        return b"(" + out + b")"
    fields = [
        string(part.type.upper()), string(part.subtype.upper()), _params(part.params), string(part.id),
        string(part.description), string(part.encoding.upper()), b"%d" % part.size,
    ]
    if part.type.lower() == "message" and part.subtype.lower() == "rfc822" and part.message is not None:
        fields += [envelope(part.envelope or Envelope()), body(part.message, extended), b"%d" % part.lines]
    elif part.type.lower() == "text":
        fields.append(b"%d" % part.lines)
    if extended:
        fields += [string(part.md5), _disposition(part), _language(part), string(part.location)]
    return b"(" + b" ".join(fields) + b")"
