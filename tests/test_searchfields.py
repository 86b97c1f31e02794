"""postvault/mime/searchfields.py: the shortcut in ``decoded`` gives what
the full RFC 2047 decoding gives, and an index entry answers as the parsed
header does (the corpus in tests/searchcorpus.py)."""

from __future__ import annotations

import random
import string
from email.header import decode_header, make_header

from postvault.mime.searchfields import Fields, decoded, entry_of, header_has, parse_header

from tests.searchcorpus import CORPUS, SEARCHES


def test_values_without_encoded_words_decode_to_themselves() -> None:
    rng = random.Random(5)
    alphabet = string.printable + "  \t=?"
    tried = 0
    for _ in range(20000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert decoded(value) == str(make_header(decode_header(value))), repr(value)
        tried += "=?" not in value
    assert tried > 5000  # most of them took the shortcut


def test_entries_answer_like_the_header() -> None:
    checked = 0
    for raw in CORPUS:
        msg = parse_header(raw[: raw.find(b"\r\n\r\n") + 4])
        fields = Fields.parse(entry_of(msg))
        assert fields is not None
        for _, key in SEARCHES:
            if key[0] in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
                name, needle = key[0].capitalize() if key[0] != "BCC" else "Bcc", key[1]
            elif key[0] == "HEADER" and key[1].lower() in ("subject", "message-id"):
                name, needle = key[1], key[2]
            else:
                continue
            assert fields.has(name, needle) == header_has(msg, name, needle), (raw[:60], key)
            checked += 1
    assert checked > 200
    assert Fields.parse(b"") is None and Fields.parse(b"\x02" + bytes(60)) is None


def test_header_parse_matches_the_full_parser() -> None:
    import email
    import email.policy

    multipart = (b"From: a@dental.test\r\nSubject: scan\r\nMIME-Version: 1.0\r\n"
                 b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n')
    for raw in [*CORPUS, multipart]:
        head = raw[: raw.find(b"\r\n\r\n") + 4]
        full = email.message_from_bytes(head, policy=email.policy.compat32)
        assert parse_header(head).items() == full.items()
