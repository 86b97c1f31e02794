"""Who may write to whom: RCPT-time and DATA-time rules, each refusal with
an allowed twin that proves the rule isn't broader than it should be."""

from __future__ import annotations

from dataclasses import replace

import pytest

from postvault.policy.decision import Decision
from postvault.policy.recipients import (
    Recipient,
    Sender,
    ThreadFacts,
    check_conversation,
    check_recipient,
)
from postvault.policy.schema import ColleaguePolicy, MemberPolicy, Policy

DEFAULT = Policy()
NO_MEMBERS = Policy(member=MemberPolicy(may_write_members=False))
NO_BOOK = Policy(member=MemberPolicy(may_write_address_book=False))
OPEN_COLLEAGUES = Policy(colleague=ColleaguePolicy(reply_only=False))

# Smile Dental (member) invited Dr Ortho; its PMS import also holds an
# address not invited yet. Family Clinic (member) invited Dr Perio.
MEMBER = Sender("office@dental.test", "member", frozenset({"dr@ortho.test", "new@pms.test"}))
COLLEAGUE = Sender("dr@ortho.test", "colleague", frozenset({"office@dental.test"}))

OFFICE = Recipient("office@dental.test", "member")
CLINIC = Recipient("front@clinic.test", "member")
ORTHO = Recipient("dr@ortho.test", "colleague")
PERIO = Recipient("dr@perio.test", "colleague")
NOBODY = Recipient("nobody@nowhere.test", None)
NOT_INVITED = Recipient("new@pms.test", None)


def shared(r: Recipient) -> Recipient:
    return replace(r, shares_conversation=True)


def held(*participants: str) -> ThreadFacts:
    return ThreadFacts(("<1@dental.test>",), True, frozenset(participants))


def assert_refused(d: Decision, rule: str, enhanced: str = "5.7.1", *words: str) -> None:
    assert not d.allowed, d
    assert d.rule == rule
    assert d.code == (554 if enhanced.startswith("5.5") else 550)
    assert d.enhanced == enhanced
    assert d.smtp_reply.startswith(f"{d.code} {enhanced} ")
    for word in words:
        assert word in d.text, (word, d.text)


# --- RCPT ----------------------------------------------------------------------------------

RCPT_ALLOWED = [
    ("member to an address-book colleague", MEMBER, ORTHO, DEFAULT),
    ("address book ignores case", MEMBER, Recipient("Dr@ORTHO.test", "colleague"), DEFAULT),
    ("member to member", MEMBER, CLINIC, DEFAULT),
    ("member to a colleague it shares a conversation with", MEMBER, shared(PERIO), DEFAULT),
    ("member to member, members off, but a shared conversation", MEMBER, shared(CLINIC), NO_MEMBERS),
    ("member to colleague, address book off, but a shared conversation", MEMBER, shared(ORTHO), NO_BOOK),
    ("member to itself", MEMBER, OFFICE, NO_MEMBERS),
    ("colleague to the member who invited it", COLLEAGUE, OFFICE, DEFAULT),
    ("colleague to a member of a shared conversation", COLLEAGUE, shared(CLINIC), DEFAULT),
    ("colleague to a colleague of a shared conversation", COLLEAGUE, shared(PERIO), DEFAULT),
    ("colleague to itself", COLLEAGUE, Recipient("DR@ortho.test", "colleague"), DEFAULT),
]


@pytest.mark.parametrize("name, sender, rcpt, policy", RCPT_ALLOWED, ids=[r[0] for r in RCPT_ALLOWED])
def test_rcpt_allowed(name: str, sender: Sender, rcpt: Recipient, policy: Policy) -> None:
    d = check_recipient(sender, rcpt, policy)
    assert d.allowed, d
    assert d.smtp_reply == "250 2.0.0 OK"


