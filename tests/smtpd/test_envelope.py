"""MAIL FROM and RCPT TO: the sender is the account, declared sizes, each
recipient checked at once against the reply-only rules, the recipient
limit. Each refusal next to its allowed twin."""

from __future__ import annotations

from .client import message, stuff, transaction
from .conftest import COLLEAGUE, MEMBER, MEMBER2, NOT_INVITED, OUTSIDER, PENDING, Server, World


def test_mail_from_must_be_the_account(server: Server) -> None:
    c = server.session(MEMBER)
    code, lines = c.cmd(f"MAIL FROM:<{MEMBER2}>")
    assert code == 553 and lines[0].startswith("553 5.7.1 ") and MEMBER in lines[0], lines
    code, lines = c.cmd("MAIL FROM:<Office@Dental.TEST>")
    assert lines == ["250 2.1.0 Sender OK"]


def test_declared_size_over_the_limit_is_refused_at_mail(server: Server) -> None:
    c = server.session(MEMBER)
    code, lines = c.cmd(f"MAIL FROM:<{MEMBER}> SIZE={50 * 1024 * 1024 + 1}")
    assert code == 552 and lines[0].startswith("552 5.3.4 ") and "50 MiB" in lines[0], lines
    code, lines = c.cmd(f"MAIL FROM:<{MEMBER}> SIZE={50 * 1024 * 1024} BODY=8BITMIME")
    assert code == 250, lines


def test_auth_parameter_of_mail_is_accepted(server: Server) -> None:
    """RFC 4954 section 5: a server offering AUTH accepts MAIL ... AUTH=."""
    c = server.session(MEMBER)
    assert c.cmd(f"MAIL FROM:<{MEMBER}> AUTH=<>")[0] == 250
    c.cmd("RSET")
    assert c.cmd(f"MAIL FROM:<{MEMBER}> SIZE=100 AUTH=office+40dental.test")[0] == 250


def rcpt(server: Server, sender: str, address: str) -> tuple[int, list[str]]:
    c = server.session(sender)
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    return c.cmd(f"RCPT TO:<{address}>")


def test_unknown_recipient(server: Server) -> None:
    code, lines = rcpt(server, MEMBER, "nobody@nowhere.test")
    assert code == 550 and lines[0] == "550 5.1.1 nobody@nowhere.test has no account on this server; check the address."
    # In the address book without an account: accepted, and invited when the
    # message itself is accepted (tests/smtpd/test_first_mail_invites.py).
    assert rcpt(server, MEMBER, NOT_INVITED)[0] == 250


def test_member_writes_to_its_address_book_and_members_only(server: Server) -> None:
    code, lines = rcpt(server, MEMBER, OUTSIDER)
    assert code == 550 and lines[0].startswith("550 5.7.1 ") and "not in your address book" in lines[0], lines
    assert rcpt(server, MEMBER, COLLEAGUE) == (250, ["250 2.1.5 Recipient OK"])
    assert rcpt(server, MEMBER, MEMBER2)[0] == 250
    assert rcpt(server, MEMBER, PENDING)[0] == 250  # invited, not signed up yet


def test_colleague_writes_only_to_its_people(server: Server) -> None:
    # OUTSIDER was invited by MEMBER2 and shares no conversation with MEMBER
    # (no test delivers one).
    code, lines = rcpt(server, OUTSIDER, MEMBER)
    assert code == 550 and lines[0] == ("550 5.7.1 office@dental.test is not in any conversation you received; "
                                        "colleagues can only write to people in their conversations."), lines
    # RCPT lets the inviting member through; DATA decides whether it is a reply.
    assert rcpt(server, OUTSIDER, MEMBER2)[0] == 250


def test_too_many_recipients(tight: Server, world: World) -> None:
    before = {r: world.count(r) for r in (COLLEAGUE, MEMBER2, PENDING) if r != PENDING}
    c = tight.raw(user=MEMBER)
    assert c.cmd(f"MAIL FROM:<{MEMBER}>")[0] == 250
    for address in (COLLEAGUE, MEMBER2, PENDING):
        assert c.cmd(f"RCPT TO:<{address}>")[0] == 250
    # Naming one again is not another recipient.
    assert c.cmd(f"RCPT TO:<{COLLEAGUE}>")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<{MEMBER}>")
    assert code == 452 and lines[0].startswith("452 4.5.3 Too many recipients: at most 3"), lines
    assert c.cmd("DATA")[0] == 354
    c.send(stuff(message(MEMBER, [COLLEAGUE, MEMBER2, PENDING])))
    code, lines = c.reply()
    assert code == 250, lines
    c.close()
    for address, count in before.items():
        assert world.count(address) == count + 1


def test_recipient_refusals_store_nothing(server: Server, world: World) -> None:
    sent = world.count(MEMBER, "Sent")
    c = server.session(MEMBER)
    assert c.cmd(f"MAIL FROM:<{MEMBER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{OUTSIDER}>")[0] == 550
    code, lines = c.cmd("DATA")
    assert code == 503 and lines[0].startswith("503 5.5.1 Send RCPT TO first"), lines
    c.cmd("RSET")
    code, lines = transaction(c, [COLLEAGUE], stuff(message(MEMBER, COLLEAGUE)), sender=MEMBER)
    assert code == 250, lines
    assert world.count(MEMBER, "Sent") == sent + 1
