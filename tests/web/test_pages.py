"""The HTTPS account pages over real TLS against ``postvault serve``: every
page, the security headers on every response, cookie flags, CSRF refusals
(nothing changed), sign-up links (good, expired, used, replaced, unknown),
throttled logins, idle and absolute session expiry, injection through
practice names, office attachment settings, autoconfig/autodiscover."""

from __future__ import annotations

import base64
import imaplib
import plistlib
import re
import time
import xml.etree.ElementTree as ET
from datetime import timedelta
from urllib.parse import quote

import pytest
from sqlalchemy import select

from postvault.policy.attachments import check_attachments
from postvault.policy.load import load_policy
from postvault.store.models import AuditEvent
from postvault.web.http import SECURITY_HEADERS

from .conftest import HOST, PASSWORD, Client, Reply, Server

NEW_PASSWORD = "violet tractor harbour seventeen"


def audit_events(server: Server, event: str, account: str) -> list[AuditEvent]:
    with server.store._sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == event, AuditEvent.account == account)))


def assert_secure(reply: Reply) -> None:
    for name, value in SECURITY_HEADERS:
        assert reply.header(name) == value, (name, reply.status)
    assert "Twisted" not in (reply.header("Server") or "")


# -- headers, cookies, plain routing -------------------------------------------


def test_security_headers_on_every_response(server: Server, web: Client, member: str) -> None:
    replies = [
        web.get("/"), web.get("/login"), web.get("/static/style.css"), web.get("/no/such/page"),
        web.request("HEAD", "/login"), web.request("PUT", "/login"), web.post("/login", {"email": "x"}),
        web.get("/signup/not-a-token"), web.get("/.well-known/autoconfig/mail/config-v1.1.xml"),
        web.request("POST", "/autodiscover/autodiscover.xml", b"<x/>", {"Content-Type": "text/xml"}),
        web.get("/account"),
    ]
    web.login(member)
    for path in ("/account", "/mailbox", "/password", "/contacts", "/contacts.vcf", "/office", "/setup",
                 "/setup/config-v1.1.xml", "/setup/postvault.mobileconfig"):
        replies.append(web.get(path))
    statuses = [r.status for r in replies]
    assert statuses[:11] == [303, 200, 200, 404, 200, 405, 403, 404, 200, 200, 303]
    assert all(s == 200 for s in statuses[11:]), statuses
    for reply in replies:
        assert_secure(reply)
    css = replies[2]
    assert css.header("Content-Type") == "text/css; charset=utf-8"
    assert replies[5].header("Allow") == "GET, POST"
    for reply in replies:
        if reply.header("Content-Type", ) and reply.header("Content-Type").startswith("text/html"):
            assert reply.header("Cache-Control") == "no-store"
            # No inline script or style anywhere (the CSP would block it anyway).
            assert "<script" not in reply.text and "style=" not in reply.text and "<style" not in reply.text


def test_cookie_flags(server: Server, web: Client, member: str) -> None:
    first = web.get("/login")
    [pre] = first.set_cookies
    login = web.post("/login", {"email": member, "password": PASSWORD}, first.csrf())
    assert login.status == 303 and login.header("Location") == "/account"
    [session] = login.set_cookies
    for raw in (pre, session):
        name = raw.split("=", 1)[0]
        assert name.startswith("__Host-")
        flags = [p.strip() for p in raw.split(";")[1:]]
        assert set(flags) >= {"Path=/", "Secure", "HttpOnly", "SameSite=Strict"}
        assert not any(f.lower().startswith("domain") for f in flags)
    # 256-bit random session id, and only its hash is kept by the server.
    value = session.split(";")[0].split("=", 1)[1]
    assert len(value) >= 43


