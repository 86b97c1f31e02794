"""What fuzz/imap.py and fuzz/mime.py found in the IMAP server
(docs/hardening.md section 1), each with the input that crashed; the same
inputs replay in ``fuzz/corpus/`` (tests/test_fuzz.py).

- Refusals made before a command is parsed (a line too long, a literal too
  large) echoed the raw first word of the line as the tag: a bare LF in it
  forged a second response line ("a\\n1 BAD ..." reads as "1 BAD ..." to a
  client that splits on LF), 8-bit bytes made a tag no client sent.
- ``BODY[HEADER.FIELDS (...)]`` echoed the field names bare in the FETCH
  response: a quoted name with a space came back as two names, one with
  CR LF (from a literal) as a broken response.
- ``structure.parse`` (FETCH of a message stored without a summary) crashed
  on a MIME header value with an 8-bit byte, and on RFC 2231 parameters
  that crash the email package's parameter parser.
"""

from __future__ import annotations

import re

import pytest

from postvault.conf.schema import ImapConfig
from postvault.imapd import render
from postvault.imapd.parse import Cursor, Literal, Section, fetch_items
from postvault.imapd.structure import parse

from .client import Client
from .conftest import Server
from .test_imaplib import raw_session, send
from .test_server_unit import make


def no_bare_line_breaks(out: bytes) -> bool:
    return out.count(b"\r") == out.count(b"\r\n") == out.count(b"\n")


@pytest.mark.parametrize("line", [b"a\n1 OK x", b"a\r1 OK x", b"a\xe21 OK x"])
def test_too_long_line_never_echoes_a_broken_tag(line: bytes) -> None:
    # fuzz/corpus/imap/crash-long-line-tag
    proto, transport, _ = make(ImapConfig(max_line_length=8192))
    proto.dataReceived(line + b"y" * 9000 + b"\r\n")
    proto.dataReceived(b"a2 NOOP\r\n")
    out = transport.value()
    assert no_bare_line_breaks(out), out[:80]
    assert out.startswith(b"* BAD [TOOBIG] Command line too long\r\n"), out[:80]
    assert out.endswith(b"a2 OK NOOP completed\r\n")


@pytest.mark.parametrize("tag", [b"a\n1", b"a\xe22"])
def test_refused_literal_never_echoes_a_broken_tag(tag: bytes) -> None:
    # fuzz/corpus/imap/crash-literal-refusal-tag
    proto, transport, _ = make()
    proto.dataReceived(tag + b" LOGIN {99999999999}\r\n")
    assert transport.value() == b"* BAD [TOOBIG] Literal too large for this command.\r\n"


def test_a_tag_is_still_echoed() -> None:
    proto, transport, _ = make(ImapConfig(max_line_length=8192))
    proto.dataReceived(b"x.1 LOGIN {99999999999}\r\n")
    assert transport.value() == b"x.1 BAD [TOOBIG] Literal too large for this command.\r\n"


def command_parts(command: bytes) -> list[bytes | Literal]:
    """``{N}`` CR LF and N octets as the server's reader splits them."""
    parts: list[bytes | Literal] = []
    pos = 0
    for m in re.finditer(rb"\{(\d+)\}\r\n", command):
        parts.append(command[pos:m.end() - 2])
        parts.append(Literal(command[m.end():m.end() + int(m[1])]))
        pos = m.end() + int(m[1])
    return parts + [command[pos:]]


@pytest.mark.parametrize("names, spec", [
    ((b"From", b"Subject"), b"HEADER.FIELDS (FROM SUBJECT)"),
    # fuzz/corpus/imap/crash-section-field-with-space
    ((b'"A B"',), b'HEADER.FIELDS ("A B")'),
    ((b'""', b'"a\\"b\\\\"'), b'HEADER.FIELDS ("" "A\\"B\\\\")'),
    ((b"{4}\r\na\r\nb",), b"HEADER.FIELDS ({4}\r\nA\r\nB)"),
    ((b"{2}\r\n\xff(",), b"HEADER.FIELDS ({2}\r\n\xff()"),
])
def test_header_field_names_are_echoed_as_the_client_could_send_them(names: tuple[bytes, ...], spec: bytes) -> None:
    command = b"BODY.PEEK[HEADER.FIELDS (" + b" ".join(names) + b")]"
    (item,) = fetch_items(Cursor(command_parts(command)))
    assert item.section is not None
    echoed = item.response_name().encode("ascii", "surrogateescape")
    assert echoed == b"BODY[" + spec + b"]"
    (again,) = fetch_items(Cursor(command_parts(echoed)))
    assert again.section == item.section


def test_section_spec_without_fields_is_unchanged() -> None:
    assert Section((1, 2), "MIME").spec() == "1.2.MIME"
    assert Section((), "HEADER.FIELDS.NOT", ("X",)).spec() == "HEADER.FIELDS.NOT (X)"


def test_structure_parse_reads_8bit_mime_values() -> None:
    # fuzz/corpus/mime/crash-8bit-transfer-encoding
    raw = (b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\nContent-Transfer-Encoding:\x93 x\r\n"
           b"Content-ID: <\xff@x>\r\n\r\nbody\r\n--z--\r\n")
    st = parse(raw)
    (child,) = st.body.parts
    assert child.encoding.endswith("X") and child.id is not None
    assert render.body(st.body, True).startswith(b"((")


@pytest.mark.parametrize("header", [
    # fuzz/corpus/mime/crash-rfc2231-section-and-extended: the email
    # package's decode_params raised TypeError on "name*1" with "name*".
    b"Content-Type: text/plain; name*1=\"a\"; name*=%41",
    b"Content-Type: text/plain\r\nContent-Disposition: attachment; filename*1=a; filename*=b",
    b"Content-Type: multipart/mixed; boundary=q; x*1=a; x*=b",
])
def test_structure_parse_survives_the_email_packages_parameter_bugs(header: bytes) -> None:
    st = parse(header + b"\r\n\r\nbody\r\n")
    assert render.body(st.body, True).startswith(b"(")


def test_fetch_echoes_quoted_field_names_over_tls(server: Server, member: str, colleague: str) -> None:
    """The field-name echo against the real server, as a client sees it."""
    send(server, member, colleague, subject="Field names")
    c: Client = raw_session(server, colleague)
    lines = c.command("s", "SELECT INBOX")
    assert lines[-1].startswith(b"s OK"), lines
    c.send(b'f FETCH * (BODY.PEEK[HEADER.FIELDS ("X A" Subject)])\r\n')
    first = c.raw_line()
    assert re.match(rb'\* \d+ FETCH \(BODY\[HEADER\.FIELDS \("X A" SUBJECT\)\] \{\d+\}$', first), first
    size = int(first.rsplit(b"{", 1)[1][:-1])
    assert c.read_exact(size) == b"Subject: Field names\r\n\r\n"
    assert c.raw_line() == b")"
    assert c.raw_line().startswith(b"f OK")
