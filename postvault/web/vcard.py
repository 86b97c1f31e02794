"""Contacts as vCard 4.0 (RFC 6350), for import into a mail program.

User text (names, practices: from a PMS export or typed by a person) goes
through ``_text``: control characters become spaces (a raw CR/LF would
start a new property), and backslash, comma, semicolon are escaped as
§3.4 says. Lines are folded at 75 octets, never inside a UTF-8 sequence
(§3.2), and end in CRLF.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    email: str
    name: str = ""
    practice: str = ""


def _clean(text: str) -> str:
    out = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") else c for c in text)
    return " ".join(out.split())


def _text(text: str) -> str:
    return _clean(text).replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")


def _fold(line: str) -> list[str]:
    data = line.encode("utf-8")
    out: list[str] = []
    limit = 75
    while len(data) > limit:
        cut = limit
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # not inside a character
            cut -= 1
        out.append(data[:cut].decode("utf-8"))
        data = data[cut:]
        limit = 74  # continuation lines start with one space
    out.append(data.decode("utf-8"))
    return [out[0], *(" " + part for part in out[1:])]


def vcards(cards: Iterable[Card]) -> bytes:
    lines: list[str] = []
    for card in cards:
        email = _clean(card.email)
        name = _text(card.name) or _text(card.practice) or _text(email)
        props = ["BEGIN:VCARD", "VERSION:4.0", f"FN:{name}"]
        if card.practice:
            props.append(f"ORG:{_text(card.practice)}")
        props += [f"EMAIL;TYPE=work:{_text(email)}", "END:VCARD"]
        for prop in props:
            lines += _fold(prop)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8") if lines else b""