def test_not_found_and_too_large(web: Client) -> None:
    assert web.get("/admin").status == 404
    big = web.request("POST", "/login", b"a=" + b"x" * (70 * 1024),
                      {"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status == 413
    assert_secure(big)


# -- log in, log out, throttling -----------------------------------------------


def test_login_logout(server: Server, web: Client, member: str) -> None:
    assert web.get("/account").header("Location") == "/login"
    page = web.get("/login")
    bad = web.post("/login", {"email": member, "password": "wrong password here"}, page.csrf())
    assert bad.status == 422 and "wrong" in bad.text
    web.login(member)
    account = web.get("/account")
    assert account.status == 200 and member in account.text and "Member office" in account.text
    stolen = dict(web.cookies)
    out = web.post("/logout", {}, account.csrf())
    assert out.status == 303 and out.header("Location") == "/login?done=bye"
    assert "__Host-pv_session" not in web.cookies
    assert "You are logged out" in web.get("/login?done=bye").text
    # The old cookie is dead on the server, not only forgotten by the browser.
    replay = Client(server.https, server.context(), stolen)
    assert replay.get("/account").status == 303
    assert audit_events(server, "login.ok", member)


def test_login_throttled_after_failures(server: Server, web: Client) -> None:
    email = server.account("member")
    policy = load_policy(server.home / "conf" / "policy.toml").auth
    token = web.get("/login").csrf()
    for _ in range(policy.throttle_after):
        assert web.post("/login", {"email": email, "password": "not the password"}, token).status == 422
    limited = web.post("/login", {"email": email, "password": PASSWORD}, token)
    assert limited.status == 429, limited.status
    assert limited.header("Retry-After")
    assert "__Host-pv_session" not in web.cookies
    [event] = audit_events(server, "login.limited", email)[-1:]
    assert event.protocol == "web"


# -- CSRF ------------------------------------------------------------------------


def test_csrf_missing_or_wrong_is_refused_and_changes_nothing(server: Server, web: Client) -> None:
    email = server.account("member", practice="Before Dental")
    web.login(email)
    token = web.get("/account").csrf()
    other = server.client()
    other.login(email)
    other_token = other.get("/account").csrf()
    assert other_token != token
    change = {"practice": "After Dental", "timezone": "Europe/Paris", "notify_address": ""}
    for bad in (None, "", "x" * 43, other_token, token[:-1]):
        reply = web.post("/account", change, bad)
        assert reply.status == 403, bad
        assert_secure(reply)
        assert "Nothing was changed" in reply.text
    for path in ("/mailbox", "/password", "/contacts/add", "/contacts/remove", "/office", "/logout"):
        assert web.post(path, {"email": "x@y.test", "mailbox_name": "X", "extensions": "docm"}, "nope").status == 403
    info = server.store.get_account(email)
    assert (info.practice_name, info.timezone) == ("Before Dental", "UTC")
    assert web.get("/account").status == 200  # still logged in
    assert web.post("/account", change, token).status == 303
    assert server.store.get_account(email).practice_name == "After Dental"


def test_login_form_needs_its_pre_session_token(server: Server, member: str) -> None:
    web = server.client()
    token = web.get("/login").csrf()
    # Without the cookie the token belongs to, or with another one's token.
    bare = server.client()
    assert bare.post("/login", {"email": member, "password": PASSWORD}, token).status == 403
    other = server.client()
    other.get("/login")
    assert other.post("/login", {"email": member, "password": PASSWORD}, token).status == 403
    assert web.post("/login", {"email": member, "password": PASSWORD}, None).status == 403
    assert web.post("/login", {"email": member, "password": PASSWORD}, token).status == 303


# -- session expiry ----------------------------------------------------------------


def test_idle_expiry(clock: Server) -> None:
    web = clock.client()
    web.login(clock.account("member"))
    clock.move_clock(29 * 60)
    assert web.get("/account").status == 200  # activity restarts the idle timer
    clock.move_clock(29 * 60 + 29 * 60)
    assert web.get("/account").status == 200
    clock.move_clock(29 * 60 + 29 * 60 + 31 * 60)
    reply = web.get("/account")
    assert reply.status == 303 and reply.header("Location") == "/login"


def test_absolute_expiry(clock: Server) -> None:
    web = clock.client()
    web.login(clock.account("member"))
    offset = 0
    while offset < 12 * 3600 - 20 * 60:
        offset += 20 * 60
        clock.move_clock(offset)
        assert web.get("/account").status == 200, offset
    clock.move_clock(12 * 3600 + 60)
    assert web.get("/account").status == 303


def test_post_after_expiry_changes_nothing(clock: Server) -> None:
    web = clock.client()
    email = clock.account("member", practice="Kept Dental")
    web.login(email)
    token = web.get("/account").csrf()
    clock.move_clock(31 * 60)
    reply = web.post("/account", {"practice": "Lost", "timezone": "UTC", "notify_address": ""}, token)
    assert reply.status == 303 and reply.header("Location") == "/login?done=expired"
    assert clock.store.get_account(email).practice_name == "Kept Dental"


# -- sign-up -------------------------------------------------------------------------


def _invite(server: Server, member: str, ttl: timedelta = timedelta(days=14)) -> tuple[str, str]:
    n = int(time.monotonic() * 1000)
    colleague = f"invitee{n}@ortho{n}.test"
    token = server.store.invite(member, colleague, ttl=ttl)
    assert token
    return colleague, token


def test_signup_page_and_rules(server: Server, web: Client) -> None:
    member = server.account("member", practice="Smile <Dental> & Co")
    colleague, token = _invite(server, member)
    page = web.get(f"/signup/{token}")
    assert page.status == 200
    assert "Smile &lt;Dental&gt; &amp; Co" in page.text and colleague in page.text
    assert page.text.count("<option") > 300  # the zoneinfo list
    csrf = page.csrf()
    form = {"practice": "Ortho Partners", "timezone": "America/Chicago", "password": NEW_PASSWORD,
            "password2": NEW_PASSWORD}
    assert web.post(f"/signup/{token}", {**form, "password2": "something else entirely"}, csrf).status == 422
    weak = web.post(f"/signup/{token}", {**form, "password": "password123", "password2": "password123"}, csrf)
    assert weak.status == 422 and "Password:" in weak.text
    own = web.post(f"/signup/{token}", {**form, "password": "orthopartners2024", "password2": "orthopartners2024"},
                   csrf)
    assert own.status == 422
    assert web.post(f"/signup/{token}", {**form, "timezone": "Mars/Olympus"}, csrf).status == 422
    assert web.post(f"/signup/{token}", {**form, "practice": "Line\r\nBcc: evil@x.test"}, csrf).status == 422
    assert web.post(f"/signup/{token}", form, None).status == 403
    assert server.store.get_account(colleague).state == "pending"
    done = web.post(f"/signup/{token}", form, csrf)
    assert done.status == 303 and done.header("Location") == "/setup?done=welcome"
    info = server.store.get_account(colleague)
    assert (info.state, info.practice_name, info.timezone) == ("active", "Ortho Partners", "America/Chicago")
    setup = web.get("/setup?done=welcome")
    assert setup.status == 200 and "Your account is ready" in setup.text
    for port in (server.ports["imaps"], server.ports["submissions"], server.ports["imap"],
                 server.ports["submission"]):
        assert f"<code>{port}</code>" in setup.text
    assert f"<code>{HOST}</code>" in setup.text and f"<code>{colleague}</code>" in setup.text
    # The link is used up: a second visit says so, and whom to ask.
    again = server.client().get(f"/signup/{token}")
    assert again.status == 410 and "has been used" in again.text
    replay = server.client()
    page2 = replay.get("/login")
    assert replay.post(f"/signup/{token}", form, page2.csrf()).status == 410
    # The new password opens the account's mail.
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.context())
    imap.login(colleague, NEW_PASSWORD)
    imap.logout()


def test_signup_links_expired_replaced_unknown(server: Server, web: Client) -> None:
    member = server.account("member", practice="Bright Smiles")
    _, short = _invite(server, member, ttl=timedelta(seconds=1))
    time.sleep(1.2)
    expired = web.get(f"/signup/{short}")
    assert expired.status == 410 and "expired" in expired.text and "Bright Smiles" in expired.text and member in \
        expired.text
    colleague, old = _invite(server, member)
    session = server.store.login(member, PASSWORD)
    result = server.store.invite_colleague(member, colleague, member_session=session)
    assert result.status == "reinvited" and result.token
    replaced = web.get(f"/signup/{old}")
    assert replaced.status == 410 and "replaced" in replaced.text
    assert web.get(f"/signup/{result.token}").status == 200
    for bad in ("short", "A" * 43, quote("../../etc/passwd", safe=""), "%00"):
        reply = web.get(f"/signup/{bad}")
        assert reply.status == 404 and "not valid" in reply.text
        assert_secure(reply)


# -- account pages ----------------------------------------------------------------------


def test_account_information_and_injection(server: Server, web: Client) -> None:
    email = server.account("member")
    web.login(email)
    evil = '<script>alert("x")</script> & "Co" \'quoted\''
    ok = web.submit("/account", "/account", {"practice": evil, "timezone": "Europe/Berlin",
                                             "notify_address": "front-desk@dental.test"})
    assert ok.status == 303 and ok.header("Location") == "/account?done=saved"
    page = web.get("/account?done=saved")
    assert "Your changes are saved" in page.text
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(\"x\")&lt;/script&gt; &amp; \"Co\"" in page.text
    assert 'value="&lt;script&gt;alert(&quot;x&quot;)' in page.text
    info = server.store.get_account(email)
    assert info.practice_name == evil and info.timezone == "Europe/Berlin"
    assert server.store.notification_settings(email).address == "front-desk@dental.test"
    # CR/LF can't get into a practice name or a notification address (headers
    # of notification mail), nor into any response header.
    for form in ({"practice": "X\r\nSet-Cookie: a=b", "timezone": "UTC", "notify_address": ""},
                 {"practice": "Fine", "timezone": "UTC", "notify_address": "a@b.test\r\nBcc: c@d.test"},
                 {"practice": "Fine", "timezone": "UTC", "notify_address": "=?UTF-8?Q?X=0ABcc:_evil@x?="}):
        bad = web.submit("/account", "/account", form)
        assert bad.status == 422
        assert bad.header("Set-Cookie") is None and "a=b" not in str(bad.headers)
    assert server.store.get_account(email).practice_name == evil
    # Query strings are never echoed back.
    echoed = web.get("/account?done=%3Cscript%3Ex")
    assert "<script>x" not in echoed.text and "Your changes" not in echoed.text
    # Empty notification address: back to the account's own.
    web.submit("/account", "/account", {"practice": "Plain", "timezone": "UTC", "notify_address": ""})
    settings = server.store.notification_settings(email)
    assert settings.address == email and not settings.custom_address
    assert audit_events(server, "account.update", email)


def test_mailbox_settings(server: Server, web: Client) -> None:
    email = server.account("colleague")
    web.login(email)
    page = web.get("/mailbox")
    assert 'value="every"' in page.text and "checked" in page.text
    reply = web.post("/mailbox", {"mailbox_name": "Dr. Ortho <front>", "mode": "batched", "interval": "15"},
                     page.csrf())
    assert reply.status == 303
    assert server.store.get_account(email).mailbox_name == "Dr. Ortho <front>"
    settings = server.store.notification_settings(email)
    assert (settings.mode, settings.interval_minutes) == ("batched", 15)
    assert "Dr. Ortho &lt;front&gt;" in web.get("/mailbox").text
    for form in ({"mailbox_name": "X", "mode": "sometimes", "interval": "15"},
                 {"mailbox_name": "X", "mode": "off", "interval": "0"},
                 {"mailbox_name": "", "mode": "off", "interval": "15"}):
        assert web.submit("/mailbox", "/mailbox", form).status == 422
    assert server.store.notification_settings(email).mode == "batched"
    web.submit("/mailbox", "/mailbox", {"mailbox_name": "Dr. Ortho", "mode": "off", "interval": "15"})
    assert server.store.notification_settings(email).mode == "off"


def test_password_change_ends_other_sessions_imap_included(server: Server) -> None:
    email = server.account("member")
    web, other = server.client(), server.client()
    web.login(email)
    other.login(email)
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.context())
    imap.login(email, PASSWORD)
    imap.select("INBOX")
    page = web.get("/password")
    wrong = web.post("/password", {"old": "not it at all", "new": NEW_PASSWORD, "new2": NEW_PASSWORD}, page.csrf())
    assert wrong.status == 422 and "current password is wrong" in wrong.text
    weak = web.post("/password", {"old": PASSWORD, "new": "short", "new2": "short"}, page.csrf())
    assert weak.status == 422
    before = dict(web.cookies)
    done = web.post("/password", {"old": PASSWORD, "new": NEW_PASSWORD, "new2": NEW_PASSWORD}, page.csrf())
    assert done.status == 303 and done.header("Location") == "/password?done=password"
    assert web.cookies["__Host-pv_session"] != before["__Host-pv_session"]  # rotated
    assert web.get("/password?done=password").status == 200
    assert other.get("/account").status == 303  # the other browser is logged out
    assert Client(server.https, server.context(), before).get("/account").status == 303
    with pytest.raises((imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError)):
        for _ in range(50):
            imap.noop()
            time.sleep(0.1)
    fresh = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.context())
    with pytest.raises(imaplib.IMAP4.error):
        fresh.login(email, PASSWORD)
    fresh = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.context())
    fresh.login(email, NEW_PASSWORD)
    fresh.logout()
    assert audit_events(server, "password.change", email)
    assert audit_events(server, "sessions.end", email)


