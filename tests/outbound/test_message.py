"""Invitation and notification messages: user text can never add a header."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from email import message_from_bytes, policy

import pytest

from postvault.outbound.message import (
    HEADERS,
    SignInRoute,
    UnsafeMessage,
    build_invitation,
    build_notification,
    header_text,
    notification_bytes,
    serialize,
)

ROUTE = SignInRoute("mail.example.test", 993, "SSL/TLS", "https://mail.example.test/")
HOSTILE = [
    "Evil\r\nBcc: evil@x.test",
    "Evil\nBcc: evil@x.test",
    "Evil\rBcc: evil@x.test",
    "=?UTF-8?Q?X=0ABcc:_evil@x.test?=",
    "=?utf-8?b?WApCY2M6IGV2aWxAeC50ZXN0?=",  # "X\nBcc: evil@x.test", base64
    "Evil\u2028Bcc: evil@x.test",
    "Evil\x00Bcc: evil@x.test",
    "Evil\x85Bcc: evil@x.test",
]


def header_lines(raw: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return [line for line in head.split(b"\r\n") if line and line[:1] not in (b" ", b"\t")]


@pytest.mark.parametrize("practice", HOSTILE)
@pytest.mark.parametrize("kind", ["notification", "invitation"])
def test_hostile_practice_name_stays_one_header(practice: str, kind: str) -> None:
    if kind == "notification":
        msg = build_notification(mail_from="no-reply@mail.example.test", to="dr@ortho.test",
                                 sender_practice=practice, route=ROUTE)
    else:
        msg = build_invitation(mail_from="no-reply@mail.example.test", to="dr@ortho.test", member_practice=practice,
                               link="https://mail.example.test/signup/abc", route=ROUTE,
                               expires_at=datetime(2026, 3, 16, tzinfo=timezone.utc))
    raw = serialize(msg)
    lines = header_lines(raw)
    names = sorted(line.split(b":", 1)[0].decode().lower() for line in lines)
    assert names == sorted(h.lower() for h in HEADERS)
    # Read back as a mail client would: one Subject, no Bcc, CRLF only.
    parsed = message_from_bytes(raw, policy=policy.default)
    assert parsed.get_all("Bcc") is None and len(parsed.get_all("Subject")) == 1
    assert "\n" not in str(parsed["Subject"]) and "\r" not in str(parsed["Subject"])
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_header_text_keeps_ordinary_names() -> None:
    assert header_text("  Zahnärzte   Genève & Söhne ") == "Zahnärzte Genève & Söhne"
    assert header_text("A" * 500).endswith("…") and len(header_text("A" * 500)) == 120
    assert header_text("=?UTF-8?Q?X?=") == "= ?UTF-8?Q?X?="


def test_non_ascii_practice_is_encoded_and_readable() -> None:
    msg = build_notification(mail_from="no-reply@mail.example.test", to="dr@ortho.test",
                             sender_practice="Zahnärzte Genève", route=ROUTE)
    raw = serialize(msg)
    assert raw.isascii()  # 7-bit clean: RFC 2047 header, quoted-printable body
    parsed = message_from_bytes(raw, policy=policy.default)
    assert str(parsed["Subject"]) == "New secure message from Zahnärzte Genève"
    assert "Zahnärzte Genève" in parsed.get_content()
    assert parsed["Auto-Submitted"] == "auto-generated"


def test_notification_names_the_route_not_the_message() -> None:
    msg = build_notification(mail_from="no-reply@mail.example.test", to="dr@ortho.test",
                             sender_practice="Smile Dental", route=ROUTE)
    text = message_from_bytes(serialize(msg), policy=policy.default).get_content()
    assert "Smile Dental" in text and "mail.example.test" in text and "993" in text
    assert "https://mail.example.test/" in text


def test_serialize_refuses_a_smuggled_header() -> None:
    msg = build_notification(mail_from="no-reply@mail.example.test", to="dr@ortho.test",
                             sender_practice="Smile", route=ROUTE)
    msg["X-Extra"] = "something we did not build"
    with pytest.raises(UnsafeMessage):
        serialize(msg)


def _without_message_id(raw: bytes) -> bytes:
    return re.sub(rb"\r\nMessage-ID: <[^>\r\n]*>\r\n", b"\r\nMessage-ID: <x>\r\n", raw)


@pytest.mark.parametrize("practice", [None, "Smile Dental", "Zahnärzte Genève", "A" * 300, *HOSTILE])
@pytest.mark.parametrize("to", ["dr@ortho.test", "front.desk+notes@clinic.example.test"])
def test_notification_template_makes_the_builders_bytes(practice: str | None, to: str) -> None:
    when = datetime(2026, 3, 16, 9, 30, tzinfo=timezone.utc)
    built = serialize(build_notification(mail_from="no-reply@mail.example.test", to=to, sender_practice=practice,
                                         route=ROUTE, when=when))
    for _ in range(2):  # the second one comes from the cached template
        fast = notification_bytes(mail_from="no-reply@mail.example.test", to=to, sender_practice=practice,
                                  route=ROUTE, when=when)
        assert _without_message_id(fast) == _without_message_id(built)
    parsed = message_from_bytes(fast, policy=policy.default)
    assert parsed["To"] == to and parsed["Message-ID"].endswith("@mail.example.test>")
    assert sorted(k.lower() for k in parsed.keys()) == sorted(h.lower() for h in HEADERS)


def test_notification_template_ids_differ_and_odd_addresses_take_the_builder() -> None:
    a, b = (notification_bytes(mail_from="no-reply@mail.example.test", to="dr@ortho.test", sender_practice="S",
                               route=ROUTE) for _ in range(2))
    assert message_from_bytes(a)["Message-ID"] != message_from_bytes(b)["Message-ID"]
    long_to = "x" * 64 + "@" + "d" * 60 + ".test"  # "To: " + this is longer than a line may be
    raw = notification_bytes(mail_from="no-reply@mail.example.test", to=long_to, sender_practice="S", route=ROUTE)
    assert _without_message_id(raw).split(b"\r\n\r\n")[1] == _without_message_id(a).split(b"\r\n\r\n")[1]
    assert message_from_bytes(raw, policy=policy.default)["To"] == long_to
