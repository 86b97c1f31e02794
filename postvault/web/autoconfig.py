"""How mail programs find their settings, from the server config alone:

- Thunderbird's autoconfig file (``config-v1.1.xml``, the format of
  Mozilla's ISPDB), served at ``/.well-known/autoconfig/mail/config-v1.1.xml``
  and ``/mail/config-v1.1.xml?emailaddress=`` and offered as a download;
- Outlook's "POX" autodiscover (``POST /autodiscover/autodiscover.xml``,
  [MS-OXDSCLI]): the request names the address, the answer the servers;
- an Apple configuration profile (``.mobileconfig``) with one
  ``com.apple.mail.managed`` payload, for Apple Mail on macOS and iOS.

Implicit TLS first (RFC 8314 §3.3 prefers it), STARTTLS as the second
choice where that listener is on. The user name is always the full address.
No password is ever put in a file: each program asks for it.

XML is built with ElementTree and plists with ``plistlib``, both of which
escape what they are given; nothing user-typed reaches a file unescaped.
The autodiscover request is read with a bounded regular expression, not an
XML parser: there is no DOCTYPE or entity for it to expand.
"""

from __future__ import annotations

import plistlib
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..conf.schema import Config
from ..errors import InvalidInput
from ..store.types import normalize_email

SERVICE = "Postvault Secure Messaging"
SHORT = "Postvault"
AUTODISCOVER_REQUEST_MAX = 16 * 1024
_AD_RESPONSE = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
_AD_OUTLOOK = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
_AD_EMAIL = re.compile(rb"<(?:\w+:)?EMailAddress>\s*([^<>\s]{1,320})\s*</(?:\w+:)?EMailAddress>", re.I)


@dataclass(frozen=True)
class Server:
    protocol: str  # "IMAP" | "SMTP"
    port: int
    tls: str  # "SSL/TLS" | "STARTTLS"


@dataclass(frozen=True)
class MailSettings:
    hostname: str
    incoming: tuple[Server, ...]  # preferred first
    outgoing: tuple[Server, ...]


def mail_settings(config: Config) -> MailSettings:
    listen = config.listen
    incoming = [Server("IMAP", e.port, tls) for e, tls in ((listen.imaps, "SSL/TLS"), (listen.imap, "STARTTLS"))
                if e is not None]
    outgoing = [Server("SMTP", e.port, tls) for e, tls in
                ((listen.submissions, "SSL/TLS"), (listen.submission, "STARTTLS")) if e is not None]
    return MailSettings(config.hostname, tuple(incoming), tuple(outgoing))


def checked_address(text: str | None) -> str | None:
    """An address from a query or request, or None if it is not one."""
    if not text or len(text) > 320:
        return None
    try:
        return normalize_email(text)
    except InvalidInput:
        return None


def _xml(root: ET.Element) -> bytes:
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    node = ET.SubElement(parent, tag)
    if text is not None:
        node.text = str(text)
    return node


def thunderbird_xml(settings: MailSettings, email: str | None) -> bytes:
    """config-v1.1.xml for ``email`` (or, without one, a template in which
    Thunderbird fills in the address it was given)."""
    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider")
    provider.set("id", settings.hostname)
    _sub(provider, "domain", email.rpartition("@")[2] if email else settings.hostname)
    _sub(provider, "displayName", SERVICE)
    _sub(provider, "displayShortName", SHORT)
    user = email or "%EMAILADDRESS%"
    for tag, kind, servers in (("incomingServer", "imap", settings.incoming),
                               ("outgoingServer", "smtp", settings.outgoing)):
        for server in servers:
            node = _sub(provider, tag)
            node.set("type", kind)
            _sub(node, "hostname", settings.hostname)
            _sub(node, "port", server.port)
            _sub(node, "socketType", "SSL" if server.tls == "SSL/TLS" else "STARTTLS")
            _sub(node, "authentication", "password-cleartext")
            _sub(node, "username", user)
    return _xml(root)


def autodiscover_email(body: bytes) -> str | None:
    """The address an Outlook autodiscover request asks about."""
    if len(body) > AUTODISCOVER_REQUEST_MAX:
        return None
    match = _AD_EMAIL.search(body)
    if match is None:
        return None
    return checked_address(match[1].decode("utf-8", "replace"))


def autodiscover_xml(settings: MailSettings, email: str) -> bytes:
    """The POX answer: IMAP and SMTP, each with its preferred TLS mode."""
    root = ET.Element("Autodiscover", xmlns=_AD_RESPONSE)
    response = _sub(root, "Response")
    response.set("xmlns", _AD_OUTLOOK)
    account = _sub(response, "Account")
    _sub(account, "AccountType", "email")
    _sub(account, "Action", "settings")
    for server in (settings.incoming[:1] + settings.outgoing[:1]):
        proto = _sub(account, "Protocol")
        _sub(proto, "Type", server.protocol)
        _sub(proto, "Server", settings.hostname)
        _sub(proto, "Port", server.port)
        _sub(proto, "DomainRequired", "off")
        _sub(proto, "LoginName", email)
        _sub(proto, "SPA", "off")
        if server.tls == "SSL/TLS":
            _sub(proto, "SSL", "on")
        else:
            _sub(proto, "Encryption", "TLS")
        _sub(proto, "AuthRequired", "on")
        if server.protocol == "SMTP":
            _sub(proto, "UsePOPAuth", "off")
            _sub(proto, "SMTPLast", "off")
    return _xml(root)


def autodiscover_error() -> bytes:
    """The answer to a request without a usable address (error 600)."""
    root = ET.Element("Autodiscover", xmlns=_AD_RESPONSE)
    response = _sub(root, "Response")
    error = _sub(response, "Error")
    _sub(error, "ErrorCode", 600)
    _sub(error, "Message", "Invalid Request")
    _sub(error, "DebugData", "")
    return _xml(root)


def mobileconfig(settings: MailSettings, email: str, account_name: str) -> bytes:
    """An unsigned Apple configuration profile for one mail account.

    The UUIDs are derived from the host and address, so downloading the
    profile again replaces the installed one instead of adding a second.
    """
    incoming = settings.incoming[0] if settings.incoming else Server("IMAP", 993, "SSL/TLS")
    outgoing = settings.outgoing[0] if settings.outgoing else Server("SMTP", 465, "SSL/TLS")
    reverse = ".".join(reversed(settings.hostname.split(".")))
    ident = f"{reverse}.postvault.mail"
    account = {
        "EmailAccountDescription": f"{SHORT} ({email})",
        "EmailAccountName": account_name,
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": email,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": settings.hostname,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": email,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": settings.hostname,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": email,
        "OutgoingPasswordSameAsIncomingPassword": True,
        "PreventMove": True,
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.account",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{email}.account.{settings.hostname}")).upper(),
        "PayloadDisplayName": f"{SHORT} mail account",
    }
    profile = {
        "PayloadContent": [account],
        "PayloadDescription": f"Sets up {email} for {SERVICE} on {settings.hostname}. Mail asks for the password.",
        "PayloadDisplayName": SERVICE,
        "PayloadIdentifier": ident,
        "PayloadOrganization": SERVICE,
        "PayloadRemovalDisallowed": False,
        "PayloadType": "Configuration",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{email}.profile.{settings.hostname}")).upper(),
        "PayloadVersion": 1,
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)
