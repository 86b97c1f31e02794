"""A raw IMAP client for tests, and the transcript replayer.

Transcript files (``transcripts/*.txt``) hold the conversation, pymap style:

    # comment; header lines "# use: imap" (STARTTLS port; default imaps),
    # "# deliver: <n> <file.eml>" (deliver data/<file.eml> n times to the
    # member's INBOX from the colleague before the session starts)
    C: a1 LOGIN ${member} "${password}"
    S: a1 OK [CAPABILITY {re:[^\\]]*}] Logged in
    S: * {cap:n:\\d+} EXISTS
    !starttls            (wrap the socket in TLS here)
    !sleep 0.5

``C:`` lines are sent followed by CRLF (``${name}`` replaced). ``S:`` lines
must match the next response line: text is literal except ``{re:REGEX}``
holes and ``{cap:NAME:REGEX}`` captures, usable later as ``${NAME}``. A
response that carries literals is one logical line in which each literal's
octets appear with CR and LF written as ``\\r`` and ``\\n``.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from pathlib import Path


class Client:
    def __init__(self, host: str, port: int, ctx: ssl.SSLContext | None, timeout: float = 15) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        self.ctx = ctx
        self.sock: socket.socket = ctx.wrap_socket(sock, server_hostname="mail.example.test") if ctx else sock
        self.buf = b""

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert not self.buf, f"unread data before TLS: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mail.example.test")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def raw_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> bytes:
        """One logical response line; literals inlined (CR/LF escaped)."""
        out = b""
        while True:
            line = self.raw_line()
            out += line
            m = re.search(rb"\{(\d+)\}$", line)
            if not m:
                return out
            data = self.read_exact(int(m[1]))
            out += data.replace(b"\r", b"\\r").replace(b"\n", b"\\n")

    def command(self, tag: str, text: str | bytes) -> list[bytes]:
        """Send one command; all responses up to its tagged one."""
        raw = text.encode() if isinstance(text, str) else text
        self.send(tag.encode() + b" " + raw + b"\r\n")
        lines = []
        while True:
            line = self.response()
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _pattern(expected: str, values: dict[str, str]) -> tuple[re.Pattern[bytes], list[str]]:
    out = []
    names: list[str] = []
    pos = 0
    for m in re.finditer(r"\{re:((?:[^{}]|\{[^{}]*\})*)\}|\{cap:(\w+)(?::((?:[^{}]|\{[^{}]*\})*))?\}|\$\{(\w+)\}",
                         expected):
        out.append(re.escape(expected[pos:m.start()]))
        if m[1] is not None:
            out.append(f"(?:{m[1]})")
        elif m[2] is not None:
            names.append(m[2])
            out.append("(" + (m[3] or r"\S+") + ")")
        else:
            out.append(re.escape(values[m[4]]))
        pos = m.end()
    out.append(re.escape(expected[pos:]))
    return re.compile(("".join(out) + r"\Z").encode(), re.S), names


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], text)


def replay(path: Path, client: Client, values: dict[str, str], tls: ssl.SSLContext) -> None:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.name}:{number}"
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("C: "):
            client.send(substitute(line[3:], values).encode() + b"\r\n")
        elif line.startswith("C+ "):  # raw bytes, no CRLF added; \r \n escapes allowed
            client.send(substitute(line[3:], values).encode().decode("unicode_escape").encode("latin-1"))
        elif line.startswith("S: "):
            pattern, names = _pattern(line[3:], values)
            try:
                got = client.response()
            except (OSError, EOFError) as exc:
                raise AssertionError(f"{where}: expected {line[3:]!r}, got {type(exc).__name__}") from None
            m = pattern.match(got)
            assert m, f"{where}: expected {line[3:]!r}\n got {got!r}"
            for i, name in enumerate(names, 1):
                values[name] = m[i].decode()
        elif line.strip() == "!starttls":
            client.starttls(tls)
        elif line.startswith("!send "):  # that many "x" octets (a literal's body)
            client.send(b"x" * int(line.split()[1]))
        elif line.startswith("!sleep "):
            time.sleep(float(line.split()[1]))
        elif line.strip() == "!closed":
            try:
                extra = client.response()
            except (OSError, EOFError):
                continue
            raise AssertionError(f"{where}: expected the connection closed, got {extra!r}")
        else:
            raise AssertionError(f"{where}: can't read this transcript line: {line!r}")
