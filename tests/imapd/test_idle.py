"""IDLE and other untagged updates, applied incrementally (issue 5 item 7):
several sessions IDLE on a mailbox of over a thousand messages; a message
delivered by SMTP (filed on a server worker thread) and one APPENDed by
another session show as ``* N EXISTS`` within one second at every idler,
another session's flag change as ``FETCH``, its expunge as ``EXPUNGE``.
Changes made by another process (which the change bus can't hear) show at
the next NOOP. Also SELECT's figures on that mailbox, and STARTTLS with
the server's own TLS layer."""

from __future__ import annotations

import re
import time

from .client import Client
from .conftest import PASSWORD, Server
from .test_imaplib import imaps, raw_session, read_until, send

IDLERS = 4


def fill(server: Server, member: str, first: int = 10, doublings: int = 7) -> int:
    """``first * 2**doublings`` messages in INBOX, cheaply: COPY re-uses
    the sealed message, so only ``first`` are sealed."""
    for n in range(first):
        server.store.deliver(f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode(), server.sender, [member])
    session = server.store.login(member, PASSWORD)
    for _ in range(doublings):
        uids = [m.uid for m in server.store.snapshot(session, "INBOX").messages]
        server.store.copy(session, "INBOX", uids, "INBOX")
    total = first * 2 ** doublings
    # Some read, so that UNSEEN has something to say.
    uids = [m.uid for m in server.store.snapshot(session, "INBOX").messages]
    server.store.set_flags(session, "INBOX", uids[:100] + uids[101:], ["\\Seen"], "add")
    return total


def test_many_idlers_hear_delivery_append_flags_and_expunge_quickly(server: Server) -> None:
    member = server.account("member")
    total = fill(server, member)
    idlers = []
    for _ in range(IDLERS):
        c = raw_session(server, member)
        lines = c.command("s", "SELECT INBOX")
        assert f"* {total} EXISTS".encode() in lines
        assert b"* OK [UNSEEN 101] First unseen message" in lines
        assert lines[-1].startswith(b"s OK [READ-WRITE]")
        c.send(b"i IDLE\r\n")
        assert c.response() == b"+ idling"
        idlers.append(c)

    def all_see(wanted: bytes, since: float) -> list[float]:
        waits = []
        for c in idlers:
            lines = read_until(c, wanted, 5)
            waits.append(time.monotonic() - since)
            assert wanted in lines[-1], lines
        return waits

    # SMTP: the server files it on a worker thread and the bus wakes every idler.
    start = time.monotonic()
    send(server, server.account("member"), member, subject="Referral")
    acked = time.monotonic()
    waits = all_see(f"* {total + 1} EXISTS".encode(), acked)
    assert max(waits) < 1.0, (waits, acked - start)

    actor = imaps(server, member)
    actor.select("INBOX")
    # APPEND by another session of the same account.
    t = time.monotonic()
    typ, _ = actor.append("INBOX", None, None, b"Subject: note\r\n\r\nfiled by another session\r\n")
    assert typ == "OK"
    waits = all_see(f"* {total + 2} EXISTS".encode(), t)
    assert max(waits) < 1.0, waits

    # Flags changed by another session: FETCH with the new flags.
    t = time.monotonic()
    actor.store("3", "+FLAGS", "(\\Flagged)")
    for c in idlers:
        line = read_until(c, b"FETCH", 5)[-1]
        assert re.fullmatch(rb"\* 3 FETCH \(UID \d+ FLAGS \(\\Flagged \\Seen( \\Recent)?\)\)", line), line
    assert time.monotonic() - t < 2.0

    # Expunged by another session: EXPUNGE, and EXISTS counts on from there.
    actor.store("2", "+FLAGS", "(\\Deleted)")
    actor.expunge()
    for c in idlers:
        assert read_until(c, b"EXPUNGE", 5)[-1] == b"* 2 EXPUNGE"
    actor.append("INBOX", None, None, b"Subject: late\r\n\r\none more\r\n")
    for c in idlers:
        assert read_until(c, b"EXISTS", 5)[-1] == f"* {total + 2} EXISTS".encode()
        c.send(b"DONE\r\n")
        assert read_until(c, b"i OK", 5)[-1] == b"i OK IDLE terminated"
        # The view kept sequence numbers right through all of it.
        lines = c.command("f", "FETCH 2:3 (UID FLAGS)")
        assert lines[-1] == b"f OK FETCH completed"
        assert re.fullmatch(rb"\* 2 FETCH \(UID \d+ FLAGS \(\\Flagged \\Seen( \\Recent)?\)\)", lines[0]), lines
        c.close()
    actor.logout()


def test_changes_by_another_process_show_at_noop(server: Server) -> None:
    member = server.account("member")
    total = fill(server, member, first=6, doublings=5)
    c = raw_session(server, member)
    c.command("s", "SELECT INBOX")
    flags = c.command("f", "FETCH 1:* (UID FLAGS)")
    uid_of = {int(m[1]): int(m[2]) for m in (re.match(rb"\* (\d+) FETCH \(UID (\d+) ", line) for line in flags) if m}
    assert len(uid_of) == total
    # This test process is "another process": the server's bus hears none of it.
    session = server.store.login(member, PASSWORD)
    server.store.set_flags(session, "INBOX", [uid_of[5], uid_of[9]], ["\\Deleted"], "add")
    server.store.expunge(session, "INBOX")
    server.store.set_flags(session, "INBOX", [uid_of[20]], ["\\Answered"], "add")
    server.store.deliver(b"Subject: from afar\r\n\r\nhello\r\n", server.sender, [member])
    lines = c.command("n", "NOOP")
    assert lines[:2] == [b"* 9 EXPUNGE", b"* 5 EXPUNGE"], lines
    # Message 20 is number 18 once 5 and 9 are gone.
    assert any(re.fullmatch(rb"\* 18 FETCH \(UID %d FLAGS \(\\Answered \\Seen( \\Recent)?\)\)" % uid_of[20], line)
               for line in lines), lines
    assert f"* {total - 1} EXISTS".encode() in lines
    assert lines[-1] == b"n OK NOOP completed"
    c.close()


def test_starttls_with_the_servers_own_tls(server: Server) -> None:
    member = server.account("member")
    c = Client("127.0.0.1", server.imap, None)
    assert c.response().startswith(b"* OK")
    # Plaintext pipelined after STARTTLS must be discarded (RFC 3501 §6.2.1).
    c.send(b"t STARTTLS\r\nx LOGIN evil pipelined\r\n")
    assert c.response() == b"t OK Begin TLS negotiation now"
    c.starttls(server.context())
    lines = c.command("l", f'LOGIN {member} "{PASSWORD}"')
    assert lines[-1].startswith(b"l OK"), lines
    assert not any(line.startswith(b"x ") for line in lines)
    assert c.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
    # A large APPEND and FETCH through it (many TLS records both ways).
    body = b"".join(b"line %06d of a long scan report\r\n" % i for i in range(60000))
    msg = b"Subject: big\r\n\r\n" + body
    c.send(b"a APPEND Drafts {%d}\r\n" % len(msg))
    assert c.response().startswith(b"+")
    c.send(msg + b"\r\n")
    assert c.response().startswith(b"a OK")
    c.command("s2", "SELECT Drafts")
    c.send(b"f FETCH 1 (BODY.PEEK[])\r\n")
    head = c.raw_line()
    size = int(re.search(rb"\{(\d+)\}$", head)[1])  # type: ignore[index]
    assert c.read_exact(size) == msg
    assert c.raw_line() == b")"
    assert c.raw_line() == b"f OK FETCH completed"
    c.close()
