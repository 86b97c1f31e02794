"""STARTTLS abuse on both protocols, and authentication before TLS.

Source for the family: D. Poddebniak, F. Ising, H. Böck, S. Schinzel et
al., "Why TLS is better without STARTTLS: A Security Analysis of STARTTLS
in the Email Context" ("NO STARTTLS"), USENIX Security 2021,
https://nostarttls.secvuln.info/ — its attack classes: command injection
(plaintext pipelined after STARTTLS and run inside TLS; CVE-2011-0411 in
Postfix, CVE-2021-33515 in Dovecot submission), response injection
(plaintext answers buffered and read after the handshake), tampering with
the STARTTLS exchange (PREAUTH, plaintext before the ClientHello), and
session fixation (state from before TLS carried into it). RFC 3207 §4.2 (SMTP) and RFC 3501 §6.2.1 / RFC 9051 §6.2.1 (IMAP) say
the server must discard what it knew before TLS.
"""

from __future__ import annotations

import base64
import socket
import ssl

import pytest

from tests.imapd.client import Client
from tests.smtpd.conftest import MEMBER, Server

from .conftest import PASSWORD, Serve


def _plain_imap(serve: Serve) -> Client:
    c = Client("127.0.0.1", serve.ports["imap"], None)
    greeting = c.response()
    # A PREAUTH greeting would skip STARTTLS altogether (the NO STARTTLS
    # paper's PREAUTH downgrade, RFC 9051 §7.1.4); we never send it.
    assert greeting.startswith(b"* OK") and b"PREAUTH" not in greeting
    return c


def _nothing_more(sock: socket.socket, seconds: float = 0.5) -> bool:
    """True if the peer sends nothing (nor closes) for ``seconds``."""
    sock.settimeout(seconds)
    try:
        sock.recv(65536)
    except (TimeoutError, ssl.SSLWantReadError):
        return True
    return False  # data, or the connection closed


# --- SMTP (port 587) -----------------------------------------------------------


def test_smtp_commands_pipelined_after_starttls_are_dropped(smtp: Server) -> None:
    # NO STARTTLS (USENIX Sec 2021) command injection; CVE-2011-0411 (Postfix), CVE-2021-33515 (Dovecot).
    c = smtp.raw(implicit=False)
    c.ehlo()
    c.send(b"STARTTLS\r\nEHLO evil\r\nAUTH PLAIN " + base64.b64encode(f"\0{MEMBER}\0{PASSWORD}".encode())
           + b"\r\nMAIL FROM:<office@dental.test>\r\n")
    assert c.reply()[0] == 220
    assert not c.buf  # the 220 was the last plaintext byte
    c.sock = c.ctx.wrap_socket(c.sock, server_hostname="localhost")
    assert c.silent(0.5)  # no reply to any injected command
    # Neither the EHLO nor the login survived into TLS (session fixation).
    code, lines = c.cmd("MAIL FROM:<office@dental.test>")
    assert code == 503 and "EHLO" in lines[0], lines
    c.ehlo()
    code, lines = c.cmd("MAIL FROM:<office@dental.test>")
    assert code == 530 and lines[0].startswith("530 5.7.0 Authentication required"), lines
    c.close()


def test_smtp_plaintext_between_220_and_handshake_kills_the_session(smtp: Server) -> None:
    # NO STARTTLS (USENIX Sec 2021) tampering: plaintext in its own packet, after the 220, before the ClientHello.
    c = smtp.raw(implicit=False)
    c.ehlo()
    assert c.cmd("STARTTLS")[0] == 220
    c.send(b"NOOP\r\n")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c.sock = c.ctx.wrap_socket(c.sock, server_hostname="localhost")
        c.cmd("NOOP")  # if a handshake ever succeeded, nothing may answer
    c.close()


def test_smtp_starttls_with_argument_and_twice_is_refused(smtp: Server) -> None:
    # RFC 3207 §4: "STARTTLS" takes no parameter; §4.2: not again once TLS is up.
    c = smtp.raw(implicit=False)
    c.ehlo()
    code, lines = c.cmd("STARTTLS now")
    assert code == 501, lines
    c.starttls()
    c.ehlo()
    code, lines = c.cmd("STARTTLS")
    assert code == 503 and lines[0].startswith("503 5.5.1 "), lines
    c.close()


