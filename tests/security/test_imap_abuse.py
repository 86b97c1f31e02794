"""IMAP abuse against the real ``postvault serve`` (a subprocess, so its
memory can be read): literal bombs, deep parentheses, invalid sequence
sets, hostile mailbox names, and a header crafted to break a response.

Sources: RFC 9051 §4.3 and RFC 3501 §7.5 (a server refuses a literal with
a tagged NO/BAD instead of "+", so the client never sends it); RFC 7888 §4
(LITERAL+/LITERAL-: non-synchronizing literals up to 4096 octets); RFC 7889
(APPENDLIMIT: refuse before the continuation); CWE-770 (allocation without
limits) and CVE-2019-11500 (Dovecot: NUL in IMAP literals and strings);
CWE-674 (uncontrolled recursion: nested parenthesized lists, RFC 9051
§4.4); RFC 9051 §9 ``sequence-set`` (numbers 1..4294967295, "*"); CWE-22
(path traversal) and RFC 9051 §5.1 / §6.3.9 (names, hierarchy; "%" and "*"
are LIST wildcards, never names); CWE-74 (injection into a response)
against RFC 9051 §4.3 quoting of ENVELOPE strings.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.imapd.client import Client

from .conftest import Serve


def greeted(c: Client) -> Client:
    assert c.response().startswith(b"* OK")
    return c


def no_continuation(c: Client, seconds: float = 0.5) -> bytes:
    """The next response line, which must not be a continuation request."""
    c.sock.settimeout(seconds + 10)
    line = c.raw_line()
    assert not line.startswith(b"+"), line
    return line


def deliver(serve: Serve, to: str, subject: str = "hello", extra: bytes = b"") -> None:
    frm = serve.sender
    raw = (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\n".encode() + extra
           + b"Message-ID: <x-" + str(time.monotonic_ns()).encode() + b"@ortho.test>\r\n\r\nbody\r\n")
    serve.store.deliver(raw, frm, [to])


@pytest.fixture(scope="module")
def box(serve: Serve) -> Iterator[Client]:
    """One logged-in session with INBOX (two messages) selected, shared by
    the parametrized cases (a login costs bcrypt and Argon2id)."""
    member = serve.account()
    deliver(serve, member)
    deliver(serve, member)
    c = serve.login(member)
    assert c.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
    yield c
    c.close()


def _imap_string(data: bytes, i: int) -> tuple[bytes, bytes]:
    """The quoted string or literal at data[i]: (its value, what follows)."""
    if data[i:i + 1] == b"{":
        m = re.match(rb"\{(\d+)\}\r\n", data[i:])
        assert m, data[i:i + 40]
        n, j = int(m[1]), i + m.end()
        return data[j:j + n], data[j + n:]
    assert data[i:i + 1] == b'"', data[i:i + 40]
    out, j = bytearray(), i + 1
    while data[j:j + 1] != b'"':
        if data[j:j + 1] == b"\\":
            j += 1
        out += data[j:j + 1]
        j += 1
    return bytes(out), data[j + 1:]


# --- literal bombs -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [b"a LOGIN {99999999999}", b'a LOGIN x {99999999999}',
                                     b"a AUTHENTICATE PLAIN {99999999999}"])
def test_literal_bomb_before_login_is_refused_without_continuation(serve: Serve, command: str) -> None:
    # RFC 9051 §4.3 / RFC 3501 §7.5: refused with a tagged response, never "+".
    c = greeted(serve.imaps())
    c.send(command + b"\r\n")
    line = no_continuation(c)
    assert line.startswith((b"a BAD", b"a NO")), line
    assert b"TOOBIG" in line or b"BAD" in line
    # The session goes on: the next command is answered.
    assert c.command("b", "NOOP")[-1] == b"b OK NOOP completed"
    c.close()


def test_append_literal_bomb_is_refused_before_continuation(serve: Serve) -> None:
    # RFC 7889: APPENDLIMIT; a larger APPEND is refused before "+".
    c = serve.login(serve.account())
    c.send(b"a APPEND INBOX {99999999999}\r\n")
    line = no_continuation(c)
    assert line.startswith(b"a NO [TOOBIG]"), line
    c.send(b"b APPEND INBOX (\\Seen) {52428801}\r\n")  # the limit plus one
    assert no_continuation(c).startswith(b"b NO [TOOBIG]")
    assert c.command("n", "NOOP")[-1] == b"n OK NOOP completed"
    c.close()


def test_nonsync_literal_bomb_closes_the_connection(serve: Serve) -> None:
    # RFC 7888 §4 (LITERAL-): the client will send without waiting, so a
    # far-too-large one ends the session rather than being read.
    c = greeted(serve.imaps())
    c.send(b"a LOGIN {99999999999+}\r\n")
    assert no_continuation(c).startswith(b"a BAD [TOOBIG]")
    assert c.response().startswith(b"* BYE")
    with pytest.raises((EOFError, OSError)):
        c.command("b", "NOOP")
    c.close()


def test_memory_stays_flat_under_discarded_literals(serve: Serve) -> None:
    # RFC 7888 §4 / CWE-770: a refused non-synchronizing literal the client
    # sends anyway is read and dropped, never kept. 64 MB through, RSS flat.
    c = greeted(serve.imaps())
    before = serve.rss_kib()
    chunk = b"x" * (1 << 20)
    for i in range(4):
        size = 16 << 20
        c.send(b"a%d LOGIN {%d+}\r\n" % (i, size))
        for _ in range(size >> 20):
            c.send(chunk)
        c.send(b"\r\n")
        assert c.response().startswith(b"a%d BAD [TOOBIG]" % i)
    assert c.command("n", "NOOP")[-1] == b"n OK NOOP completed"
    grown = serve.rss_kib() - before
    assert grown < 24_000, f"server grew by {grown} KiB while discarding 64 MiB"
    c.close()


def test_many_small_literals_in_one_command_are_capped(serve: Serve) -> None:
    # The per-command total is capped too (max_literal_size, 64 KiB), so a
    # thousand 4 KiB literals cannot add up.
    c = serve.login(serve.account())
    c.send(b"a SEARCH")
    refused = b""
    for _ in range(40):
        c.send(b" TEXT {4096+}\r\n" + b"y" * 4096)
        c.sock.settimeout(0.05)
        try:
            refused += c.sock.recv(65536)
        except (TimeoutError, OSError):
            pass
        if b"a BAD" in refused or b"a NO" in refused:
            break
    c.sock.settimeout(10)
    c.send(b"\r\n")
    c.buf = refused + c.buf
    lines = []
    while not any(line.startswith(b"a ") for line in lines):
        lines.append(c.raw_line())
    assert any(line.startswith(b"a BAD [TOOBIG]") for line in lines), lines
    c.close()


# --- deep parentheses and sequence sets --------------------------------------------------


@pytest.mark.parametrize("command", [
    pytest.param("SEARCH " + "(" * 10_000 + "ALL" + ")" * 10_000, id="search-parens"),
    pytest.param("SEARCH " + "NOT " * 10_000 + "ALL", id="search-not-chain"),
    pytest.param("SEARCH " + "OR ALL " * 5_000 + "ALL", id="search-or-chain"),
    pytest.param("FETCH 1 " + "(" * 10_000 + "FLAGS" + ")" * 10_000, id="fetch-parens"),
    pytest.param("FETCH 1 (BODY[HEADER.FIELDS " + "(" * 10_000 + "A" + ")" * 10_000 + "])", id="fetch-fields"),
    pytest.param("STORE 1 +FLAGS " + "(" * 10_000 + "\\Seen" + ")" * 10_000, id="store-parens"),
    pytest.param("ID " + "(" * 10_000 + ")" * 10_000, id="id-parens"),
    pytest.param("APPEND INBOX " + "(" * 10_000 + ")" * 10_000 + " {1+}\r\nx", id="append-flags"),
])
def test_deep_nesting_is_refused_and_the_session_survives(box: Client, command: str) -> None:
    # CWE-674; RFC 9051 §4.4. A tagged BAD, never a crash or a silence.
    lines = box.command("a", command)
    assert lines[-1].startswith(b"a BAD"), lines[-1][:200]
    assert not any(b"Internal" in line for line in lines)
    assert box.command("n", "NOOP")[-1] == b"n OK NOOP completed"


def test_realistic_nesting_still_works(box: Client) -> None:
    # The twin: an OR chain over 150 senders (Thunderbird's quick filter
    # builds one level per alternative) and 40 parentheses are answered.
    ors = "OR " * 150 + " ".join(f"FROM s{i}@x.test" for i in range(151))
    assert box.command("a", f"SEARCH {ors}")[-1].startswith(b"a OK")
    assert box.command("b", "SEARCH " + "(" * 40 + "ALL" + ")" * 40)[-1].startswith(b"b OK")


@pytest.mark.parametrize("seqset", ["0", "0:1", "1:0", "-1", "1,,2", "1:*:3", "*:", ":1", "1:", "a",
                                    "4294967296", "1:4294967296", "99999999999999999999", "1,",
                                    "1.5", "$", "1:2:3", "1 :2"])
def test_invalid_sequence_sets_are_bad(box: Client, seqset: str) -> None:
    # RFC 9051 §9: seq-number = nz-number / "*"; nz-number < 2^32.
    for cmd in (f"FETCH {seqset} FLAGS", f"UID FETCH {seqset} FLAGS", f"STORE {seqset} +FLAGS (\\Seen)",
                f"SEARCH {seqset}", f"COPY {seqset} Trash"):
        last = box.command("a", cmd)[-1]
        assert last.startswith((b"a BAD", b"a NO")), (cmd, last)
    assert box.command("n", "NOOP")[-1] == b"n OK NOOP completed"


def test_huge_ranges_are_not_expanded(serve: Serve, box: Client) -> None:
    # A valid range over 2^32 numbers on a two-message mailbox: answered for
    # the two, and memory stays flat (ranges are resolved against the
    # mailbox, never enumerated).
    c = box
    before = serve.rss_kib()
    lines = c.command("a", "UID FETCH 1:4294967295,1:4294967295,4294967295:1 FLAGS")
    assert lines[-1].startswith(b"a OK") and len(lines) == 3, lines
    lines = c.command("b", "UID SEARCH UID 1:4294967295 NOT UID 4294967295")
    assert lines[-1].startswith(b"b OK"), lines
    lines = c.command("c", "UID STORE 1:4294967295 +FLAGS.SILENT (\\Seen)")
    assert lines[-1].startswith(b"c OK"), lines
    assert serve.rss_kib() - before < 20_000


# --- mailbox names ---------------------------------------------------------------------------


def test_mailbox_names_cannot_reach_another_account(serve: Serve) -> None:
    # CWE-22 (path traversal in mailbox names); RFC 9051 §5.1 and §6.3.9.
    victim = serve.account(name="victim")
    deliver(serve, victim, "victim-secret")
    attacker = serve.account(name="attacker")
    local, domain = victim.split("@")
    names = ["../INBOX", "../../INBOX", f"../{victim}/INBOX", f"{victim}/INBOX", f"~{local}/INBOX",
             f"#users/{local}/INBOX", f"Other Users/{victim}/INBOX", f"user/{local}", f"user.{local}",
             "/INBOX", "INBOX/../../" + victim, "INBOX/..", "..", ".", "/etc/passwd", "INBOX/%", "INBOX/*",
             "%", "*", f"{domain}/{local}/INBOX"]
    c = serve.login(attacker)
    for i, name in enumerate(names):
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for cmd in (f"SELECT {quoted}", f"EXAMINE {quoted}", f"STATUS {quoted} (MESSAGES UNSEEN)",
                    f"CREATE {quoted}", f"RENAME INBOX {quoted}", f"DELETE {quoted}"):
            lines = c.command(f"t{i}", cmd)
            assert not lines[-1].startswith(b"t%d OK" % i), (cmd, lines)
            assert not any(b"victim" in line and b"EXISTS" in line for line in lines)
        c.send(f"a{i} APPEND {quoted} {{3}}\r\n".encode())
        line = c.raw_line()
        if line.startswith(b"+"):
            c.send(b"x\r\n\r\n")
            line = c.response()
        assert not line.startswith(b"a%d OK" % i), (name, line)
    # LIST with wildcards and traversal in the reference shows only the attacker's own folders.
    listed = []
    for ref, pattern in (('""', '"*"'), ('""', '"%"'), ('"../"', '"*"'), ('"../../"', '"%"'),
                         (f'"{victim}/"', '"*"'), ('"~"', '"*"'), ('"/"', '"*"'), ('""', '"../*"')):
        lines = c.command("l", f"LIST {ref} {pattern}")
        assert lines[-1].startswith(b"l OK") or lines[-1].startswith(b"l BAD") or lines[-1].startswith(b"l NO")
        listed += [line for line in lines if line.startswith(b"* LIST")]
    names_seen = {re.sub(rb'^\* LIST \([^)]*\) "/" ', b"", line).strip(b'"') for line in listed}
    assert names_seen <= {b"INBOX", b"Drafts", b"Sent", b"Trash", b""}, names_seen
    c.close()
    # The victim's mailbox is untouched and still only theirs.
    v = serve.login(victim)
    lines = v.command("s", "SELECT INBOX")
    assert b"* 1 EXISTS" in lines
    v.close()


@pytest.mark.parametrize("name", ["new%folder", "new*folder", "a\x00b", "a\r\nb", "a\x7fb", "a/../b"])
def test_wildcards_and_controls_are_never_folder_names(box: Client, name: str) -> None:
    # RFC 9051 §5.1: "%" and "*" are LIST wildcards; controls are not text.
    c = box
    literal = name.encode()
    c.send(b"a CREATE {%d}\r\n" % len(literal))
    line = c.raw_line()
    if line.startswith(b"+"):
        c.send(literal + b"\r\n")
        line = c.response()
        while not line.startswith(b"a "):
            line = c.response()
    assert not line.startswith(b"a OK") or b"ALREADYEXISTS" in line, line
    lines = c.command("l", 'LIST "" "*"')
    assert all(literal not in ln for ln in lines)


# --- a response-injecting message ------------------------------------------------------------


def test_hostile_header_cannot_forge_a_response(serve: Serve) -> None:
    # CWE-74, response injection through message data: quotes, backslashes, braces
    # and a fake tagged OK in Subject must come back as one quoted string or
    # literal inside the ENVELOPE, never as protocol.
    member = serve.account()
    evil = 'x" NIL NIL) UID 999 FLAGS (\\Deleted)) \\\r\n\t{5}\r\n\tz OK fake'
    deliver(serve, member, evil)
    c = serve.login(member)
    assert c.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
    c.send(b"f FETCH 1 (ENVELOPE UID)\r\n")
    first = c.raw_line()
    assert first.startswith(b"* 1 FETCH ("), first
    # Read to the tagged answer, following literals exactly.
    body = first
    while True:
        m = re.search(rb"\{(\d+)\}$", body.split(b"\r\n")[-1])
        if m:
            body += b"\r\n" + c.read_exact(int(m[1]))
            body += c.raw_line()
            continue
        break
    nxt = c.raw_line()
    assert nxt.startswith(b"f OK"), (body, nxt)
    # The subject is the envelope's second field: one quoted string (or a
    # literal), and unquoting it gives back the unfolded header exactly.
    start = body.index(b"ENVELOPE (NIL ") + len(b"ENVELOPE (NIL ")
    subject, rest = _imap_string(body, start)
    assert subject == evil.replace("\r\n", "").encode(), subject
    assert rest.startswith(b" ((NIL NIL ") and rest.endswith(b" UID 1)"), rest
    assert b"UID 999" not in rest
    assert c.command("n", "NOOP")[-1] == b"n OK NOOP completed"
    c.close()
