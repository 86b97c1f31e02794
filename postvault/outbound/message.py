"""Building the only mail Postvault sends out: invitations and new-mail
notifications (later: password-change and recovery notices).

None of it carries PHI: no subject, body, attachment name or patient data
of any secure message; only practice names, the server's name and, in an
invitation, the sign-up link.

User-controlled text (practice and mailbox names) goes into headers only
through ``header_text``, which removes what could start a new header:
- CR, LF and every other control or line-separator character (RFC 5322
  §2.2: a header field ends at CRLF);
- RFC 2047 encoded-word syntax ``=?``: Python's email package decodes
  encoded words in a header value it is given and, before CPython's fix for
  CVE-2024-6923 (3.11.7 is affected), writes the decoded text back unfolded,
  so ``=?UTF-8?Q?X=0ABcc:_evil@x?=`` becomes a real "Bcc:" line.
The email package then encodes non-ASCII text itself (RFC 2047), and
``serialize`` checks the finished header block once more: exactly the
header names we set, each once, or it refuses.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, make_msgid

from ..errors import PostvaultError

# RFC 5322 §2.1.1: lines SHOULD stay within 78 characters; the display text
# we take from users is cut well before, so folding stays simple.
MAX_HEADER_TEXT = 120
SERVICE_NAME = "Postvault Secure Messaging"
HEADERS = (
    "From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
)


class UnsafeMessage(PostvaultError):
    """A message we built does not have the header block we meant to write."""


def header_text(text: str, limit: int = MAX_HEADER_TEXT) -> str:
    """``text`` made safe for a header: one line, no encoded-word syntax."""
    out = []
    for char in unicodedata.normalize("NFC", text):
        # Cc: controls (CR, LF, NUL, TAB...); Cf: invisible format
        # characters (bidi overrides that disguise a name); Zl/Zp: U+2028/9.
        out.append(" " if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs") else char)
    clean = " ".join("".join(out).split())
    # "=?" can only start an encoded word; "= ?" reads the same to a person
    # and is inert to every decoder.
    clean = clean.replace("=?", "= ?")
    if len(clean) > limit:
        clean = clean[: limit - 1].rstrip() + "…"
    return clean


def body_text(text: str, limit: int = 200) -> str:
    """User text for a plain-text body line: same cleaning (a newline could
    fake a paragraph, e.g. a different link)."""
    return header_text(text, limit)


@dataclass(frozen=True)
class SignInRoute:
    """How a person reaches their mail: what a notification may say."""

    hostname: str
    imap_port: int | None  # implicit-TLS IMAP (993) or STARTTLS IMAP
    imap_tls: str  # "SSL/TLS" or "STARTTLS"
    web_url: str | None  # the account pages (HTTPS), if served


def _new_message(mail_from: str, to: str, subject: str, hostname: str, when: datetime | None) -> EmailMessage:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = Address(display_name=SERVICE_NAME, addr_spec=mail_from)
    msg["To"] = Address(addr_spec=to)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(when) if when else format_datetime(datetime.now().astimezone())
    msg["Message-ID"] = make_msgid(domain=hostname)
    # RFC 3834 §5: machine-generated, so autoresponders stay quiet.
    msg["Auto-Submitted"] = "auto-generated"
    return msg


def _set_body(msg: EmailMessage, lines: list[str]) -> None:
    # quoted-printable keeps the message 7-bit (any relay takes it without
    # 8BITMIME) while names with accents stay readable in the source.
    msg.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")


def _route_lines(route: SignInRoute) -> list[str]:
    lines = []
    if route.imap_port is not None:
        lines.append(
            f"In your mail program (Thunderbird, Outlook, Apple Mail): IMAP server {route.hostname}, "
            f"port {route.imap_port}, {route.imap_tls}, with your email address as user name."
        )
    if route.web_url:
        lines.append(f"Your account pages: {route.web_url}")
    return lines


def build_notification(
    *,
    mail_from: str,
    to: str,
    sender_practice: str | None,
    route: SignInRoute,
    when: datetime | None = None,
) -> EmailMessage:
    """"You have a new secure message from PRACTICE": who it is from and
    where to read it; never what it says. ``sender_practice`` None: a
    summary after a quiet interval ("new secure messages")."""
    if sender_practice is None:
        subject, first = "New secure messages are waiting for you", "You have new secure messages."
    else:
        practice = header_text(sender_practice) or "a colleague"
        subject = f"New secure message from {practice}"
        first = f"You have a new secure message from {body_text(sender_practice) or 'a colleague'}."
    msg = _new_message(mail_from, to, subject, route.hostname, when)
    _set_body(msg, [
        first,
        "",
        "For your patients' privacy this email does not contain the message. Read it securely:",
        "",
        *_route_lines(route),
        "",
        "You can change how often you get these emails in your account's mailbox settings.",
    ])
    return msg


def build_invitation(
    *,
    mail_from: str,
    to: str,
    member_practice: str,
    link: str,
    expires_at: datetime,
    route: SignInRoute,
    when: datetime | None = None,
) -> EmailMessage:
    """The sign-up email: who invites, the one-time link, until when."""
    practice = header_text(member_practice) or "A colleague"
    msg = _new_message(mail_from, to, f"{practice} invites you to Secure Messaging", route.hostname, when)
    _set_body(msg, [
        f"{body_text(member_practice) or 'A colleague'} uses Secure Messaging to exchange patient "
        "information with you in an encrypted, HIPAA-compliant way, instead of ordinary email.",
        "",
        "Set up your free account (practice name, time zone and a password) here:",
        "",
        link,
        "",
        f"This link works once and until {expires_at:%Y-%m-%d %H:%M} UTC. Messages sent to you "
        "before you sign up are waiting, encrypted, and readable as soon as you do.",
        f"If the link has expired, ask {body_text(member_practice) or 'the office that invited you'} "
        "for a new invitation.",
    ])
    return msg


_HEADER_NAME = re.compile(rb"^([!-9;-~]+):", re.MULTILINE)


def serialize(msg: EmailMessage) -> bytes:
    """The message as sent (CRLF line ends), after checking its header block.

    The check reads the bytes back as a receiving server would: every line
    that starts a header field is counted, so anything a value smuggled in
    (a "Bcc:" line, a second "To:") makes this refuse rather than send.
    """
    raw = msg.as_bytes(policy=policy.SMTP)
    head = raw.split(b"\r\n\r\n", 1)[0]
    if b"\n" in head.replace(b"\r\n", b""):
        raise UnsafeMessage("a header holds a bare line break")
    names = [m.group(1).decode("ascii").lower() for m in _HEADER_NAME.finditer(head)]
    parsed = BytesHeaderParser(policy=policy.SMTP).parsebytes(raw)
    if sorted(names) != sorted(h.lower() for h in HEADERS) or len(parsed.keys()) != len(HEADERS):
        raise UnsafeMessage("the message's header block is not the one built")
    return raw


# -- new-mail notifications from a template -------------------------------
# The SMTP server queues one notification per delivered message, in the
# transaction that files it. Building each through EmailMessage's header
# objects cost more CPU than filing the message; yet per recipient only To,
# Date and Message-ID differ. So the email package (and ``serialize``'s
# check) builds the message once per (sender, practice, route) with marker
# lines, and each notification is those bytes with the three lines put in.
# The address is only put in when it is a plain ASCII addr-spec short
# enough that the email package writes it as is ("To: " + address on one
# line, no folding, no encoding): anything else takes the full builder.

_SIMPLE_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,190}\Z")
_TO_LINE = re.compile(rb"^To: [^\r\n]*\r\n", re.MULTILINE)
_DATE_LINE = re.compile(rb"^Date: [^\r\n]*\r\n", re.MULTILINE)
_MID_LINE = re.compile(rb"^Message-ID: [^\r\n]*\r\n", re.MULTILINE)
_MAX_LINE = 78  # policy.SMTP's max_line_length: shorter lines are never folded
_TEMPLATE_CACHE_MAX = 1024
_templates: dict[tuple[str, str | None, SignInRoute], tuple[bytes, bytes, bytes, bytes]] = {}
_templates_lock = threading.Lock()


def _notification_template(mail_from: str, sender_practice: str | None, route: SignInRoute
                           ) -> tuple[bytes, bytes, bytes, bytes]:
    """The serialized notification cut around its To, Date and Message-ID
    lines (in that order in the header block), made once per key."""
    key = (mail_from, sender_practice, route)
    found = _templates.get(key)
    if found is not None:
        return found
    raw = serialize(build_notification(mail_from=mail_from, to="to@template.invalid",
                                       sender_practice=sender_practice, route=route))
    parts = []
    rest = raw
    for line in (_TO_LINE, _DATE_LINE, _MID_LINE):
        m = line.search(rest)
        if m is None:  # cannot happen: serialize checked that each is there, once
            raise UnsafeMessage("the notification template lacks a header line")
        parts.append(rest[:m.start()])
        rest = rest[m.end():]
    template = (parts[0], parts[1], parts[2], rest)
    with _templates_lock:
        if len(_templates) >= _TEMPLATE_CACHE_MAX:
            _templates.clear()
        _templates[key] = template
    return template


def notification_bytes(
    *,
    mail_from: str,
    to: str,
    sender_practice: str | None,
    route: SignInRoute,
    when: datetime | None = None,
) -> bytes:
    """``serialize(build_notification(...))``: the same message, header
    for header and byte for byte (but for its random Message-ID), from a
    template per sender practice (about 40 times faster)."""
    date = format_datetime(when) if when else format_datetime(datetime.now().astimezone())
    mid = make_msgid(domain=route.hostname)
    if (not _SIMPLE_ADDRESS.match(to) or len(to) + 4 > _MAX_LINE or len(mid) + 12 > _MAX_LINE
            or len(date) + 6 > _MAX_LINE):
        msg = build_notification(mail_from=mail_from, to=to, sender_practice=sender_practice, route=route, when=when)
        return serialize(msg)
    head, after_to, after_date, tail = _notification_template(mail_from, sender_practice, route)
    return b"".join((head, b"To: ", to.encode("ascii"), b"\r\n", after_to, b"Date: ", date.encode("ascii"),
                     b"\r\n", after_date, b"Message-ID: ", mid.encode("ascii"), b"\r\n", tail))
