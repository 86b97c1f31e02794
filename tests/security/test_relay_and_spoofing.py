"""Open relay attempts, sender spoofing (envelope and header) and header
injection, over real TLS sessions to the submission service.

Sources: RFC 2505 "Anti-Spam Recommendations for SMTP MTAs" §2 (relay
tests: percent hack, source routes, quoted local parts, bang paths,
unqualified names, address literals); RFC 5321 §3.6.1, §4.1.1.3 and
Appendix C (source routes are ignored, never followed); RFC 6409 §4.3 and
§6.1 (submission requires authentication and may enforce the sender); the
relay tests of Nmap's ``smtp-open-relay`` script
(https://nmap.org/nsedoc/scripts/smtp-open-relay.html);
J. Chen, V. Paxson, J. Jiang, "Composition Kills: A Case Study of Email
Sender Authentication", USENIX Security 2020 (header ambiguities that make
one program show another sender); CWE-93 (CRLF injection).
"""

from __future__ import annotations

import pytest

from tests.smtpd.client import message, transaction
from tests.smtpd.conftest import COLLEAGUE, MEMBER, MEMBER2, Server, World

OUTSIDE = "someone@outside.example"

# nmap smtp-open-relay's address forms, and RFC 2505 §2's, aimed at an
# outside mailbox; each must be refused at RCPT.
RELAY_RECIPIENTS = [
    pytest.param(OUTSIDE, id="outside-domain"),
    pytest.param("someone%outside.example@dental.test", id="percent-hack"),
    pytest.param("someone%outside.example@[127.0.0.1]", id="percent-hack-literal"),
    pytest.param("@dental.test:someone@outside.example", id="source-route"),
    pytest.param("@dental.test,@ortho.test:someone@outside.example", id="source-route-2-hops"),
    pytest.param('"someone@outside.example"@dental.test', id="quoted-local-part"),
    pytest.param('"someone%outside.example"@dental.test', id="quoted-percent"),
    pytest.param("someone@outside.example@dental.test", id="double-at"),
    pytest.param("outside.example!someone@dental.test", id="bang-path"),
    pytest.param("outside.example!someone", id="bang-path-unqualified"),
    pytest.param("someone@[127.0.0.1]", id="address-literal"),
    pytest.param("postmaster@[127.0.0.1]", id="postmaster-literal"),
    pytest.param("someone", id="unqualified"),
    pytest.param("someone@outside.example.", id="trailing-dot"),
    pytest.param("dr@ortho.test.", id="trailing-dot-colleague-domain"),
    pytest.param('"dr@ortho.test"@outside.example', id="quoted-local-looks-local"),
]


def counts(world: World) -> tuple[int, int, int]:
    return world.count(COLLEAGUE), world.count(MEMBER2), world.count(MEMBER, "Sent")


# --- open relay ----------------------------------------------------------------------


@pytest.mark.parametrize("rcpt", RELAY_RECIPIENTS)
def test_relay_recipient_is_refused(smtp: Server, rcpt: str) -> None:
    # RFC 2505 §2 / nmap smtp-open-relay tests; RFC 5321 §3.6.1 (relay
    # only by prior arrangement). Logged in as a member: still no relay.
    c = smtp.session(MEMBER)
    assert c.cmd(f"MAIL FROM:<{MEMBER}>")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
    assert 500 <= code < 600 and lines[0][4:5] == "5", (rcpt, lines)


def test_source_route_to_a_local_account_is_not_followed(smtp: Server, world: World) -> None:
    # RFC 5321 Appendix C and §4.1.1.3: a server SHOULD ignore the route; the
    # mailbox is the last part. The route's hosts are never contacted and the
    # stored message goes to that account alone.
    before = counts(world)
    c = smtp.session(MEMBER)
    assert c.cmd(f"MAIL FROM:<{MEMBER}>")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<@outside.example:{COLLEAGUE}>")
    if code == 250:
        assert c.cmd("DATA")[0] == 354
        c.send(message(MEMBER, COLLEAGUE, "routed") + b".\r\n")
        assert c.reply()[0] == 250
        assert counts(world) == (before[0] + 1, before[1], before[2] + 1)
    else:
        assert code >= 500, lines
        assert counts(world) == before


