"""The web pages' pure parts, without a server: sessions and their clock,
CSRF tokens, vCards, office allowance bounds, autoconfig documents."""

from __future__ import annotations

import plistlib
import xml.etree.ElementTree as ET

import pytest

from postvault.conf.schema import Endpoint
from postvault.policy.schema import (
    AttachmentPolicy,
    OfficeException,
    Policy,
    SessionPolicy,
)
from postvault.store.offices import (
    NEVER_ALLOWABLE,
    allowance_problem,
    office_bounds,
    parse_extensions,
)
from postvault.store.types import AccountSession
from postvault.web import autoconfig
from postvault.web.csrf import CsrfKeys, same
from postvault.web.sessions import MAX_PER_ACCOUNT, SessionStore
from postvault.web.vcard import Card, vcards


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def account(n: int = 1) -> AccountSession:
    return AccountSession(n, f"a{n}@x.test", "member", b"owner", b"p" * 32, b"k" * 32)


def test_sessions_idle_absolute_and_hashing() -> None:
    clock, policy = Clock(), SessionPolicy()
    store = SessionStore(clock, lambda: policy)
    raw, session = store.create(account())
    assert raw.encode() not in session.key and len(session.key) == 32
    assert "private_key" not in repr(session) and session.csrf not in repr(session)
    clock.now += 29 * 60
    assert store.get(raw) is session
    clock.now += 29 * 60
    assert store.get(raw) is session
    clock.now += 31 * 60
    assert store.get(raw) is None and len(store) == 0
    raw, _ = store.create(account())
    start = clock.now
    while clock.now + 20 * 60 < start + 12 * 3600:
        clock.now += 20 * 60
        assert store.get(raw) is not None  # busy all along...
    clock.now = start + 12 * 3600 + 1
    assert store.get(raw) is None  # ...and still over after 12 hours
    assert store.get(None) is None and store.get("") is None and store.get("nope") is None


def test_sessions_rotate_drop_and_caps() -> None:
    clock = Clock()
    store = SessionStore(clock, SessionPolicy)
    raw, mine = store.create(account(1))
    other_raw, _ = store.create(account(1))
    stranger_raw, _ = store.create(account(2))
    old_csrf = mine.csrf
    new_raw = store.rotate(mine)
    assert store.get(raw) is None and store.get(new_raw) is mine and mine.csrf != old_csrf
    assert store.drop_account(1, keep=mine) == 1
    assert store.get(other_raw) is None and store.get(new_raw) is mine and store.get(stranger_raw) is not None
    raws = [store.create(account(3))[0] for _ in range(MAX_PER_ACCOUNT + 5)]
    assert store.get(raws[0]) is None and store.get(raws[-1]) is not None
    alive = len(store)
    clock.now += 31 * 60
    assert store.sweep() == alive and len(store) == 0


def test_csrf_tokens() -> None:
    keys, other = CsrfKeys(), CsrfKeys()
    token = keys.pre_token("cookie-a")
    assert keys.check_pre("cookie-a", token)
    assert not keys.check_pre("cookie-b", token)
    assert not other.check_pre("cookie-a", token)  # a restart's key differs
    assert not keys.check_pre(None, token) and not keys.check_pre("cookie-a", None)
    assert same("abc", "abc") and not same("abc", "abd") and not same("abc", None) and not same("abc", "")
    assert not same("abc", "\udcff")


def test_vcards_escape_and_fold() -> None:
    long = "Zahnarztpraxis Müller-Lüdenscheidt " * 4
    data = vcards([Card("a@b.test", "Dr. A; B, C\\", "X\r\nEMAIL:evil@x.test"), Card("c@d.test", long, "")])
    text = data.decode("utf-8")
    assert text.count("BEGIN:VCARD\r\n") == 2 and text.endswith("END:VCARD\r\n")
    assert "FN:Dr. A\\; B\\, C\\\\\r\n" in text
    assert "\r\nEMAIL:evil" not in text and "ORG:X EMAIL:evil@x.test" in text
    for line in data.split(b"\r\n"):
        assert len(line) <= 75
        line.decode("utf-8")  # folding never splits a character
    unfolded = text.replace("\r\n ", "")
    assert f"FN:{long.strip()}" in unfolded
    assert vcards([]) == b""


