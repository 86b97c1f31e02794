"""Messages with awkward headers, and header searches over them, for the
SEARCH index tests (tests/store/test_search_index.py,
tests/imapd/test_search_index.py).

``expected(raw_messages, key)`` answers a search the way SEARCH did before
the index existed: the header decrypted and parsed, then
``searchfields.header_has`` / ``sent_date`` (the former ``search.py``
functions, moved unchanged), so the index must give the same answers.
"""

from __future__ import annotations

from datetime import date

from postvault.mime.searchfields import header_has, parse_header, sent_date


def _msg(headers: list[str], body: str = "Hello.\r\n") -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8", "surrogateescape")


CORPUS: list[bytes] = [
    # Plain ASCII.
    _msg(["From: Office <office@dental.test>", "To: dr@ortho.test", "Subject: Referral for X-ray",
          "Date: Mon, 02 Mar 2026 10:00:00 +0000", "Message-ID: <a1@dental.test>"]),
    # RFC 2047 encoded words (Q and B), split over a folded line.
    _msg(["From: =?utf-8?q?Dr=2E_J=C3=BCrgen_M=C3=BCller?= <jm@ortho.test>", "To: office@dental.test",
          "Subject: =?utf-8?q?R=C3=B6ntgen_Befund?=\r\n =?utf-8?b?IGbDvHIgUGF0aWVudA==?=",
          "Date: Tue, 03 Mar 2026 23:30:00 -0500", "Message-ID: <a2@ortho.test>"]),
    # Several From, To and Cc fields; several addresses in one.
    _msg(["From: a@one.test", "From: b@two.test", "To: x@dental.test, Y Person <y@dental.test>",
          "To: z@dental.test", "Cc: CC One <cc1@clinic.test>", "Cc: cc2@clinic.test",
          "Subject: Many people", "Date: Wed, 04 Mar 2026 08:00:00 +0100"]),
    # Missing Subject, To and Date; a Bcc.
    _msg(["From: lonely@dental.test", "Bcc: Hidden <hidden@ortho.test>", "Message-ID: <a4@dental.test>"]),
    # An empty Subject field (present, empty).
    _msg(["From: empty@dental.test", "To: dr@ortho.test", "Subject: ", "Date: Thu, 05 Mar 2026 12:00:00 +0000"]),
    # Raw 8-bit UTF-8 in headers (not encoded), Greek and German sharp s.
    _msg(["From: Γιώργος <giorgos@ortho.test>", "To: office@dental.test", "Subject: Straße und ΩΜΕΓΑ",
          "Date: Fri, 06 Mar 2026 09:00:00 +0200"]),
    # Latin-1 encoded word and a broken encoded word; an unparseable Date.
    _msg(["From: =?iso-8859-1?q?Fran=E7ois?= <fr@clinic.test>", "To: office@dental.test",
          "Subject: =?utf-8?q?broken=ZZ?= and =?bogus-charset?q?x?=", "Date: not a date"]),
    # A distinctive subject in mixed case, and a second Subject field.
    _msg(["From: Office <office@dental.test>", "To: dr@ortho.test", "Subject: Quarterly PANORAMIC review",
          "Subject: second subject line", "Date: Sat, 07 Mar 2026 00:30:00 +1300",
          "Message-ID: <a8@dental.test>"]),
    # A NUL inside a decoded value (the entry joins values with NUL).
    _msg(["From: nul@dental.test", "To: first@dental.test", "To: second@dental.test",
          "Subject: =?utf-8?q?nul=00inside?="]),
    # Undecodable octets (Latin-1 bytes, not UTF-8) in the Subject.
    ("From: raw@dental.test\r\nTo: dr@ortho.test\r\nSubject: caf\xe9 cr\xe8me\r\n\r\nBody\r\n").encode("latin-1"),
]

# (IMAP search key text, the key as (name, args) for ``expected``).
SEARCHES: list[tuple[str, tuple[str, ...]]] = [
    ('SUBJECT "x-RAY"', ("SUBJECT", "x-RAY")),
    ('SUBJECT "röntgen"', ("SUBJECT", "röntgen")),
    ('SUBJECT "FÜR PATIENT"', ("SUBJECT", "FÜR PATIENT")),
    ('SUBJECT "strasse"', ("SUBJECT", "strasse")),
    ('SUBJECT "ωμεγα"', ("SUBJECT", "ωμεγα")),
    ('SUBJECT "panoramic"', ("SUBJECT", "panoramic")),
    ('SUBJECT "second subject"', ("SUBJECT", "second subject")),
    ('SUBJECT ""', ("SUBJECT", "")),
    ('SUBJECT "broken"', ("SUBJECT", "broken")),
    ('SUBJECT "caf"', ("SUBJECT", "caf")),
    ('FROM "müller"', ("FROM", "müller")),
    ('FROM "b@two"', ("FROM", "b@two")),
    ('FROM "françois"', ("FROM", "françois")),
    ('FROM "ΓΙΏΡΓΟΣ"', ("FROM", "ΓΙΏΡΓΟΣ")),
    ('TO "y person"', ("TO", "y person")),
    ('TO "z@"', ("TO", "z@")),
    ('TO "office"', ("TO", "office")),
    ('CC "cc2@"', ("CC", "cc2@")),
    ('CC "one"', ("CC", "one")),
    ('BCC "hidden"', ("BCC", "hidden")),
    ('HEADER Subject "review"', ("HEADER", "Subject", "review")),
    ('HEADER message-id "<a"', ("HEADER", "message-id", "<a")),
    ('HEADER Message-ID ""', ("HEADER", "Message-ID", "")),
    ('HEADER Date "2026"', ("HEADER", "Date", "2026")),
    ('HEADER X-Nothing ""', ("HEADER", "X-Nothing", "")),
    ("SENTSINCE 4-Mar-2026", ("SENTSINCE", "2026-03-04")),
    ("SENTBEFORE 4-Mar-2026", ("SENTBEFORE", "2026-03-04")),
    ("SENTON 3-Mar-2026", ("SENTON", "2026-03-03")),
    ("SENTON 7-Mar-2026", ("SENTON", "2026-03-07")),
    ('NOT SUBJECT "x-ray"', ("NOT", "SUBJECT", "x-ray")),
    ('SUBJECT "nul"', ("SUBJECT", "nul")),
    ('SUBJECT "inside"', ("SUBJECT", "inside")),
    ('TO "first@dental.test"', ("TO", "first@dental.test")),
    ('TO "test second"', ("TO", "test second")),
]


def matches(raw: bytes, key: tuple[str, ...]) -> bool:
    msg = parse_header(raw[: raw.find(b"\r\n\r\n") + 4])
    name = key[0]
    if name == "NOT":
        return not matches(raw, key[1:])
    if name in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        return header_has(msg, name.capitalize() if name != "BCC" else "Bcc", key[1])
    if name == "HEADER":
        return header_has(msg, key[1], key[2])
    sent = sent_date(msg)
    ref = date.fromisoformat(key[1])
    if sent is None:
        return False
    return {"SENTSINCE": sent >= ref, "SENTBEFORE": sent < ref, "SENTON": sent == ref}[name]


def expected(raws: list[bytes], key: tuple[str, ...]) -> list[int]:
    """1-based positions (= UIDs in a fresh folder) of the messages that match."""
    return [i for i, raw in enumerate(raws, 1) if matches(raw, key)]