def test_smtp_no_plaintext_answer_is_replayed_inside_tls(smtp: Server) -> None:
    # NO STARTTLS (USENIX Sec 2021) response injection, seen from the server: nothing it
    # said (or queued) before the handshake may arrive after it.
    c = smtp.raw(implicit=False)
    c.send(b"EHLO a\r\nNOOP\r\nNOOP\r\n")
    for _ in range(3):
        assert c.reply()[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    assert not c.buf
    c.sock = c.ctx.wrap_socket(c.sock, server_hostname="localhost")
    assert c.silent(0.5)
    assert c.cmd("NOOP") == (250, ["250 2.0.0 OK"])
    c.close()


@pytest.mark.parametrize("command", [
    "AUTH PLAIN " + base64.b64encode(f"\0{MEMBER}\0{PASSWORD}".encode()).decode(),
    "AUTH LOGIN", "AUTH CRAM-MD5", "MAIL FROM:<office@dental.test>"])
def test_smtp_auth_before_tls_is_refused_and_not_offered(smtp: Server, command: str) -> None:
    # RFC 3207 §4.2, RFC 8314, RFC 6409 §4.3: no AUTH, no MAIL over plaintext.
    c = smtp.raw(implicit=False)
    assert c.ehlo() == ["STARTTLS", "ENHANCEDSTATUSCODES"]  # no AUTH advertised
    code, lines = c.cmd(command)
    assert code == 530 and lines[0].startswith("530 5.7.0 Must issue a STARTTLS command first"), lines
    c.close()


# --- IMAP (port 143) -----------------------------------------------------------


def test_imap_commands_pipelined_after_starttls_are_dropped(serve: Serve) -> None:
    # NO STARTTLS (USENIX Sec 2021) command injection and session fixation on IMAP; RFC 3501 §6.2.1.
    member = serve.account("member")
    c = _plain_imap(serve)
    c.send(f'a STARTTLS\r\nb LOGIN {member} "{PASSWORD}"\r\nc SELECT INBOX\r\n'.encode())
    assert c.response() == b"a OK Begin TLS negotiation now"  # no [CAPABILITY ...]
    c.starttls(serve.context())
    assert _nothing_more(c.sock)
    # Still not authenticated: the pipelined LOGIN never ran.
    lines = c.command("d", "SELECT INBOX")
    assert lines[-1].startswith(b"d BAD") or lines[-1].startswith(b"d NO"), lines
    caps = c.command("e", "CAPABILITY")
    assert b"AUTH=PLAIN" in caps[0] and b"STARTTLS" not in caps[0] and b"LOGINDISABLED" not in caps[0]
    c.close()


def test_imap_plaintext_between_ok_and_handshake_kills_the_session(serve: Serve) -> None:
    c = _plain_imap(serve)
    assert c.command("a", "STARTTLS")[-1].startswith(b"a OK")
    c.send(b"b CAPABILITY\r\n")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, EOFError)):
        c.starttls(serve.context())
        c.command("c", "NOOP")
    c.close()


def test_imap_no_plaintext_answer_is_replayed_inside_tls(serve: Serve) -> None:
    # NO STARTTLS (USENIX Sec 2021) response injection (server side): the tagged OK is the
    # last plaintext byte, and it carries no CAPABILITY (RFC 9051 §6.2.1: the
    # client must ask again once TLS is up).
    c = _plain_imap(serve)
    c.send(b"x1 NOOP\r\nx2 CAPABILITY\r\n")
    assert c.response().startswith(b"x1 OK")
    assert b"STARTTLS" in c.response() and c.response().startswith(b"x2 OK")
    c.send(b"a STARTTLS\r\n")
    assert c.response() == b"a OK Begin TLS negotiation now"
    assert not c.buf
    c.starttls(serve.context())
    assert _nothing_more(c.sock)
    assert c.command("b", "NOOP") == [b"b OK NOOP completed"]
    c.close()


def test_imap_starttls_twice_and_after_login_is_refused(serve: Serve) -> None:
    # RFC 3501 §6.2.1: STARTTLS only in the not-authenticated state, and only once.
    member = serve.account("member")
    c = _plain_imap(serve)
    assert c.command("a", "STARTTLS")[-1].startswith(b"a OK")
    c.starttls(serve.context())
    assert c.command("b", "STARTTLS")[-1].startswith(b"b BAD")
    assert c.command("c", f'LOGIN {member} "{PASSWORD}"')[-1].startswith(b"c OK")
    assert c.command("d", "STARTTLS")[-1].startswith(b"d BAD")
    c.close()
    c = serve.imaps()  # implicit TLS: STARTTLS makes no sense at all
    c.response()
    assert c.command("a", "STARTTLS")[-1].startswith(b"a BAD")
    c.close()


@pytest.mark.parametrize("command", [
    'LOGIN {user} "{password}"',
    "AUTHENTICATE PLAIN {plain}",
    "AUTHENTICATE LOGIN",
])
def test_imap_login_before_tls_is_refused(serve: Serve, command: str) -> None:
    # RFC 3501 §6.2.3 / RFC 9051 §6.2.3 LOGINDISABLED; RFC 5530 PRIVACYREQUIRED; RFC 8314.
    member = serve.account("member")
    c = _plain_imap(serve)
    caps = c.command("a", "CAPABILITY")[0]
    assert b"LOGINDISABLED" in caps and b"AUTH=" not in caps
    plain = base64.b64encode(f"\0{member}\0{PASSWORD}".encode()).decode()
    lines = c.command("b", command.format(user=member, password=PASSWORD, plain=plain))
    assert lines[-1].startswith(b"b NO [PRIVACYREQUIRED]"), lines
    # And nothing was logged in: a mailbox command is still out of state.
    assert not c.command("c", "SELECT INBOX")[-1].startswith(b"c OK")
    c.close()