# -- contacts -----------------------------------------------------------------------------


def test_member_contacts(server: Server, web: Client) -> None:
    email = server.account("member", practice="Contact Dental")
    web.login(email)
    assert "address book is empty" in web.get("/contacts").text
    add = web.submit("/contacts", "/contacts/add", {"email": "Dr.Who@Tardis.test", "name": "Dr <Who>",
                                                    "practice": "Tardis; Time, Space"})
    assert add.status == 303 and add.header("Location") == "/contacts?done=added"
    page = web.get("/contacts?done=added")
    assert "Dr &lt;Who&gt;" in page.text and "Not invited" in page.text
    assert web.submit("/contacts", "/contacts/add", {"email": "not an address", "name": "", "practice": ""}
                      ).status == 422
    assert web.submit("/contacts", "/contacts/add", {"email": email, "name": "", "practice": ""}).status == 422
    [contact] = server.store.address_book(email)
    edit = web.submit("/contacts", "/contacts/edit", {"email": contact.email, "name": "Dr Who",
                                                      "practice": "Tardis; Time, Space"})
    assert edit.status == 303
    vcf = web.get("/contacts.vcf")
    assert vcf.header("Content-Type") == "text/vcard; charset=utf-8"
    assert vcf.header("Content-Disposition") == 'attachment; filename="contacts.vcf"'
    assert vcf.body.startswith(b"BEGIN:VCARD\r\nVERSION:4.0\r\n")
    assert b"FN:Dr Who\r\n" in vcf.body and b"ORG:Tardis\\; Time\\, Space\r\n" in vcf.body
    invite = web.submit("/contacts", "/contacts/invite", {"email": contact.email})
    assert invite.status == 303 and invite.header("Location") == "/contacts?done=invited"
    assert server.store.invitation_status(contact.email).state == "pending"
    again = web.submit("/contacts", "/contacts/invite", {"email": contact.email})
    assert again.header("Location") == "/contacts?done=reinvited"
    got = server.wait_for_mail(lambda m: contact.email.lower() in [r.lower() for r in m.rcpt_tos])
    assert b"/signup/" in got.data
    remove = web.submit("/contacts", "/contacts/remove", {"email": contact.email})
    assert remove.status == 303 and server.store.address_book(email) == []
    assert audit_events(server, "contacts.remove", email)


