"""SMTP smuggling: every end-of-data look-alike is data, never the end.

Source: T. Longin (SEC Consult), "SMTP Smuggling - Spoofing E-Mails
Worldwide", 18 Dec 2023, https://sec-consult.com/blog/detail/smtp-smuggling-spoofing-e-mails-worldwide/
and its follow-up (CVE-2023-51764 Postfix, CVE-2023-51765 Sendmail,
CVE-2023-51766 Exim): a sender ends its message with a sequence that one
server takes for CR LF . CR LF and another does not, so a second,
"smuggled" message follows inside the first. RFC 5321 §4.1.1.4 and §2.3.8:
the end of data is CR LF . CR LF only, and bare CR or LF must not appear.

Postvault refuses a message that holds a bare CR or LF anywhere (554
5.6.0), so each variant refuses the whole transaction; the smuggled
commands never run (no second reply) and nobody receives anything.
"""

from __future__ import annotations

import pytest

from tests.smtpd.client import message, transaction
from tests.smtpd.conftest import COLLEAGUE, MEMBER, MEMBER2, Server, World

SMUGGLED = (b"MAIL FROM:<office@dental.test>\r\nRCPT TO:<front@clinic.test>\r\nDATA\r\n"
            b"From: office@dental.test\r\nTo: front@clinic.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n")

# SEC Consult's table of end-of-data variants (and the ones its scanner,
# smtp-smuggling-tools, tries), each of which some receiver took for the end.
FAKE_ENDS = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\r.\n", id="CR.LF"),
    pytest.param(b"\n.\r", id="LF.CR"),
    pytest.param(b"\r\n.\r\r\n", id="CRLF.CRCRLF"),
    pytest.param(b"\n..\n", id="LF..LF"),
    pytest.param(b"\r\n\n.\r\n", id="CRLF-LF.CRLF"),
]


def counts(world: World) -> tuple[int, int, int]:
    return world.count(COLLEAGUE), world.count(MEMBER2), world.count(MEMBER, "Sent")


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_fake_end_of_data_smuggles_nothing(smtp: Server, world: World, fake_end: bytes) -> None:
    # SEC Consult, SMTP Smuggling (Dec 2023), "end-of-data sequences"; RFC 5321 §2.3.8, §4.1.1.4.
    before = counts(world)
    c = smtp.session(MEMBER)
    payload = message(MEMBER, COLLEAGUE, "first") + b"body" + fake_end + SMUGGLED + b".\r\n"
    code, lines = transaction(c, [COLLEAGUE], payload, sender=MEMBER)
    assert code == 554 and lines[0].startswith("554 5.6.0 The message contains a bare CR or LF"), lines
    assert c.silent(0.2)  # one reply: the smuggled MAIL, RCPT and DATA never ran
    assert c.cmd("NOOP") == (250, ["250 2.0.0 OK"])
    assert counts(world) == before


@pytest.mark.parametrize("fake_end", [pytest.param(b"\r\n\x00.\r\n", id="CRLF-NUL.CRLF"),
                                      pytest.param(b"\r\n.\x00\r\n", id="CRLF.NUL-CRLF"),
                                      pytest.param(b"\r\n. \r\n", id="CRLF.SP-CRLF")])
def test_near_miss_without_bare_newline_stays_in_the_first_message(smtp: Server, world: World,
                                                                   fake_end: bytes) -> None:
    # SEC Consult (Dec 2023) NUL and trailing-space variants: with no bare CR
    # or LF, the look-alike is only data. One message, to the first
    # recipient; the "smuggled" recipient gets nothing.
    before = counts(world)
    c = smtp.session(MEMBER)
    payload = message(MEMBER, COLLEAGUE, "first") + b"body" + fake_end + SMUGGLED + b".\r\n"
    code, lines = transaction(c, [COLLEAGUE], payload, sender=MEMBER)
    if code == 250:
        assert counts(world) == (before[0] + 1, before[1], before[2] + 1)
        assert b"smuggled body" in world.read(COLLEAGUE)  # it is body text of the first message
    else:  # refusing NUL outright would be as good
        assert code == 554, lines
        assert counts(world) == before
    assert c.silent(0.2)
    assert c.cmd("NOOP") == (250, ["250 2.0.0 OK"])


@pytest.mark.parametrize("line", [b"NOOP\nNOOP\r\n", b"NOOP\rNOOP\r\n", b"RSET\nMAIL FROM:<office@dental.test>\r\n"])
def test_bare_newline_in_a_command_line_is_not_two_commands(smtp: Server, line: bytes) -> None:
    # The command-phase twin of smuggling (SEC Consult Dec 2023; RFC 5321 §2.3.8:
    # lines end with CR LF only): one line, at most one reply.
    c = smtp.raw(user=MEMBER)
    c.send(line)
    first = c.reply()
    assert first[0] >= 500 or first == (250, ["250 2.0.0 OK"]), first
    assert c.silent(0.3), "a bare CR or LF split the line into two commands"
    c.close()


def test_chunking_is_not_offered_and_bdat_is_refused(smtp: Server, world: World) -> None:
    # SEC Consult (Dec 2023): BDAT (RFC 3030) next to DATA is another way to
    # disagree on where a message ends; we offer only DATA.
    before = counts(world)
    c = smtp.raw(user=MEMBER)
    assert not any(ext.upper().startswith("CHUNKING") for ext in c.ehlo())
    assert c.cmd(f"MAIL FROM:<{MEMBER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{COLLEAGUE}>")[0] == 250
    body = message(MEMBER, COLLEAGUE, "bdat")
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    code, lines = c.reply()
    assert code in (500, 502), lines
    c.close()
    assert counts(world) == before


def test_pipelined_transaction_after_the_real_end_is_the_same_sender(smtp: Server, world: World) -> None:
    # What smuggling tries to achieve, done openly: a second transaction
    # pipelined after CR LF . CR LF (RFC 2920) runs under the same login and
    # meets the same checks; a forged From in it is refused (RFC 6409 §6.1).
    before = counts(world)
    c = smtp.session(MEMBER)
    spoof = message(MEMBER2, COLLEAGUE, "second")
    first = message(MEMBER, COLLEAGUE, "first") + b"body\r\n.\r\n"
    code, lines = transaction(c, [COLLEAGUE], first + f"MAIL FROM:<{MEMBER}>\r\nRCPT TO:<{COLLEAGUE}>\r\nDATA\r\n"
                              .encode() + spoof + b".\r\n", sender=MEMBER)
    assert code == 250, lines
    assert c.reply()[0] == 250 and c.reply()[0] == 250 and c.reply()[0] == 354
    code, lines = c.reply()
    assert code == 553 and "From header" in lines[0], lines
    assert counts(world) == (before[0] + 1, before[1], before[2] + 1)
