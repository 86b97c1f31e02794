"""Who may write to whom (pure): the reply-only rules of the service.

Members start conversations with the colleagues in their address book and
with other members. Colleagues only reply: a colleague's message must answer
a message it holds (In-Reply-To/References), and may go only to people
already in that conversation. The rules are checked twice:

- at RCPT (:func:`check_recipient`), per address, with what is known before
  the message arrives: does the address have an account, is it in the
  sender's address book, do the two share any conversation. This refuses
  early and per recipient, so a client shows which address is wrong;
- at DATA (:func:`check_conversation`), with the message's thread: the final
  word, which may refuse what RCPT let through (a colleague's message that
  turns out not to be a reply, or names someone outside its conversation).

The caller builds the plain data below from the store. Two things matter for
safety and are the caller's to get right:

- :class:`ThreadFacts` comes only from messages the sender *holds because the
  server delivered them* (received, or accepted through submission) — never
  from copies the client APPENDed (a colleague may APPEND to Sent, and could
  otherwise invent a conversation to "reply" to).
- Participants are those of the sender's own copy of the conversation, so a
  Message-ID guessed from someone else's thread gains nothing (``held``
  is false, and a colleague is refused).

Addresses compare ignoring case, as the store does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from postvault.policy.decision import ALLOW, Decision, refuse
from postvault.policy.schema import Policy

Role = Literal["member", "colleague"]


@dataclass(frozen=True)
class Sender:
    """The authenticated account sending the message."""

    email: str
    role: Role
    # Members: their colleagues (from the PMS import, invited or not yet).
    # Colleagues: the members who invited them.
    address_book: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Recipient:
    """One envelope recipient, as the store knows it."""

    email: str
    role: Role | None  # None: no account on this server
    # The sender and this recipient are both in at least one conversation
    # the sender holds (delivered mail only). Lets a reply reach someone a
    # member didn't invite, e.g. a colleague another member brought in.
    shares_conversation: bool = False


@dataclass(frozen=True)
class ThreadFacts:
    """What the message's In-Reply-To and References say, checked by the store."""

    # The Message-IDs those headers name (may be empty: no such headers).
    cited: tuple[str, ...]
    # At least one cited message is one the sender holds (received or sent).
    held: bool
    # Everyone in that conversation (senders and recipients of the held
    # messages it belongs to), lower- or mixed-case.
    participants: frozenset[str] = frozenset()


# rule id -> (SMTP code, enhanced code, text). {names} is one address or a
# list ("a, b and c"); {is}/{has} agree with it.
_RULES: dict[str, tuple[int, str, str]] = {
    "recipients.unknown": (
        550, "5.1.1", "{names} {has} no account on this server; check the address."),
    "recipients.not-invited": (
        550, "5.1.1", "{names} {is} in your address book but not invited yet; invite them, then send again."),
    "recipients.not-in-address-book": (
        550, "5.7.1", ("{names} {is} not in your address book; add them, or import your address book from your "
                       "Practice Management System, then send again.")),
    "recipients.address-book-off": (
        550, "5.7.1", ("This server doesn't let members start conversations with colleagues; {names} can only "
                       "be answered inside a conversation they are part of.")),
    "recipients.members-off": (
        550, "5.7.1", ("This server doesn't let members write to other members; {names} can only be answered "
                       "inside a conversation they are part of.")),
    "recipients.colleague-outside": (
        550, "5.7.1", ("{names} {is} not in any conversation you received; colleagues can only write to people "
                       "in their conversations.")),
    "reply-only.new-recipient": (
        550, "5.7.1", "{names} {is} not part of this conversation; colleagues can't add recipients."),
}


def check_recipient(sender: Sender, rcpt: Recipient, policy: Policy) -> Decision:
    """SMTP RCPT: may ``sender`` write to ``rcpt`` at all?

    Lenient where only the message can tell: anyone the sender shares a
    conversation with passes here, and :func:`check_conversation` decides.
    """
    rule = _recipient_rule(sender, rcpt, policy, conversation=None)
    return _refusal(rule, [rcpt.email]) if rule else ALLOW


def check_conversation(sender: Sender, recipients: Sequence[Recipient], thread: ThreadFacts | None,
                       policy: Policy) -> Decision:
    """SMTP DATA (and the submission of a message through any other door):
    may this message, with this thread, go to all of ``recipients``?

    ``thread`` is None when the message has neither In-Reply-To nor
    References. A refusal names the header or every recipient that broke
    the first rule broken.
    """
    if not recipients:
        return refuse(554, "5.5.1", "This message has no recipients; add at least one.", "recipients.none")
    reply = thread is not None and thread.held
    if sender.role == "colleague" and policy.colleague.reply_only and not reply:
        if thread is None or not thread.cited:
            return refuse(550, "5.7.1", "Colleagues can only reply inside a conversation they received; this "
                                        "message does not reply to one.", "reply-only.not-a-reply")
        return refuse(550, "5.7.1", "Colleagues can only reply inside a conversation they received; the message "
                                    "this one replies to (In-Reply-To/References) is not in your mailbox.",
                      "reply-only.not-held")
    conversation = frozenset(p.lower() for p in thread.participants) if thread is not None and reply else frozenset()
    broken: dict[str, list[str]] = {}
    for rcpt in recipients:
        rule = _recipient_rule(sender, rcpt, policy, conversation=conversation)
        if rule:
            broken.setdefault(rule, []).append(rcpt.email)
    if not broken:
        return ALLOW
    # Unknown addresses first: no other fix helps until they are right.
    first = "recipients.unknown" if "recipients.unknown" in broken else next(iter(broken))
    return _refusal(first, broken[first])


def _recipient_rule(sender: Sender, rcpt: Recipient, policy: Policy,
                    conversation: frozenset[str] | None) -> str:
    """The id of the rule that ``rcpt`` breaks, or ''.

    ``conversation``: None at RCPT time (the thread is not known yet, so a
    shared conversation is enough); at DATA time the participants of the
    held conversation the message replies to (empty if none).
    """
    email = rcpt.email.lower()
    book = {a.lower() for a in sender.address_book}
    if rcpt.role is None:
        if sender.role == "member" and email in book:
            return "recipients.not-invited"
        return "recipients.unknown"
    if email == sender.email.lower():
        return ""  # a copy to oneself reaches no one new
    in_conversation = rcpt.shares_conversation if conversation is None else email in conversation
    if sender.role == "member":
        if rcpt.role == "member":
            if policy.member.may_write_members or in_conversation:
                return ""
            return "recipients.members-off"
        if email in book:
            if policy.member.may_write_address_book or in_conversation:
                return ""
            return "recipients.address-book-off"
        return "" if in_conversation else "recipients.not-in-address-book"
    # A colleague. Reply-only: at DATA time, only the conversation's people.
    if in_conversation:
        return ""
    if conversation is not None and policy.colleague.reply_only:
        return "reply-only.new-recipient"
    # RCPT time (or reply_only off): the members who invited it.
    if rcpt.role == "member" and email in book:
        return ""
    return "recipients.colleague-outside"


def _refusal(rule: str, addresses: list[str]) -> Decision:
    code, enhanced, text = _RULES[rule]
    one = len(addresses) == 1
    return refuse(code, enhanced, text.format(names=_join(addresses), **{"is": "is" if one else "are",
                                                                          "has": "has" if one else "have"}), rule)


def _join(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