def test_colleague_contacts(server: Server, web: Client) -> None:
    first = server.account("member", practice="First Dental")
    colleague = server.account("colleague", invited_by=first)
    second = server.account("member", practice="Second Dental")
    server.store.add_contact(second, colleague)
    web.login(colleague)
    page = web.get("/contacts")
    assert "First Dental" in page.text and "Second Dental" in page.text and "Add a colleague" not in page.text
    vcf = web.get("/contacts.vcf").body
    assert vcf.count(b"BEGIN:VCARD") == 2 and b"ORG:First Dental" in vcf
    # Colleagues have no address book to change, nor office settings.
    assert web.submit("/contacts", "/contacts/add", {"email": "a@b.test"}).status == 403
    assert web.get("/office").status == 403
    assert "Office settings" not in page.text


# -- office settings --------------------------------------------------------------------


def _message_with(name: str) -> bytes:
    return (
        "From: a@b.test\r\nTo: c@d.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
        f'--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--b--\r\n"
    ).encode()


def test_office_settings(server: Server, web: Client) -> None:
    email = server.account("member")
    web.login(email)
    page = web.get("/office")
    assert page.status == 200 and "Allowed by your office" in page.text and "docm" in page.text
    for typed, why in (("exe", "programs or scripts"), ("stl", "not blocked"), ("tar.gz", "not a file extension"),
                       ("docm, js", "programs or scripts")):
        bad = web.post("/office", {"extensions": typed}, page.csrf())
        assert bad.status == 422 and why in bad.text, typed
    policy = load_policy(server.home / "conf" / "policy.toml")
    assert server.store.conversation_allowances([email], policy) == frozenset()
    ok = web.post("/office", {"extensions": ".DOCM; xz  iso"}, page.csrf())
    assert ok.status == 303
    assert server.store.office_allowances([email]) == {email.lower(): frozenset({"docm", "xz", "iso"})}
    assert "docm, iso, xz" in web.get("/office").text
    # Effective at once, for every conversation of this office: the SMTP
    # handler passes conversation_allowances to check_attachments.
    lifted = server.store.conversation_allowances([email], policy)
    assert lifted == frozenset({"docm", "xz", "iso"})
    assert check_attachments(_message_with("plan.docm"), policy.attachments, lifted).allowed
    assert not check_attachments(_message_with("plan.docm"), policy.attachments, frozenset()).allowed
    # No allowance lifts a program's content.
    elf = base64.b64encode(b"\x7fELF\x02\x01\x01" + b"\0" * 57)
    exe = _message_with("scan.docm").replace(b"AAECAwQFBgcICQ==", elf)
    assert not check_attachments(exe, policy.attachments, lifted).allowed
    [event] = audit_events(server, "office.allowances", email)
    assert event.actor == email and "added=docm,iso,xz" in event.detail
    web.post("/office", {"extensions": ""}, page.csrf())
    assert server.store.office_allowances([email]) == {}


