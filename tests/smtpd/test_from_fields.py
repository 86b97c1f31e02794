"""The From check reads From and Sender through ``_from_fields`` (compat32
splits the fields, the default policy builds only those two header
objects) instead of a whole ``email.policy.default`` parse: the same
objects, so the same decisions. Compared here with that parse, over the
spoofing shapes of tests/security/test_relay_and_spoofing.py and random
combinations of hostile pieces (folding, encoded words, 8-bit bytes, bare
CR/LF, odd Content-Types, fields without a colon)."""

from __future__ import annotations

import email.policy
import random
from email.parser import HeaderParser

from postvault.smtpd.handler import _check_from, _from_fields

ACCOUNT = "office@dental.test"

PIECES = [
    b"From: office@dental.test\r\n",
    b"From: Smile Dental <Office@Dental.test>\r\n",
    b"From: front@clinic.test\r\n",
    b"From : front@clinic.test\r\n",
    b"From\t: front@clinic.test\r\n",
    b" From: front@clinic.test\r\n",
    b"From: office@dental.test,\r\n front@clinic.test\r\n",
    b'From: "front@clinic.test" <office@dental.test>\r\n',
    b"From: =?utf-8?b?ZnJvbnRAY2xpbmljLnRlc3Q=?= <office@dental.test>\r\n",
    b"From: =?utf-8?b?ZnJvbnRAY2xpbmljLnRlc3Q=?=\r\n",
    b"From: (front@clinic.test) office@dental.test\r\n",
    b"From: <front@clinic.test>office@dental.test\r\n",
    b"From: Dr. Smith <office@dental.test>\r\n",
    b"From: =?utf-8?q?Smile_D=C3=A9ntal?= <office@dental.test>\r\n",
    b"From: \xc3\xa9cole <office@dental.test>\r\n",
    b"From: \xff\xfe <office@dental.test>\r\n",
    b"From: office@dental.test\r",
    b"From: office@dental.test\n",
    b"From:\r\n\toffice@dental.test\r\n",
    b"From: <>\r\n",
    b"From: office@\r\n",
    b"From: \"unterminated <office@dental.test>\r\n",
    b"From: office@dental.test (comment (nested) \r\n",
    b"From: group: office@dental.test;\r\n",
    b"FROM: office@dental.test\r\n",
    b"Sender: office@dental.test\r\n",
    b"Sender: front@clinic.test\r\n",
    b"Sender : front@clinic.test\r\n",
    b"Sender: \r\n",
    b"Subject: x\r\n",
    b"Subject: =?utf-8?q?=E2=80=AE?=\r\n",
    b"To: dr@ortho.test\r\n",
    b"Content-Type: multipart/mixed\r\n",
    b"Content-Type: text/plain; charset=\"utf-8\"\r\n",
    b"Content-Type: ;;;=\"\r\n",
    b"Content-Type: text/plain; name*0*=utf-8''%FF; name*1=x\r\n",
    b"Content-Type: \x00/\xff\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"not a header line\r\n",
    b":no name\r\n",
    b"X-Long: " + b"a" * 1200 + b"\r\n",
    b"\tcontinued\r\n",
    b"\r\n",
]


def _reference(head: bytes) -> tuple[list[object], list[object]] | str:
    """What the check read before: a whole default-policy parse."""
    try:
        msg = HeaderParser(policy=email.policy.default).parsestr(head.decode("utf-8", "surrogateescape"))
        return msg.get_all("From") or [], msg.get_all("Sender") or []
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return type(exc).__name__


def _ours(head: bytes) -> tuple[list[object], list[object]] | str:
    try:
        return _from_fields(head.decode("utf-8", "surrogateescape"))
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return type(exc).__name__


def _shape(fields: tuple[list[object], list[object]] | str) -> object:
    if isinstance(fields, str):
        return fields
    out = []
    for headers in fields:
        for h in headers:
            try:
                addresses = [(a.display_name, a.addr_spec) for a in h.addresses]  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                addresses = [type(exc).__name__]
            out.append((type(h).__name__, h.name, str(h),  # type: ignore[attr-defined]
                        [(type(d).__name__, str(d)) for d in h.defects], addresses))  # type: ignore[attr-defined]
        out.append("|")
    return out


def _heads() -> list[bytes]:
    rng = random.Random(20261127)
    heads = [p + b"To: dr@ortho.test\r\n\r\n" for p in PIECES]
    for _ in range(1500):
        heads.append(b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6))))
    return heads


def test_from_fields_are_the_default_policys() -> None:
    for head in _heads():
        assert _shape(_ours(head)) == _shape(_reference(head)), head


def _reference_check(head: bytes) -> tuple[str, str] | None:
    """``_check_from`` as it read the fields before (a default-policy parse)."""
    from postvault.smtpd import handler

    def whole_parse(text: str) -> tuple[list[object], list[object]]:
        msg = HeaderParser(policy=email.policy.default).parsestr(text)
        return msg.get_all("From") or [], msg.get_all("Sender") or []

    saved = handler._from_fields
    handler._from_fields = whole_parse  # type: ignore[assignment]
    try:
        return _check_from(head, ACCOUNT)
    finally:
        handler._from_fields = saved


def test_from_check_decides_as_before() -> None:
    decided = set()
    for head in _heads():
        ours = _check_from(head, ACCOUNT)
        assert ours == _reference_check(head), head
        decided.add(ours[0] if ours else None)
    # The corpus reaches every outcome, so the comparison means something.
    assert decided >= {None, "header.from-unreadable", "header.from-not-account", "header.from-missing",
                       "header.sender-not-account"}