def test_office_bounds() -> None:
    attachments = AttachmentPolicy()
    bounds = office_bounds(attachments)
    assert not bounds & NEVER_ALLOWABLE
    assert {"docm", "iso", "xz", "mdb"} <= bounds
    assert {"exe", "dll", "js", "ps1", "bat", "jar", "sh"} & bounds == set()
    assert bounds <= attachments.blocked_extensions
    assert allowance_problem("docm", attachments) is None
    assert "never" in (allowance_problem("exe", attachments) or "")
    assert "not blocked" in (allowance_problem("stl", attachments) or "")
    assert "not a file extension" in (allowance_problem("a.b", attachments) or "")
    assert parse_extensions(" .STL, dcm;stl\tiso ") == ["stl", "dcm", "iso"]
    assert parse_extensions("") == []
    # The admin decides: a narrower blocked list narrows the bounds.
    narrow = AttachmentPolicy(blocked_extensions=frozenset({"exe", "iso"}))
    assert office_bounds(narrow) == {"iso"}


def test_conversation_allowances_bounded_at_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from postvault.store.offices import OfficesStore

    class Fake(OfficesStore):
        def office_allowances(self, members):  # type: ignore[no-untyped-def, override]
            return {"m@x.test": frozenset({"docm", "iso"})}

    policy = Policy(offices={"m@x.test": OfficeException(frozenset({"stl"}))})
    assert Fake().conversation_allowances(["M@x.test", "o@y.test"], policy) == {"docm", "iso", "stl"}
    tightened = Policy(attachments=AttachmentPolicy(blocked_extensions=frozenset({"exe", "docm"})))
    assert Fake().conversation_allowances(["m@x.test"], tightened) == {"docm"}


def _settings() -> autoconfig.MailSettings:
    return autoconfig.MailSettings(
        "mail.example.test",
        (autoconfig.Server("IMAP", 993, "SSL/TLS"), autoconfig.Server("IMAP", 143, "STARTTLS")),
        (autoconfig.Server("SMTP", 587, "STARTTLS"),),
    )


def test_autoconfig_documents() -> None:
    st = _settings()
    root = ET.fromstring(autoconfig.thunderbird_xml(st, "a@b.test"))
    assert root.findtext("./emailProvider/domain") == "b.test"
    [out] = root.findall("./emailProvider/outgoingServer")
    assert (out.findtext("port"), out.findtext("socketType")) == ("587", "STARTTLS")
    ad = autoconfig.autodiscover_xml(st, "a@b.test")
    assert b"<Encryption>TLS</Encryption>" in ad and b"<SSL>on</SSL>" in ad
    assert autoconfig.autodiscover_email(b"<a:EMailAddress> x@y.test </a:EMailAddress>") == "x@y.test"
    assert autoconfig.autodiscover_email(b"<EMailAddress>not-an-address</EMailAddress>") is None
    assert autoconfig.autodiscover_email(b"<EMailAddress>a@b.test</EMailAddress>" + b" " * 20000) is None
    assert autoconfig.checked_address("a@b.test\r\nX: y") is None
    profile = plistlib.loads(autoconfig.mobileconfig(st, "a@b.test", "<Ortho> & Co"))
    assert profile["PayloadContent"][0]["EmailAccountName"] == "<Ortho> & Co"
    assert profile["PayloadUUID"] == plistlib.loads(autoconfig.mobileconfig(st, "a@b.test", "x"))["PayloadUUID"]
    assert Endpoint  # the listener type the settings come from