# -- automatic setup ------------------------------------------------------------------------


def test_thunderbird_autoconfig(server: Server, web: Client) -> None:
    for path in ("/.well-known/autoconfig/mail/config-v1.1.xml",
                 "/mail/config-v1.1.xml?emailaddress=dr%40ortho.test"):
        reply = web.get(path)
        assert reply.status == 200 and reply.header("Content-Type") == "text/xml; charset=utf-8"
        root = ET.fromstring(reply.body)
        incoming = root.findall("./emailProvider/incomingServer")
        outgoing = root.findall("./emailProvider/outgoingServer")
        assert [(s.findtext("port"), s.findtext("socketType")) for s in incoming] == [
            (str(server.ports["imaps"]), "SSL"), (str(server.ports["imap"]), "STARTTLS")]
        assert [(s.findtext("port"), s.findtext("socketType")) for s in outgoing] == [
            (str(server.ports["submissions"]), "SSL"), (str(server.ports["submission"]), "STARTTLS")]
        assert {s.findtext("hostname") for s in incoming + outgoing} == {HOST}
        user = "dr@ortho.test" if "emailaddress" in path else "%EMAILADDRESS%"
        assert {s.findtext("username") for s in incoming + outgoing} == {user}
    evil = web.get("/mail/config-v1.1.xml?emailaddress=%3Cx%3E%40a.test")
    assert b"<x>" not in evil.body