@pytest.mark.parametrize("implicit", [True, False])
def test_unauthenticated_relay_is_refused(smtp: Server, implicit: bool) -> None:
    # RFC 6409 §4.3: submission needs authentication; an open relay is the
    # unauthenticated case (nmap smtp-open-relay).
    c = smtp.raw(implicit=implicit)
    if not implicit:
        c.ehlo()
        c.starttls()
    c.ehlo()
    code, lines = c.cmd(f"MAIL FROM:<{OUTSIDE}>")
    assert code == 530, lines
    code, lines = c.cmd(f"RCPT TO:<{COLLEAGUE}>")
    assert code == 530, lines
    c.close()


# --- envelope sender ------------------------------------------------------------------


@pytest.mark.parametrize("sender", [
    pytest.param(MEMBER2, id="another-account"),
    pytest.param(OUTSIDE, id="outsider"),
    pytest.param("", id="null-sender"),
    pytest.param("office%dental.test@clinic.test", id="percent-hack"),
    pytest.param('"office@dental.test"@clinic.test', id="quoted-local-part"),
    pytest.param("@dental.test:front@clinic.test", id="source-route-to-another"),
    pytest.param("office@dental.test.evil", id="suffix"),
])
def test_envelope_sender_must_be_the_account(smtp: Server, sender: str) -> None:
    # RFC 6409 §6.1 (the server may refuse a MAIL FROM the user has no right
    # to); Composition Kills (USENIX Sec 2020), envelope/header mismatch.
    c = smtp.session(MEMBER)
    code, lines = c.cmd(f"MAIL FROM:<{sender}>")
    assert code in (501, 553), (sender, lines)


