"""Handing one message to the next SMTP server: the configured smarthost,
or the recipient domain's mail hosts (``mx.mail_hosts``).

Always over TLS with a verified certificate: STARTTLS is required (RFC 3207;
a server that does not offer it gets nothing, and the message waits for a
retry) or TLS from the first byte (RFC 8314 §3.3, for a smarthost on port
465). Login (AUTH) only inside TLS, and only to the smarthost.

``smtplib`` on a worker thread rather than aiosmtplib: a handful of
notifications a minute needs no new dependency, and the blocking client is
the best-trodden one. The worker calls ``send`` via ``asyncio.to_thread``.

Outcomes (RFC 5321 §4.2.1): 2xx sent; 5xx permanent (not retried);
4xx, a failed connection, a missing STARTTLS or a certificate that does not
verify are temporary (retried until the queue gives up). A smarthost that
refuses our login is treated as temporary as well: it is the admin's
config to fix, and the queue should not throw mail away meanwhile.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..certs.context import client_context
from ..conf.schema import NotifyConfig
from .mx import DnsResolver, MailHostError, Resolver, mail_hosts

log = logging.getLogger("postvault.outbound")
SMTP_PORT = 25  # RFC 5321 §4.5.4.2 / MX delivery


@dataclass(frozen=True)
class Outcome:
    status: Literal["sent", "temporary", "permanent"]
    # The server's reply code and text, or what failed; never the message.
    code: int | None
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text


@dataclass(frozen=True)
class Hop:
    host: str
    port: int
    implicit_tls: bool
    context: ssl.SSLContext
    login: tuple[str, str] | None = None


def verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that checks the chain and the host name; TLS 1.2+."""
    if ca_file is not None:
        return client_context(ca_file)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _reply_text(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return " ".join(text.split())[:300]


def _classify(code: int, text: bytes | str) -> Outcome:
    return Outcome("permanent" if 500 <= code < 600 else "temporary", code, _reply_text(text))


def deliver_once(hop: Hop, mail_from: str, rcpt: str, body: bytes, local_hostname: str, timeout: float) -> Outcome:
    """One SMTP transaction with one server."""
    client: smtplib.SMTP | None = None
    try:
        if hop.implicit_tls:
            client = smtplib.SMTP_SSL(hop.host, hop.port, local_hostname=local_hostname, timeout=timeout,
                                      context=hop.context)
        else:
            client = smtplib.SMTP(hop.host, hop.port, local_hostname=local_hostname, timeout=timeout)
        code, text = client.ehlo()
        if code != 250:
            return _classify(code, text)
        if not hop.implicit_tls:
            if not client.has_extn("starttls"):
                return Outcome("temporary", None, f"{hop.host} does not offer STARTTLS; not sending in plaintext")
            # smtplib passes the host we connected to as server_hostname, so
            # the certificate is checked against that name.
            code, text = client.starttls(context=hop.context)
            if code != 220:
                return _classify(code, text)
            client.ehlo()
        if hop.login is not None:
            client.login(*hop.login)
        client.sendmail(mail_from, [rcpt], body)
        return Outcome("sent", 250, "accepted")
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return _classify(code, text)
    except smtplib.SMTPAuthenticationError as exc:
        return Outcome("temporary", exc.smtp_code, "the smarthost refused our login: " + _reply_text(exc.smtp_error))
    except smtplib.SMTPResponseException as exc:
        return _classify(exc.smtp_code, exc.smtp_error)
    except ssl.SSLCertVerificationError as exc:
        return Outcome("temporary", None, f"certificate of {hop.host} not accepted: {exc.verify_message}")
    except (smtplib.SMTPException, ssl.SSLError, OSError) as exc:
        return Outcome("temporary", None, f"{hop.host}:{hop.port}: {type(exc).__name__}: {exc}"[:300])
    finally:
        if client is not None:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                # The message's fate is already decided; a lost QUIT is not
                # worth a retry (which would send it twice).
                client.close()


class Sender:
    """Sends one message by the configured route (blocking)."""

    def __init__(
        self,
        notify: NotifyConfig,
        local_hostname: str,
        *,
        resolver: Resolver | None = None,
        timeout: float = 60.0,
        mx_port: int = SMTP_PORT,
        mx_context: ssl.SSLContext | None = None,
    ) -> None:
        self._notify = notify
        self._local_hostname = local_hostname
        self._resolver = resolver
        self._timeout = timeout
        self._mx_port = mx_port
        # Mail hosts found by MX are checked against the system's trust store
        # (tests give the dev CA's context instead).
        self._mx_context = mx_context
        self._relay_context = verifying_context(notify.relay_ca) if notify.relay is not None else None

    def send(self, mail_from: str, rcpt: str, body: bytes) -> Outcome:
        relay = self._notify.relay
        if relay is not None:
            assert self._relay_context is not None
            login = (relay.username, relay.password or "") if relay.username is not None else None
            hop = Hop(relay.host, relay.port, self._notify.relay_tls == "implicit", self._relay_context, login)
            return deliver_once(hop, mail_from, rcpt, body, self._local_hostname, self._timeout)
        return self._send_by_mx(mail_from, rcpt, body)

    def _send_by_mx(self, mail_from: str, rcpt: str, body: bytes) -> Outcome:
        domain = rcpt.rpartition("@")[2]
        if self._resolver is None:
            self._resolver = DnsResolver()
        try:
            hosts = mail_hosts(domain, self._resolver)
        except MailHostError as exc:
            return Outcome("permanent" if exc.permanent else "temporary", None, str(exc))
        if self._mx_context is None:
            # Made once, as the relay's is: loading the system's trust store
            # for every notification cost more CPU than the send itself.
            self._mx_context = verifying_context(None)
        context = self._mx_context
        last = Outcome("temporary", None, f"no mail host for {domain} answered")
        for host in hosts:
            # RFC 5321 §5.1: try the next host after a temporary failure;
            # a permanent answer from one of them is the domain's answer.
            last = deliver_once(Hop(host, self._mx_port, False, context), mail_from, rcpt, body,
                                self._local_hostname, self._timeout)
            if last.status != "temporary":
                return last
            log.info("outbound: %s failed temporarily (%s); trying the next mail host", host, last.text)
        return last