def test_outlook_autodiscover(server: Server, web: Client) -> None:
    body = (b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/'
            b'autodiscover/outlook/requestschema/2006"><Request><EMailAddress>dr@ortho.test</EMailAddress>'
            b"<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/"
            b"2006a</AcceptableResponseSchema></Request></Autodiscover>")
    for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"):
        reply = web.request("POST", path, body, {"Content-Type": "text/xml"})
        assert reply.status == 200
        ns = {"a": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
        protocols = ET.fromstring(reply.body).findall(".//a:Protocol", ns)
        got = {p.findtext("a:Type", namespaces=ns): (p.findtext("a:Server", namespaces=ns),
                                                     p.findtext("a:Port", namespaces=ns),
                                                     p.findtext("a:LoginName", namespaces=ns),
                                                     p.findtext("a:SSL", namespaces=ns)) for p in protocols}
        assert got == {"IMAP": (HOST, str(server.ports["imaps"]), "dr@ortho.test", "on"),
                       "SMTP": (HOST, str(server.ports["submissions"]), "dr@ortho.test", "on")}
    billion = b'<!DOCTYPE x [<!ENTITY a "aaaa">]><Autodiscover><EMailAddress>&a;</EMailAddress></Autodiscover>'
    error = web.request("POST", "/autodiscover/autodiscover.xml", billion, {"Content-Type": "text/xml"})
    assert error.status == 200 and b"<ErrorCode>600</ErrorCode>" in error.body
    assert web.get("/autodiscover/autodiscover.xml").status == 405


def test_setup_downloads(server: Server, web: Client) -> None:
    email = server.account("colleague", practice="Ortho & Sons")
    assert web.get("/setup/postvault.mobileconfig").status == 303
    web.login(email)
    profile = web.get("/setup/postvault.mobileconfig")
    assert profile.header("Content-Type") == "application/x-apple-aspen-config"
    assert 'filename="postvault.mobileconfig"' in (profile.header("Content-Disposition") or "")
    plist = plistlib.loads(profile.body)
    [mail] = plist["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert (mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"]) == (HOST, server.ports["imaps"])
    assert (mail["OutgoingMailServerPortNumber"], mail["EmailAddress"]) == (server.ports["submissions"], email)
    assert mail["EmailAccountName"] == "Ortho & Sons"
    assert not {"IncomingPassword", "OutgoingPassword"} & set(mail)  # each program asks for it
    xml = web.get("/setup/config-v1.1.xml")
    assert xml.status == 200 and f"<username>{email}</username>".encode() in xml.body
    assert re.search(rb"attachment; filename=\"config-v1.1.xml\"", (xml.header("Content-Disposition") or "").encode())