RCPT_REFUSED = [
    # (sender, rcpt, policy, rule, enhanced, words; the allowed twin: sender, rcpt, policy)
    (MEMBER, NOBODY, DEFAULT, "recipients.unknown", "5.1.1", ["nobody@nowhere.test", "no account"],
     (MEMBER, CLINIC, DEFAULT)),
    (MEMBER, NOT_INVITED, DEFAULT, "recipients.not-invited", "5.1.1", ["new@pms.test", "invite them"],
     (MEMBER, replace(NOT_INVITED, role="colleague"), DEFAULT)),
    (MEMBER, PERIO, DEFAULT, "recipients.not-in-address-book", "5.7.1",
     ["dr@perio.test is not in your address book", "add them", "Practice Management System"],
     (MEMBER, ORTHO, DEFAULT)),
    (MEMBER, CLINIC, NO_MEMBERS, "recipients.members-off", "5.7.1", ["front@clinic.test"],
     (MEMBER, CLINIC, DEFAULT)),
    (MEMBER, ORTHO, NO_BOOK, "recipients.address-book-off", "5.7.1", ["dr@ortho.test"],
     (MEMBER, ORTHO, DEFAULT)),
    (COLLEAGUE, CLINIC, DEFAULT, "recipients.colleague-outside", "5.7.1",
     ["front@clinic.test is not in any conversation you received"], (COLLEAGUE, shared(CLINIC), DEFAULT)),
    (COLLEAGUE, PERIO, DEFAULT, "recipients.colleague-outside", "5.7.1", ["dr@perio.test"],
     (COLLEAGUE, shared(PERIO), DEFAULT)),
    (COLLEAGUE, NOBODY, DEFAULT, "recipients.unknown", "5.1.1", ["nobody@nowhere.test"],
     (COLLEAGUE, OFFICE, DEFAULT)),
    # An address in a colleague's book without an account is just unknown.
    (Sender("dr@ortho.test", "colleague", frozenset({"gone@dental.test"})), Recipient("gone@dental.test", None),
     DEFAULT, "recipients.unknown", "5.1.1", ["gone@dental.test"], (COLLEAGUE, OFFICE, DEFAULT)),
]


@pytest.mark.parametrize("sender, rcpt, policy, rule, enhanced, words, twin", RCPT_REFUSED,
                         ids=[f"{r[3]}-{r[1].email}" for r in RCPT_REFUSED])
def test_rcpt_refused_with_allowed_twin(sender: Sender, rcpt: Recipient, policy: Policy, rule: str,
                                        enhanced: str, words: list[str],
                                        twin: tuple[Sender, Recipient, Policy]) -> None:
    assert_refused(check_recipient(sender, rcpt, policy), rule, enhanced, *words)
    assert check_recipient(*twin).allowed


# --- DATA ----------------------------------------------------------------------------------

DATA_ALLOWED = [
    ("member starts a conversation with its colleague", MEMBER, [ORTHO], None, DEFAULT),
    ("member starts a conversation with colleague and member", MEMBER, [ORTHO, CLINIC], None, DEFAULT),
    ("member replies to a colleague another member brought in", MEMBER, [PERIO],
     held("office@dental.test", "dr@perio.test", "front@clinic.test"), DEFAULT),
    ("member adds its own colleague to a conversation", MEMBER, [ORTHO, CLINIC],
     held("office@dental.test", "front@clinic.test"), DEFAULT),
    ("member replies to member with members off", MEMBER, [CLINIC], held("front@clinic.test"), NO_MEMBERS),
    ("colleague replies to the member", COLLEAGUE, [OFFICE], held("office@dental.test", "dr@ortho.test"), DEFAULT),
    ("colleague replies to all, a member and a colleague it didn't know", COLLEAGUE, [OFFICE, CLINIC, PERIO],
     held("Office@Dental.test", "front@clinic.test", "dr@perio.test"), DEFAULT),
    ("colleague copies itself", COLLEAGUE, [OFFICE, ORTHO], held("office@dental.test"), DEFAULT),
    ("colleague starts a conversation when reply_only is off", COLLEAGUE, [OFFICE], None, OPEN_COLLEAGUES),
]


@pytest.mark.parametrize("name, sender, rcpts, thread, policy", DATA_ALLOWED, ids=[r[0] for r in DATA_ALLOWED])
def test_data_allowed(name: str, sender: Sender, rcpts: list[Recipient], thread: ThreadFacts | None,
                      policy: Policy) -> None:
    assert check_conversation(sender, rcpts, thread, policy).allowed


def test_colleague_new_conversation_is_refused_with_the_exact_sentence() -> None:
    d = check_conversation(COLLEAGUE, [OFFICE], None, DEFAULT)
    assert_refused(d, "reply-only.not-a-reply")
    assert d.text == "Colleagues can only reply inside a conversation they received; this message does not reply to one."
    # Twin: the same message as a reply to a message it holds.
    assert check_conversation(COLLEAGUE, [OFFICE], held("office@dental.test"), DEFAULT).allowed


def test_colleague_reply_without_cited_ids_is_not_a_reply() -> None:
    d = check_conversation(COLLEAGUE, [OFFICE], ThreadFacts((), False, frozenset()), DEFAULT)
    assert_refused(d, "reply-only.not-a-reply")


