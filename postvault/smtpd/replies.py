"""Every SMTP reply the submission server sends, in one place.

Three kinds of reply meet here:

- aiosmtpd's built-in replies ("530 Must issue a STARTTLS command first",
  "552 Error: Too much mail data", ...). Most lack an enhanced status code
  and say little a person could act on. :func:`rewrite` maps each one, by
  pattern, to ours; the protocol passes every reply through it.
- Our own replies (the constants below), used by the protocol and handler.
- Errors from the store and the policy, mapped by :func:`error_reply`, and
  policy decisions, whose reply is ``Decision.smtp_reply``.

Enhanced status codes (RFC 2034, RFC 3463) go on every 2xx, 4xx and 5xx
reply except the two that RFC 2034 section 3 leaves out: the greeting and
the reply to EHLO/HELO. Intermediate 3xx replies (334 AUTH challenges, 354)
carry none either: RFC 2034 defines codes for completion replies only.

Text rules (after maddy's ``exterrors``): a reply tells the person at the
client what happened and what to do, in one sentence; it may name the
address or file they chose, but never a rule id, a config key, a file path,
an exception's text or anything of another account's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import AuthenticationFailed, InvalidInput, LoginLimited, NoSuchAccount, storage_full

# "250 2.0.0 ..." or "250-2.0.0 ...": the reply already has its code.
ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")

# --- our own replies --------------------------------------------------------

OK = "250 2.0.0 OK"
BYE = "221 2.0.0 Goodbye"
STARTTLS_READY = "220 2.0.0 Ready to start TLS"
TLS_ACTIVE = "503 5.5.1 This connection is already encrypted; STARTTLS is not needed."
STARTTLS_FIRST = ("530 5.7.0 Must issue a STARTTLS command first: turn on STARTTLS (or SSL/TLS on port 465) for "
                  "the outgoing server in your mail program.")
AUTH_FIRST = ("530 5.7.0 Authentication required: turn on authentication with your user name and password for the "
              "outgoing (SMTP) server in your mail program.")
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = ("535 5.7.8 Authentication failed: the user name or password is wrong; check them in your mail "
               "program's outgoing server settings.")
AUTH_AUTHZID = ("535 5.7.8 Authentication failed: logging in on behalf of another user is not supported; leave the "
                "authorization identity empty.")
LOGIN_USERNAME_CHALLENGE = "Username:"
LOGIN_PASSWORD_CHALLENGE = "Password:"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
SENDER_NOT_YOU = ("553 5.7.1 The sender address {given} is not the account you logged in as ({account}); send from "
                  "{account}.")
TOO_MANY_RECIPIENTS = ("452 4.5.3 Too many recipients: at most {limit} per message; send to the others in another "
                       "message.")
DATA_READY = "354 End data with <CR><LF>.<CR><LF>"
TOO_BIG = ("552 5.3.4 The message is larger than this server accepts ({limit}); send the attachments in several "
           "messages.")
TOO_BIG_CLOSING = ("552 5.3.4 The message is far larger than this server accepts ({limit}) and was not ended; "
                   "closing the connection.")
LINE_TOO_LONG = ("500 5.5.2 A line of the message is longer than {limit} characters (RFC 5321 section 4.5.3.1.6); "
                 "the mail program must wrap or encode long lines.")
BARE_LINE_BREAK = ("554 5.6.0 The message contains a bare CR or LF line break (RFC 5321 section 2.3.8); the mail "
                   "program must end every line with CR LF.")
NO_FROM = "553 5.7.1 The message has no From header; add From: {account} and send again."
FROM_UNREADABLE = ("553 5.7.1 The From header of the message cannot be read; it must hold exactly your address, "
                   "{account}.")
FROM_NOT_YOU = ("553 5.7.1 The From header ({given}) is not the account you logged in as; send from {account} "
                "(check the identity selected in your mail program).")
SENDER_HEADER_NOT_YOU = ("553 5.7.1 The Sender header ({given}) is not the account you logged in as; remove it or "
                         "set it to {account}.")
QUEUED = "250 2.0.0 Message accepted for delivery; queue id {queue_id}"
TOO_MANY_ERRORS = "421 4.7.0 Too many refused commands in this session; closing the connection."
TOO_MANY_COMMANDS = "421 4.7.0 Too many commands in this session; closing the connection, please reconnect."
TOO_MANY_CONNECTIONS = ("421 4.7.0 Too many connections from your address at once; close some or try again in a "
                        "few minutes.")
IDLE_TIMEOUT = "421 4.4.2 No command for too long; closing the connection."
SHUTTING_DOWN = "421 4.3.2 The server is restarting; please try again in a minute."
TEMPORARY_FAILURE = ("451 4.3.0 The message could not be stored because of a temporary problem on the server; it "
                     "was not delivered, please try again in a few minutes.")
STORAGE_FULL = ("452 4.3.1 The server's storage is full, so the message was not stored; your mail program keeps "
                "it and can send it again once space is freed (try again later).")
RECIPIENT_GONE = "550 5.1.1 {address} has no account on this server any more; check the address."
NOT_IMPLEMENTED = "502 5.5.1 {command} is not offered by this server."


# --- aiosmtpd's replies, rewritten ------------------------------------------

@dataclass(frozen=True)
class _Rewrite:
    pattern: re.Pattern[str]
    template: str


def _r(pattern: str, template: str) -> _Rewrite:
    return _Rewrite(re.compile(pattern, re.DOTALL), template)


_SYNTAX_MAIL = "501 5.5.4 Syntax: MAIL FROM:<address> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8]"
_SYNTAX_RCPT = "501 5.5.4 Syntax: RCPT TO:<address>"

# Checked in order, each against the whole reply. Templates may use the
# pattern's named groups and the context :func:`rewrite` is given ({limit}).
REWRITES: tuple[_Rewrite, ...] = (
    _r(r"250 OK", OK),
    _r(r"221 Bye", BYE),
    _r(r"220 Ready to start TLS", STARTTLS_READY),
    _r(r"454 TLS not available", "454 4.7.0 TLS is not available on this port; connect to port 465 instead."),
    _r(r"530 Must issue a STARTTLS command first", STARTTLS_FIRST),
    _r(r"530 5\.7\.0 Authentication required", AUTH_FIRST),
    _r(r"538 5\.7\.11 .*", STARTTLS_FIRST),
    _r(r"554 Command refused due to lack of security",
       "554 5.7.0 The TLS handshake did not complete; reconnect and try again."),
    _r(r"500 Error: bad syntax",
       "500 5.5.2 Syntax error: the command was empty or not plain ASCII text."),
    _r(r"500 Error: strict ASCII mode",
       "500 5.6.7 Non-ASCII text was sent without the SMTPUTF8 parameter; the mail program must ask for it."),
    _r(r"500 Command line too long",
       "500 5.5.2 Command line too long (RFC 5321 section 4.5.3.1.4); the mail program sent a malformed command."),
    _r(r"500 Line too long.*", LINE_TOO_LONG),
    _r(r'500 Error: command "(?P<command>[^"]*)" not recognized',
       "500 5.5.1 Command not recognized: {command}"),
    _r(r"500 Error: command 'AUTH' not recognized",
       "503 5.5.1 AUTH needs EHLO, not HELO; the mail program must greet with EHLO."),
    _r(r"502 5\.5\.1 Too many unrecognized commands, goodbye\.",
       "421 4.7.0 Too many unrecognized commands; closing the connection."),
    _r(r"503 Error: send (?P<helo>HELO|EHLO) first", "503 5.5.1 Send EHLO first."),
    _r(r"501 Syntax: (?P<command>HELO|EHLO) hostname", "501 5.5.4 Syntax: {command} followed by your host name"),
    _r(r"501 Syntax: (?P<command>QUIT|STARTTLS|RSET|DATA)",
       "501 5.5.4 Syntax: {command} takes no arguments"),
    _r(r"503 Already authenticated", "503 5.5.1 Already authenticated; AUTH is not needed again."),
    _r(r"501 Not enough value", "501 5.5.4 Syntax: AUTH PLAIN or AUTH LOGIN"),
    _r(r"501 Too many values", "501 5.5.4 Syntax: AUTH PLAIN [initial-response] or AUTH LOGIN [user name]"),
    _r(r"504 5\.5\.4 Unrecognized authentication type",
       "504 5.5.4 Only AUTH PLAIN and AUTH LOGIN are offered; choose normal password authentication."),
    _r(r"535 5\.7\.8 Authentication credentials invalid", AUTH_FAILED),
    _r(r"501 5\.7\.0 Auth aborted", "501 5.7.0 Authentication cancelled by the client."),
    _r(r"501 5\.5\.2 Can't decode base64",
       "501 5.5.2 The authentication data is not valid base64; the mail program sent a malformed AUTH."),
    _r(r"501 5\.5\.2 Can't split auth value",
       "501 5.5.2 The AUTH PLAIN data is malformed; it must be authzid NUL user NUL password."),
    _r(r"501 Syntax: MAIL FROM: <address>.*", _SYNTAX_MAIL),
    _r(r"501 Syntax: RCPT TO: <address>.*", _SYNTAX_RCPT),
    _r(r"553 5\.1\.3 Error: malformed address",
       "553 5.1.3 The address is malformed; it must look like <name@example.org>."),
    _r(r"503 Error: nested MAIL command",
       "503 5.5.1 A message is already started; finish it, or send RSET first."),
    _r(r"501 Error: BODY can only be one of 7BIT, 8BITMIME",
       "501 5.5.4 BODY must be 7BIT or 8BITMIME."),
    _r(r"501 Error: SMTPUTF8 takes no arguments", "501 5.5.4 SMTPUTF8 takes no value."),
    _r(r"501 Error: SMTPUTF8 disabled", "555 5.5.4 SMTPUTF8 is not offered by this server."),
    _r(r"552 Error: message size exceeds fixed maximum message size", TOO_BIG),
    _r(r"555 MAIL FROM parameters not recognized or not implemented",
       "555 5.5.4 A MAIL FROM parameter is not supported; only SIZE, BODY, SMTPUTF8 and AUTH are."),
    _r(r"555 RCPT TO parameters not recognized or not implemented",
       "555 5.5.4 RCPT TO parameters are not supported here."),
    _r(r"503 Error: need MAIL command", "503 5.5.1 Send MAIL FROM first."),
    _r(r"503 Error: need RCPT command", "503 5.5.1 Send RCPT TO first: the message has no recipients yet."),
    _r(r"552 Error: Too much mail data", TOO_BIG),
    _r(r"421 4\.7\.0 \S+ sent too many times", TOO_MANY_COMMANDS),
    _r(r"250 Supported commands: (?P<rest>.*)", "250 2.0.0 Supported commands: {rest}"),
    _r(r"501 Supported commands: (?P<rest>.*)", "501 5.5.4 No such command; supported commands: {rest}"),
    _r(r"250 Syntax: (?P<rest>.*)", "250 2.0.0 Syntax: {rest}"),
    _r(r"502 Could not VRFY .*", "501 5.1.3 The address is malformed; it must look like <name@example.org>."),
    _r(r"501 Syntax: VRFY <address>", "501 5.5.4 Syntax: VRFY <address>"),
    _r(r"252 Cannot VRFY user.*",
       "252 2.1.5 Addresses are not verified here; send the message and each recipient is checked."),
    _r(r"502 EXPN not implemented", NOT_IMPLEMENTED.format(command="EXPN")),
    _r(r"500 Error: \(.*", TEMPORARY_FAILURE),
    _r(r"500 Error: Cannot describe error", TEMPORARY_FAILURE),
)

_CLASS_DEFAULT = {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}
_BY_CODE: dict[str, list[_Rewrite]] = {}
for _rw in REWRITES:
    _BY_CODE.setdefault(_rw.pattern.pattern[:3], []).append(_rw)


def rewrite(reply: str, *, limit: str = "") -> tuple[str, bool]:
    """``reply`` with an enhanced status code and our wording.

    Returns (reply, known): ``known`` is False for a reply that was neither
    ours nor in :data:`REWRITES`; it then gets a generic code of its class
    (X.0.0), and the caller logs it so the table can be completed.
    Replies without a completion code (3xx) are returned unchanged.
    """
    # Some of aiosmtpd's replies have a code but vague text, so the table
    # comes first; it is indexed by reply code to stay cheap.
    for rw in _BY_CODE.get(reply[:3], ()):
        m = rw.pattern.fullmatch(reply)
        if m:
            return rw.template.format(limit=limit, **m.groupdict()), True
    if ENHANCED.match(reply) or reply[:1] == "3":
        return reply, True
    code, _, text = reply.partition(" ")
    cls = _CLASS_DEFAULT.get(code[:1])
    if cls is None or len(code) != 3:
        return reply, False
    return f"{code} {cls} {text}".rstrip(), False


# --- errors from the store and the policy ------------------------------------


def error_reply(exc: BaseException, *, address: str = "") -> tuple[str, str]:
    """(SMTP reply, log reason) for an error while handling a command.

    The reply is public text; the log reason names only the error's class.
    Anything unexpected is a temporary failure (451 4.3.0): the client
    keeps the message and tries again, and nothing was stored (a refusal
    happens before ``deliver``, and ``deliver`` commits all or nothing).
    """
    if isinstance(exc, LoginLimited):
        return str(getattr(exc.decision, "smtp_reply", "454 4.7.0 Too many failed logins; try again later.")), \
            "login-limited"
    if isinstance(exc, AuthenticationFailed):
        return AUTH_FAILED, "auth-failed"
    if isinstance(exc, NoSuchAccount):
        # A recipient whose account was removed between RCPT and DATA.
        return RECIPIENT_GONE.format(address=address or "A recipient"), "no-such-account"
    if storage_full(exc) is not None:
        # RFC 3463 4.3.1 "mail system full": temporary, the client retries.
        return STORAGE_FULL, "storage-full"
    if isinstance(exc, InvalidInput):
        return "554 5.6.0 The message could not be stored as sent; check its addresses and format.", \
            "invalid-input"
    # CryptoError, StoreError, another OSError, a locked database, a bug:
    # the client keeps the message and retries.
    return TEMPORARY_FAILURE, type(exc).__name__
