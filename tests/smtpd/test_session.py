"""TLS first, EHLO, the commands allowed before TLS, STARTTLS injection and
the shape of every reply; over real sockets on both listeners."""

from __future__ import annotations

import smtplib

import pytest

from .client import PASSWORD, Raw, enhanced
from .conftest import MEMBER, Server

AFTER_TLS = ["AUTH PLAIN LOGIN", "SIZE 52428800", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8"]


def test_587_offers_only_starttls_before_tls_and_everything_after(server: Server) -> None:
    c = server.raw(implicit=False)
    assert c.greeting[0] == 220 and "ESMTP" in c.greeting[1][0]
    assert c.ehlo() == ["STARTTLS", "ENHANCEDSTATUSCODES"]
    c.starttls()
    assert c.ehlo() == AFTER_TLS
    c.close()


def test_465_offers_auth_at_once_and_no_starttls(server: Server) -> None:
    c = server.raw(implicit=True)
    assert c.ehlo() == AFTER_TLS
    code, lines = c.cmd("STARTTLS")
    assert code == 503 and lines[0].startswith("503 5.5.1 ")
    c.close()


@pytest.mark.parametrize("command", [
    "AUTH PLAIN AG9mZmljZUBkZW50YWwudGVzdABjb3JyZWN0IGhvcnNlIGJhdHRlcnkgc3RhcGxl",
    "AUTH LOGIN", "MAIL FROM:<office@dental.test>", "RCPT TO:<dr@ortho.test>", "DATA", "VRFY x", "HELP",
])
def test_before_starttls_only_the_greeting_commands_work(server: Server, command: str) -> None:
    c = server.raw(implicit=False)
    c.ehlo()
    code, lines = c.cmd(command)
    assert code == 530, lines
    assert lines[0].startswith("530 5.7.0 Must issue a STARTTLS command first")
    # The allowed twins: EHLO, HELO, NOOP, RSET work, QUIT says goodbye.
    assert c.cmd("NOOP")[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("HELO client.example")[0] == 250
    assert c.cmd("EHLO client.example")[0] == 250
    code, lines = c.cmd("QUIT")
    assert code == 221 and lines[0].startswith("221 2.0.0")
    c.close()


def test_starttls_injection_is_discarded(server: Server) -> None:
    """RFC 3207 section 4.2: what the client sent after STARTTLS, in the
    same packet, must not be run once TLS is up."""
    c = server.raw(implicit=False)
    c.ehlo()
    c.send(b"STARTTLS\r\nRSET\r\n")
    code, lines = c.reply()
    assert code == 220, lines
    assert not c.buf
    c.sock = c.ctx.wrap_socket(c.sock, server_hostname="localhost")
    # RSET was before the handshake: no reply to it may ever come.
    assert c.silent(0.7)
    code, lines = c.cmd("NOOP")
    assert lines == ["250 2.0.0 OK"]
    assert c.silent(0.5)  # exactly one reply
    c.close()


def test_starttls_injection_of_a_whole_transaction_is_discarded(server: Server) -> None:
    c = server.raw(implicit=False)
    c.ehlo()
    c.send(b"STARTTLS\r\nEHLO evil\r\nAUTH PLAIN AGEAYg==\r\nMAIL FROM:<office@dental.test>\r\n")
    assert c.reply()[0] == 220
    c.sock = c.ctx.wrap_socket(c.sock, server_hostname="localhost")
    assert c.silent(0.5)
    # Nothing from before the handshake survived: no EHLO, no sender.
    code, lines = c.cmd("MAIL FROM:<office@dental.test>")
    assert code == 503 and lines[0].startswith("503 5.5.1 Send EHLO first")
    c.close()


def test_auth_mechanisms_are_plain_and_login_only(server: Server) -> None:
    c = server.raw()
    c.ehlo()
    for mech in ("CRAM-MD5", "XOAUTH2", "DIGEST-MD5"):
        code, lines = c.cmd(f"AUTH {mech}")
        assert code == 504 and lines[0].startswith("504 5.5.4 Only AUTH PLAIN and AUTH LOGIN"), lines
    c.close()


def test_auth_needs_ehlo(server: Server) -> None:
    c = server.raw()
    code, lines = c.cmd("AUTH PLAIN")
    assert code == 503 and lines[0].startswith("503 5.5.1 Send EHLO first")
    assert c.cmd("HELO client.example")[0] == 250
    code, lines = c.cmd("AUTH PLAIN")
    assert code == 503 and "needs EHLO" in lines[0]
    c.close()


def test_every_reply_has_an_enhanced_code(server: Server) -> None:
    """RFC 2034: every 2xx/4xx/5xx reply but the greeting and EHLO/HELO."""
    c = server.raw(implicit=False)
    replies: list[list[str]] = []
    for command in ["NOOP", "RSET", "MAIL FROM:<x@y.test>", "FOO", "STARTTLS x"]:
        replies.append(c.cmd(command)[1])
    c.starttls()
    c.ehlo()
    for command in ["MAIL FROM:<office@dental.test>", "AUTH", "AUTH PLAIN !!!", "AUTH PLAIN AGEAYg==",
                    "AUTH PLAIN AGFiYwBkZWY=", "X" * 600, "\u00e9t\u00e9", "", "VRFY <a@b.test>", "EXPN x",
                    "HELP", "NOOP", "RSET", "DATA"]:
        replies.append(c.cmd(command.encode("utf-8"))[1])
    c.close()
    # A new session: the first has used up most of its error budget.
    c = server.raw(user=MEMBER)
    for command in ["MAIL FROM:<office@dental.test> FOO=BAR", "MAIL FROM:<office@dental.test> BODY=9BIT",
                    "MAIL FROM:<>", "MAIL FROM:office", "RCPT TO:<dr@ortho.test>", "DATA",
                    "MAIL FROM:<office@dental.test> SIZE=999999999999",
                    "MAIL FROM:<office@dental.test>", "MAIL FROM:<office@dental.test>", "RCPT TO:<a@b>",
                    "RCPT TO:<nobody@nowhere.test>", "RCPT TO:<dr@ortho.test> NOTIFY=NEVER", "DATA x", "QUIT"]:
        replies.append(c.cmd(command)[1])
    for lines in replies:
        assert enhanced(lines), lines
        # One sentence, not aiosmtpd's terse "Error: ..." texts.
        assert "Error:" not in lines[0], lines


def test_long_command_line_is_refused_and_the_session_goes_on(server: Server) -> None:
    c = server.raw()
    c.ehlo()
    code, lines = c.cmd("NOOP " + "x" * 70_000)
    assert code == 500 and lines[0].startswith("500 5.5.2 Command line too long")
    assert c.cmd("NOOP")[0] == 250
    c.close()


def test_smtplib_both_ports(server: Server) -> None:
    for client in (server.smtps(), server.starttls()):
        assert client.noop()[0] == 250
        client.quit()
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        server.smtps(user=None).login(MEMBER, PASSWORD + "x")
    assert info.value.smtp_code == 535


def test_raw_client_sees_exactly_one_greeting(server: Server) -> None:
    c = Raw(server.port465, server.ctx, implicit=True)
    assert c.greeting[1][0].startswith("220 mail.example.test ESMTP")
    assert c.silent(0.3)
    c.close()