def test_auth_parameter_of_mail_cannot_claim_someone_else(smtp: Server, world: World) -> None:
    # RFC 4954 §5: MAIL's AUTH= names the original submitter; a client's
    # claim must not stand in for the login (nor reach a header).
    c = smtp.session(MEMBER)
    code, lines = c.cmd(f"MAIL FROM:<{MEMBER}> AUTH=<{MEMBER2}>")
    assert code == 250, lines
    assert c.cmd(f"RCPT TO:<{COLLEAGUE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(message(MEMBER, COLLEAGUE, "auth-param") + b".\r\n")
    assert c.reply()[0] == 250
    assert MEMBER2.encode() not in world.read(COLLEAGUE).split(b"\r\n\r\n")[0]


# --- header sender (Composition Kills) ------------------------------------------------

SPOOFED_HEADERS = [
    # Composition Kills (Chen, Paxson, Jiang, USENIX Sec 2020): multiple From
    # fields, white space before the colon, a folded first line, a display
    # name / comment / encoded-word naming another address; RFC 5322 §3.6.2
    # (Sender) and §4.5.3 (obsolete white space before the colon).
    pytest.param(b"From: front@clinic.test\r\n", "header.from-not-account", id="plain-other"),
    pytest.param(b"From: office@dental.test\r\nFrom: front@clinic.test\r\n", "", id="two-from"),
    pytest.param(b"From: office@dental.test\r\nFrom : front@clinic.test\r\n", "", id="space-before-colon"),
    pytest.param(b"From : front@clinic.test\r\nFrom: office@dental.test\r\n", "", id="space-before-colon-first"),
    pytest.param(b"From\t: front@clinic.test\r\nFrom: office@dental.test\r\n", "", id="tab-before-colon"),
    pytest.param(b" From: front@clinic.test\r\nFrom: office@dental.test\r\n", "", id="folded-first-line"),
    pytest.param(b"From: office@dental.test\r\n From: front@clinic.test\r\n", "", id="folded-second-from"),
    pytest.param(b"From: office@dental.test, front@clinic.test\r\n", "", id="two-mailboxes"),
    pytest.param(b'From: "front@clinic.test" <office@dental.test>\r\n', "header.from-not-account",
                 id="display-name-address"),
    pytest.param(b"From: =?utf-8?b?ZnJvbnRAY2xpbmljLnRlc3Q=?= <office@dental.test>\r\n",
                 "header.from-not-account", id="encoded-word-display-name"),
    pytest.param(b"From: (front@clinic.test) office@dental.test\r\n", "header.from-not-account", id="comment"),
    pytest.param(b"From: =?utf-8?b?ZnJvbnRAY2xpbmljLnRlc3Q=?=\r\n", "",
                 id="encoded-word-as-address"),
    pytest.param(b"From: <front@clinic.test>office@dental.test\r\n", "", id="angle-then-bare"),
    pytest.param(b"From: office@dental.test\r\nSender: front@clinic.test\r\n", "header.sender-not-account",
                 id="sender-other"),
    pytest.param(b"From: office@dental.test\r\nSender : front@clinic.test\r\n", "", id="sender-space-before-colon"),
    pytest.param(b"Subject: x\r\n", "header.from-missing", id="no-from"),
]


@pytest.mark.parametrize("header, rule", SPOOFED_HEADERS)
def test_header_sender_spoofing_is_refused(smtp: Server, world: World, header: bytes, rule: str) -> None:
    before = counts(world)
    c = smtp.session(MEMBER)
    payload = header + b"To: dr@ortho.test\r\nSubject: hello\r\n\r\nbody\r\n.\r\n"
    code, lines = transaction(c, [COLLEAGUE], payload, sender=MEMBER)
    assert code == 553 and lines[0].startswith("553 5.7.1 "), lines
    expected = {"header.from-not-account": "is not the account", "header.sender-not-account": "Sender header",
                "header.from-missing": "no From header", "": "cannot be read"}[rule]
    assert expected in lines[0], lines
    assert counts(world) == before


@pytest.mark.parametrize("header", [
    b'From: "office@dental.test" <office@dental.test>\r\n',  # Outlook's habit
    b"From: Dr. Smith <office@dental.test>\r\n",            # unquoted period: obsolete but common
    b"From: =?utf-8?q?Smile_D=C3=A9ntal?= <office@dental.test>\r\n",
    b"From: Smile Dental <OFFICE@Dental.Test>\r\nSender: office@dental.test\r\n",
])
def test_honest_from_headers_still_pass(smtp: Server, world: World, header: bytes) -> None:
    # The twin of the spoofing table: what real mail programs send is accepted.
    before = counts(world)
    c = smtp.session(MEMBER)
    payload = header + b"To: dr@ortho.test\r\nSubject: hello\r\n\r\nbody\r\n.\r\n"
    code, lines = transaction(c, [COLLEAGUE], payload, sender=MEMBER)
    assert code == 250, lines
    assert counts(world) == (before[0] + 1, before[1], before[2] + 1)


# --- header injection ------------------------------------------------------------------


@pytest.mark.parametrize("helo", ["evil.example\rBcc: front@clinic.test", "x>\tBcc: front@clinic.test",
                                  "[127.0.0.1] (spoofed", "a" * 300])
def test_helo_is_never_copied_raw_into_received(smtp: Server, world: World, helo: str) -> None:
    # CWE-93 CRLF injection into a trace header; RFC 5321 §4.4 (the Received
    # "from" is the client's claim beside what the server saw).
    before = counts(world)
    c = smtp.raw(implicit=True)
    code, lines = c.cmd(f"EHLO {helo}")
    if code != 250:  # refused outright (the bare CR): nothing to inject into
        assert code >= 500, lines
        c.close()
        return
    assert c.login(MEMBER)[0] == 235
    code, lines = transaction(c, [COLLEAGUE], message(MEMBER, COLLEAGUE, "helo") + b".\r\n", sender=MEMBER)
    assert code == 250, lines
    received = world.read(COLLEAGUE).split(b"\r\nFrom:")[0]
    assert received.startswith(b"Received: from [127.0.0.1] ([127.0.0.1])"), received
    assert b"Bcc" not in received and b"spoofed" not in received and b"aaaa" not in received
    assert counts(world)[1] == before[1]  # the "Bcc" got nothing
    c.close()
