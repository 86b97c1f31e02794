"""Clients for the submission tests: a byte-exact raw client over real
sockets (plain, STARTTLS or implicit TLS), and a message builder."""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.policy import SMTPUTF8 as SMTPUTF8_POLICY

PASSWORD = "correct horse battery staple"
ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")


class Raw:
    """An SMTP client that sends exactly the bytes it is given."""

    def __init__(self, port: int, ctx: ssl.SSLContext, *, implicit: bool, timeout: float = 20.0) -> None:
        self.ctx = ctx
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = ctx.wrap_socket(sock, server_hostname="localhost") if implicit else sock
        self.buf = b""
        self.errors = 0  # 4xx/5xx replies seen: the server closes after [smtp] max_errors
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self, timeout: float = 20.0) -> tuple[int, list[str]]:
        """One whole reply: (code, the text of each line)."""
        lines = []
        while True:
            line = self._line(timeout).decode("utf-8", "replace")
            lines.append(line)
            if line[3:4] != "-":
                if line[:1] in ("4", "5"):
                    self.errors += 1
                return int(line[:3]), lines

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def ehlo(self) -> list[str]:
        code, lines = self.cmd("EHLO client.example")
        assert code == 250, lines
        return [line[4:] for line in lines[1:]]

    def starttls(self) -> None:
        code, lines = self.cmd("STARTTLS")
        assert code == 220, lines
        assert not self.buf
        self.sock = self.ctx.wrap_socket(self.sock, server_hostname="localhost")

    def login(self, user: str, password: str = PASSWORD) -> tuple[int, list[str]]:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {token}")

    def silent(self, seconds: float) -> bool:
        """True if no reply (nor a close) arrives for ``seconds``."""
        if self.buf:
            return False
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.buf += data
        return False

    def closed(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (after any data)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def message(frm: str, to: str | list[str], subject: str = "Appointment", *, body: str = "See you at 10.\n",
            msgid: str | None = None, in_reply_to: str | None = None, references: str | None = None,
            attachments: tuple[tuple[str, bytes], ...] = (), headers: tuple[tuple[str, str], ...] = (),
            utf8: bool = False) -> bytes:
    """An RFC 5322 message with CRLF line ends."""
    msg = EmailMessage(policy=SMTPUTF8_POLICY if utf8 else SMTP_POLICY)
    msg["From"] = frm
    msg["To"] = ", ".join([to] if isinstance(to, str) else to)
    msg["Subject"] = subject
    msg["Date"] = "Tue, 02 Jan 2024 09:30:00 -0500"
    if msgid:
        msg["Message-ID"] = msgid
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    for name, value in headers:
        msg[name] = value
    msg.set_content(body)
    for filename, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=filename)
    return msg.as_bytes()


def enhanced(lines: list[str]) -> bool:
    return all(ENHANCED.match(line) for line in lines)


def stuff(msg: bytes) -> bytes:
    """``msg`` as DATA sends it: dot-stuffed (RFC 5321 section 4.5.2), ended by CR LF . CR LF."""
    if not msg.endswith(b"\r\n"):
        msg += b"\r\n"
    body = (b"\r\n" + msg).replace(b"\r\n.", b"\r\n..")[2:]
    return body + b".\r\n"


def transaction(c: Raw, rcpts: list[str], payload: bytes, *, sender: str) -> tuple[int, list[str]]:
    """MAIL, RCPT for each, DATA and ``payload`` (bytes exactly as sent,
    ending with the end-of-data line); the reply to the end of data."""
    code, lines = c.cmd(f"MAIL FROM:<{sender}>")
    assert code == 250, lines
    for rcpt in rcpts:
        code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 250, lines
    code, lines = c.cmd("DATA")
    assert code == 354, lines
    c.send(payload)
    return c.reply()
