"""DATA: the wire format (CR LF only, SMTP smuggling, line length, the size
cap while streaming, pipelining after the end), the From header, the
conversation and attachment policy, and what gets stored on acceptance."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import pytest

from postvault.store.smallblobs import SMALL_MAX

from .client import message, stuff, transaction
from .conftest import COLLEAGUE, MEMBER, MEMBER2, OUTSIDER, PENDING, Server, World

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases

SMUGGLED = (b"MAIL FROM:<office@dental.test>\r\nRCPT TO:<front@clinic.test>\r\nDATA\r\n"
            b"From: office@dental.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n")


def counts(world: World) -> tuple[int, int, int]:
    return world.count(COLLEAGUE), world.count(MEMBER2), world.count(MEMBER, "Sent")


# --- the wire format ------------------------------------------------------------


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\r", b"\n..\n"])
def test_smtp_smuggling_never_ends_a_message(server: Server, world: World, fake_end: bytes) -> None:
    """Each fake end of data is data; its bare CR or LF then refuses the
    whole message, smuggled "second message" included."""
    before = counts(world)
    c = server.session(MEMBER)
    head = message(MEMBER, COLLEAGUE, "first")
    payload = head + b"body" + fake_end + SMUGGLED + b".\r\n"
    code, lines = transaction(c, [COLLEAGUE], payload, sender=MEMBER)
    assert code == 554 and lines[0].startswith("554 5.6.0 The message contains a bare CR or LF"), lines
    # Exactly one reply: the smuggled MAIL, RCPT and DATA were never commands.
    assert c.silent(0.2)
    assert c.cmd("NOOP") == (250, ["250 2.0.0 OK"])
    assert counts(world) == before


def test_the_real_end_of_data_twin(server: Server, world: World) -> None:
    before = counts(world)
    c = server.session(MEMBER)
    payload = message(MEMBER, COLLEAGUE, "first") + b"body\r\n.\r\n"
    code, lines = transaction(c, [COLLEAGUE], payload, sender=MEMBER)
    assert code == 250 and re.fullmatch(r"250 2\.0\.0 Message accepted for delivery; queue id [0-9a-f]{32}",
                                        lines[0]), lines
    assert counts(world) == (before[0] + 1, before[1], before[2] + 1)


@pytest.mark.parametrize("bad", [b"line one\nline two\r\n", b"line one\rline two\r\n", b"ends with CR\r\r\n",
                                 b"\n", b"x\r\n\n"])
def test_bare_cr_or_lf_anywhere_is_refused(server: Server, world: World, bad: bytes) -> None:
    before = counts(world)
    c = server.session(MEMBER)
    code, lines = transaction(c, [COLLEAGUE], message(MEMBER, COLLEAGUE) + bad + b"\r\n.\r\n", sender=MEMBER)
    assert code == 554 and lines[0].startswith("554 5.6.0 "), lines
    assert counts(world) == before


def test_dot_stuffing_round_trips(server: Server, world: World) -> None:
    body = ".leading dot\n..two dots\n.\nend\n"
    original = message(MEMBER, COLLEAGUE, "dots", body=body, msgid="<dots@dental.test>")
    c = server.session(MEMBER)
    code, lines = transaction(c, [COLLEAGUE], stuff(original), sender=MEMBER)
    assert code == 250, lines
    stored = world.read(COLLEAGUE)
    assert stored.endswith(original)


def test_line_length_limit(server: Server, world: World) -> None:
    before = counts(world)
    c = server.session(MEMBER)
    # 998 characters and CR LF: the longest line RFC 5321 allows.
    ok = message(MEMBER, COLLEAGUE, "long lines") + b"x" * 998 + b"\r\n" + b"." + b"y" * 997 + b"\r\n"
    assert transaction(c, [COLLEAGUE], stuff(ok), sender=MEMBER)[0] == 250
    too_long = message(MEMBER, COLLEAGUE, "longer") + b"x" * 1200 + b"\r\n"
    code, lines = transaction(c, [COLLEAGUE], stuff(too_long), sender=MEMBER)
    assert code == 500 and lines[0].startswith("500 5.5.2 A line of the message is longer than 1000"), lines
    # One huge line (no CR LF for 5 MB): refused the same, and in sync after.
    huge = message(MEMBER, COLLEAGUE, "huge") + b"z" * 5_000_000 + b"\r\n"
    assert transaction(c, [COLLEAGUE], stuff(huge), sender=MEMBER)[0] == 500
    assert c.cmd("NOOP")[0] == 250
    assert counts(world) == (before[0] + 1, before[1], before[2] + 1)


def test_undeclared_oversize_stream_is_cut_off(tight: Server, world: World) -> None:
    before = counts(world)
    c = tight.raw(user=MEMBER)
    big = message(MEMBER, COLLEAGUE, "big") + (b"a" * 76 + b"\r\n") * 4000  # about 300 KiB, limit 64 KiB
    code, lines = transaction(c, [COLLEAGUE], stuff(big), sender=MEMBER)
    assert code == 552 and lines[0].startswith("552 5.3.4 ") and "64 KiB" in lines[0], lines
    assert c.cmd("NOOP")[0] == 250
    # The twin: just under the limit.
    fits = message(MEMBER, COLLEAGUE, "fits") + (b"a" * 76 + b"\r\n") * 700
    assert transaction(c, [COLLEAGUE], stuff(fits), sender=MEMBER)[0] == 250
    c.close()
    assert counts(world) == (before[0] + 1, before[1], before[2] + 1)


def test_a_stream_that_never_ends_is_disconnected(tight: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="postvault.smtpd")
    c = tight.raw(user=MEMBER)
    assert c.cmd(f"MAIL FROM:<{MEMBER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{COLLEAGUE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    chunk = (b"b" * 998 + b"\r\n") * 1024
    try:
        for _ in range(24):  # 24 MB, never ended; the server gives up after ~16 MB past the limit
            c.send(chunk)
    except OSError:
        pass  # the server hung up while we were still sending
    # The 552 comes before the close, but a TCP reset (we were still
    # sending) may throw it away before we read it.
    try:
        code, lines = c.reply(timeout=10)
        assert code == 552 and "closing the connection" in lines[0], lines
    except OSError:
        pass
    assert c.closed()
    assert "oversize message never ended; closing" in caplog.text


def test_pipelined_commands_after_the_end_of_data_are_kept(server: Server, world: World) -> None:
    """RFC 2920: commands may follow the end of data in the same packet."""
    before = counts(world)
    c = server.raw(user=MEMBER)
    first = stuff(message(MEMBER, COLLEAGUE, "one"))
    second = stuff(message(MEMBER, MEMBER2, "two"))
    c.send(f"MAIL FROM:<{MEMBER}>\r\nRCPT TO:<{COLLEAGUE}>\r\nDATA\r\n".encode())
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
    c.send(first + f"MAIL FROM:<{MEMBER}>\r\nRCPT TO:<{MEMBER2}>\r\nDATA\r\n".encode())
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    c.send(second + b"QUIT\r\n")
    assert [c.reply()[0] for _ in range(2)] == [250, 221]
    c.close()
    assert counts(world) == (before[0] + 1, before[1] + 1, before[2] + 2)


def test_empty_message_is_refused_for_its_missing_from(server: Server) -> None:
    c = server.session(MEMBER)
    code, lines = transaction(c, [COLLEAGUE], b".\r\n", sender=MEMBER)
    assert code == 553 and "no From header" in lines[0]


# --- From, and what is added ------------------------------------------------------


@pytest.mark.parametrize("headers, expected", [
    ((("From", MEMBER2),), "553 5.7.1 The From header (front@clinic.test) is not the account"),
    ((("From", f"{MEMBER}, {MEMBER2}"),), "553 5.7.1 The From header of the message cannot be read"),
    ((("From", MEMBER), ("Sender", MEMBER2)), "553 5.7.1 The Sender header (front@clinic.test)"),
    ((), "553 5.7.1 The message has no From header"),
])
def test_from_header_must_be_the_account(server: Server, world: World, headers: tuple[tuple[str, str], ...],
                                         expected: str) -> None:
    before = counts(world)
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    rest = f"To: {COLLEAGUE}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    c = server.session(MEMBER)
    code, lines = transaction(c, [COLLEAGUE], stuff(head + rest), sender=MEMBER)
    assert code == 553 and lines[0].startswith(expected), lines
    # The twin: the account itself, with a display name, in any case.
    good = b"From: Smile Dental <Office@Dental.test>\r\n" + rest
    assert transaction(c, [COLLEAGUE], stuff(good), sender=MEMBER)[0] == 250
    assert counts(world) == (before[0] + 1, before[1], before[2] + 1)


def test_received_message_id_and_date_are_added(server: Server, world: World) -> None:
    c = server.raw(implicit=False)
    c.ehlo()
    c.starttls()
    c.ehlo()
    c.login(MEMBER)
    bare = f"From: {MEMBER}\r\nTo: {COLLEAGUE}\r\nSubject: no ids\r\n\r\nHello.\r\n".encode()
    code, lines = transaction(c, [COLLEAGUE], stuff(bare), sender=MEMBER)
    assert code == 250, lines
    c.close()
    stored = world.read(COLLEAGUE)
    head, _, body = stored.partition(b"\r\n\r\n")
    assert body == b"Hello.\r\n"
    text = head.decode()
    assert re.match(r"Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n\tby mail\.example\.test \(Postvault\) "
                    r"with ESMTPSA\r\n\t\(TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)\r\n\tfor <dr@ortho\.test>; "
                    r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000\r\n", text), text
    assert re.search(r"\r\nMessage-ID: <[0-9a-f]{32}@mail\.example\.test>\r\n", text)
    assert re.search(r"\r\nDate: \w{3}, ", text)
    # The sender's own copy in Sent is the same message.
    assert world.read(MEMBER, mailbox="Sent") == stored


def test_a_message_with_its_own_ids_is_stored_as_sent(server: Server, world: World) -> None:
    original = message(MEMBER, [COLLEAGUE, MEMBER2], "own ids", msgid="<own@dental.test>")
    client = server.smtps()
    assert client.sendmail(MEMBER, [COLLEAGUE, MEMBER2], original) == {}
    client.quit()
    for reader in (COLLEAGUE, MEMBER2):
        stored = world.read(reader)
        received, _, rest = stored.partition(b"\r\n\tby ")
        assert rest.endswith(original)
        # With several recipients, Received names none of them (Bcc stays hidden).
        assert b"for <" not in stored[: len(stored) - len(original)]
        assert stored.count(b"Message-ID:") == 1 and stored.count(b"\r\nDate:") == 1


def test_a_strange_helo_is_not_copied_into_received(server: Server, world: World) -> None:
    c = server.raw()
    assert c.cmd("EHLO bad(name);x")[0] == 250
    c.login(MEMBER)
    assert transaction(c, [COLLEAGUE], stuff(message(MEMBER, COLLEAGUE)), sender=MEMBER)[0] == 250
    c.close()
    assert world.read(COLLEAGUE).startswith(b"Received: from [127.0.0.1] ([127.0.0.1])\r\n")


def test_8bit_and_utf8_messages_are_kept_byte_for_byte(server: Server, world: World) -> None:
    """8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531/6532): end to end, since
    the store keeps the bytes."""
    original = message(MEMBER, COLLEAGUE, "Röntgenbild für Frau Müller", body="Grüße, 👋\n",
                       msgid="<utf8@dental.test>", utf8=True)
    assert "Röntgenbild".encode() in original
    c = server.session(MEMBER)
    assert c.cmd(f"MAIL FROM:<{MEMBER}> BODY=8BITMIME SMTPUTF8")[0] == 250
    assert c.cmd(f"RCPT TO:<{COLLEAGUE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(stuff(original))
    assert c.reply()[0] == 250
    assert world.read(COLLEAGUE).endswith(original)


# --- the conversation rules -------------------------------------------------------


def send(server: Server, sender: str, rcpts: list[str], data: bytes) -> tuple[int, list[str]]:
    return transaction(server.session(sender), rcpts, stuff(data), sender=sender)


def test_colleague_cannot_start_a_conversation(server: Server, world: World) -> None:
    before = world.count(MEMBER)
    code, lines = send(server, COLLEAGUE, [MEMBER], message(COLLEAGUE, MEMBER, "new topic"))
    assert code == 550 and lines[0].startswith("550 5.7.1 Colleagues can only reply"), lines
    code, lines = send(server, COLLEAGUE, [MEMBER], message(COLLEAGUE, MEMBER, "guess",
                                                            in_reply_to="<not-mine@dental.test>"))
    assert code == 550 and "is not in your mailbox" in lines[0], lines
    assert world.count(MEMBER) == before
    # The twin: a reply to a message it received.
    assert send(server, MEMBER, [COLLEAGUE], message(MEMBER, COLLEAGUE, "case 1", msgid="<case1@dental.test>"))[0] \
        == 250
    code, lines = send(server, COLLEAGUE, [MEMBER], message(COLLEAGUE, MEMBER, "Re: case 1",
                                                            in_reply_to="<case1@dental.test>"))
    assert code == 250, lines
    assert world.count(MEMBER) == before + 1


def test_colleague_cannot_add_someone_to_a_conversation(server: Server, world: World) -> None:
    # Two conversations: one with the colleague and both members, one with the colleague and one member.
    assert send(server, MEMBER, [COLLEAGUE, MEMBER2],
                message(MEMBER, [COLLEAGUE, MEMBER2], "team", msgid="<team@dental.test>"))[0] == 250
    assert send(server, MEMBER, [COLLEAGUE], message(MEMBER, COLLEAGUE, "private", msgid="<private@dental.test>"))[0] \
        == 250
    before = world.count(MEMBER2)
    # RCPT lets MEMBER2 through (it shares "team" with the colleague); the thread decides.
    code, lines = send(server, COLLEAGUE, [MEMBER, MEMBER2],
                       message(COLLEAGUE, [MEMBER, MEMBER2], "Re: private", in_reply_to="<private@dental.test>"))
    assert code == 550 and lines[0] == ("550 5.7.1 front@clinic.test is not part of this conversation; colleagues "
                                        "can't add recipients."), lines
    assert world.count(MEMBER2) == before
    code, lines = send(server, COLLEAGUE, [MEMBER, MEMBER2],
                       message(COLLEAGUE, [MEMBER, MEMBER2], "Re: team", in_reply_to="<team@dental.test>"))
    assert code == 250, lines
    assert world.count(MEMBER2) == before + 1


# --- attachments ------------------------------------------------------------------


def test_blocked_attachment_is_refused_and_named(server: Server, world: World) -> None:
    before = counts(world)
    code, lines = send(server, MEMBER, [COLLEAGUE], message(MEMBER, COLLEAGUE, attachments=(
        ("invoice.pdf.exe", b"just text, not a program"),)))
    assert code == 550 and lines[0].startswith("550 5.7.1 ") and "invoice.pdf.exe" in lines[0], lines
    code, lines = send(server, MEMBER, [COLLEAGUE], message(MEMBER, COLLEAGUE, attachments=(
        ("tool.pdf", b"MZ\x90\x00" + b"\x00" * 200),)))
    assert code == 550 and lines[0].startswith("550 5.7.1 "), lines
    assert counts(world) == before
    code, lines = send(server, MEMBER, [COLLEAGUE], message(MEMBER, COLLEAGUE, attachments=(
        ("xray.pdf", b"%PDF-1.7\n" + b"0" * 2000),)))
    assert code == 250, lines
    assert counts(world) == (before[0] + 1, before[1], before[2] + 1)


def test_office_exception_applies_to_its_conversations_only(server: Server, world: World) -> None:
    scan = (("crown.img", b"raw scanner image " * 20),)
    # MEMBER allows .img (blocked by default): its own messages, and replies to it.
    assert send(server, MEMBER, [COLLEAGUE], message(MEMBER, COLLEAGUE, "scan", msgid="<scan@dental.test>",
                                                     attachments=scan))[0] == 250
    code, lines = send(server, COLLEAGUE, [MEMBER], message(COLLEAGUE, MEMBER, "Re: scan",
                                                            in_reply_to="<scan@dental.test>", attachments=scan))
    assert code == 250, lines
    # MEMBER2 has no such exception.
    before = world.count(OUTSIDER)
    code, lines = send(server, MEMBER2, [OUTSIDER], message(MEMBER2, OUTSIDER, "scan", attachments=scan))
    assert code == 550 and "crown.img" in lines[0], lines
    assert world.count(OUTSIDER) == before


def test_logs_carry_ids_never_content(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="postvault.smtpd")
    subject, filename, body = "Biopsy result for Jane Roe", "roe-biopsy.exe", "malignant, call her today"
    code, _ = send(server, MEMBER, [COLLEAGUE], message(MEMBER, COLLEAGUE, subject, body=body,
                                                       attachments=((filename, b"data"),)))
    assert code == 550
    assert send(server, MEMBER, [COLLEAGUE], message(MEMBER, COLLEAGUE, subject, body=body))[0] == 250
    text = caplog.text
    assert "rule=attachment.extension" in text and "accepted queue_id=" in text and "session=" in text
    for secret in (subject, filename, body, "Jane", "biopsy"):
        assert secret not in text


# --- waiting mail -----------------------------------------------------------------


def test_mail_to_an_invited_colleague_waits_until_sign_up(server: Server, world: World) -> None:
    original = message(MEMBER, PENDING, "Welcome", msgid="<welcome@dental.test>", body="Your first case.\n")
    assert send(server, MEMBER, [PENDING], original)[0] == 250
    from .client import PASSWORD

    world.store.sign_up(world.tokens[PENDING], "New Ortho", "Europe/Berlin", PASSWORD)
    assert world.read(PENDING).endswith(original)
    # And the newly signed-up colleague can answer it.
    code, lines = send(server, PENDING, [MEMBER], message(PENDING, MEMBER, "Re: Welcome",
                                                          in_reply_to="<welcome@dental.test>"))
    assert code == 250, lines


def test_a_small_message_is_sealed_on_the_loop_a_large_one_on_a_worker_thread(
        server: Server, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """handler.py: with a store whose reads are local (SQLite), a message of
    at most SMALL_MAX bytes is checked and sealed on the event loop itself,
    a larger one on a worker thread; with PostgreSQL, both on a worker
    thread. Either way both are stored whole."""
    store = server.runtime.store
    real = store.prepare_delivery
    seen: list[str] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "prepare_delivery", recording)
    small = message(MEMBER, MEMBER2, "sealed where (small)", msgid="<where-small@dental.test>")
    large = message(MEMBER, MEMBER2, "sealed where (large)", msgid="<where-large@dental.test>",
                    body="Scan notes, line for line.\n" * 3000)
    assert len(small) < SMALL_MAX < len(large)
    client = server.smtps()
    for raw in (small, large):
        assert client.sendmail(MEMBER, [MEMBER2], raw) == {}
        assert world.read(MEMBER2).endswith(raw)
    client.quit()
    loop_thread = "smtpd-test-loop"
    if store.local_reads:
        assert seen[0] == loop_thread and seen[1] != loop_thread, seen
    else:
        assert loop_thread not in seen and len(seen) == 2, seen