def test_colleague_reply_to_a_message_it_does_not_hold() -> None:
    # E.g. a Message-ID copied from elsewhere: participants can't be trusted.
    thread = ThreadFacts(("<guessed@dental.test>",), False, frozenset({"office@dental.test"}))
    d = check_conversation(COLLEAGUE, [OFFICE], thread, DEFAULT)
    assert_refused(d, "reply-only.not-held", "5.7.1", "In-Reply-To/References", "not in your mailbox")
    assert check_conversation(COLLEAGUE, [OFFICE], replace(thread, held=True), DEFAULT).allowed


def test_colleague_cannot_add_a_recipient_with_the_exact_sentence() -> None:
    thread = held("office@dental.test", "dr@ortho.test")
    d = check_conversation(COLLEAGUE, [OFFICE, CLINIC], thread, DEFAULT)
    assert_refused(d, "reply-only.new-recipient")
    assert d.text == "front@clinic.test is not part of this conversation; colleagues can't add recipients."
    assert check_conversation(COLLEAGUE, [OFFICE], thread, DEFAULT).allowed


def test_colleague_adding_several_names_them_all() -> None:
    d = check_conversation(COLLEAGUE, [OFFICE, CLINIC, PERIO, Recipient("c@d.test", "member")],
                           held("office@dental.test"), DEFAULT)
    assert d.text.startswith("front@clinic.test, dr@perio.test and c@d.test are not part of this conversation")


def test_colleague_cannot_bring_in_even_its_own_inviting_member() -> None:
    # RCPT let the inviting member through (address book); this conversation
    # doesn't include it, so DATA refuses.
    thread = held("front@clinic.test", "dr@ortho.test")
    assert check_recipient(COLLEAGUE, OFFICE, DEFAULT).allowed
    assert_refused(check_conversation(COLLEAGUE, [OFFICE], thread, DEFAULT), "reply-only.new-recipient")
    # Twin: without reply_only it may write to the members who invited it.
    assert check_conversation(COLLEAGUE, [OFFICE], None, OPEN_COLLEAGUES).allowed


def test_colleague_with_reply_only_off_still_cannot_write_strangers() -> None:
    assert_refused(check_conversation(COLLEAGUE, [CLINIC], None, OPEN_COLLEAGUES), "recipients.colleague-outside")
    assert check_conversation(COLLEAGUE, [CLINIC], held("front@clinic.test"), OPEN_COLLEAGUES).allowed


def test_member_new_conversation_outside_its_address_book() -> None:
    d = check_conversation(MEMBER, [ORTHO, PERIO], None, DEFAULT)
    assert_refused(d, "recipients.not-in-address-book", "5.7.1", "dr@perio.test")
    assert "dr@ortho.test" not in d.text
    assert check_conversation(MEMBER, [ORTHO], None, DEFAULT).allowed


def test_member_unheld_thread_does_not_open_its_participants() -> None:
    thread = ThreadFacts(("<x@clinic.test>",), False, frozenset({"dr@perio.test"}))
    assert_refused(check_conversation(MEMBER, [PERIO], thread, DEFAULT), "recipients.not-in-address-book")
    assert check_conversation(MEMBER, [PERIO], replace(thread, held=True), DEFAULT).allowed


def test_member_to_member_with_members_off() -> None:
    assert_refused(check_conversation(MEMBER, [CLINIC], None, NO_MEMBERS), "recipients.members-off")
    assert check_conversation(MEMBER, [CLINIC], None, DEFAULT).allowed


def test_member_to_colleague_with_address_book_off() -> None:
    assert_refused(check_conversation(MEMBER, [ORTHO], None, NO_BOOK), "recipients.address-book-off")
    assert check_conversation(MEMBER, [ORTHO], held("dr@ortho.test"), NO_BOOK).allowed


def test_unknown_recipients_are_reported_first() -> None:
    d = check_conversation(COLLEAGUE, [CLINIC, NOBODY, Recipient("x@y.test", None)], held("office@dental.test"),
                           DEFAULT)
    assert_refused(d, "recipients.unknown", "5.1.1")
    assert d.text == "nobody@nowhere.test and x@y.test have no account on this server; check the address."


def test_no_recipients() -> None:
    assert_refused(check_conversation(MEMBER, [], None, DEFAULT), "recipients.none", "5.5.1")
    assert check_conversation(MEMBER, [ORTHO], None, DEFAULT).allowed


def test_reply_only_is_checked_before_recipients() -> None:
    # The fix is to reply, not to change recipients: say that first.
    d = check_conversation(COLLEAGUE, [CLINIC], None, DEFAULT)
    assert d.rule == "reply-only.not-a-reply"


def test_types_are_plain_frozen_data() -> None:
    with pytest.raises(AttributeError):
        MEMBER.email = "x"  # type: ignore[misc]
    assert Recipient("a@b.test", None) == Recipient("a@b.test", None)
    assert hash(held("a@b.test")) == hash(held("a@b.test"))
