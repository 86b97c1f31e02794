"""twisted.cred for IMAP: LOGIN and AUTHENTICATE (PLAIN, LOGIN) end up in
``postvault.login.authenticate`` on the service's thread pool.

One checker serves every mechanism: Twisted's ``PLAINCredentials`` and
``LOGINCredentials`` are ``UsernamePassword`` subclasses. The avatar id is
the ``AccountSession`` itself (it holds the unwrapped private key), and the
realm wraps it in an ``Account`` for this connection only.

Invariants:
- The password check, the KDF and the key unwrap never run on the reactor.
- The auth limits of policy.toml apply before the password (login.py); a
  refusal by the limits becomes ``LoginRefused`` carrying the policy's
  IMAP code and sentence, so the client reads e.g. ``NO [UNAVAILABLE] ...``.
- Nothing here logs a user name or password.
"""

from __future__ import annotations

import binascii
from typing import Any

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.mail import imap4
from zope.interface import implementer

from ..errors import AuthenticationFailed, LoginLimited
from ..login import authenticate
from .account import Account


class LoginRefused(error.UnauthorizedLogin):
    """A failed login, with the tagged NO text to answer."""

    def __init__(self, response: bytes) -> None:
        super().__init__(response.decode("utf-8", "replace"))
        self.response = response


FAILED = b"[AUTHENTICATIONFAILED] Authentication failed."


class StrictPLAIN(imap4.PLAINCredentials):
    """RFC 4616 PLAIN: ``[authzid] NUL authcid NUL passwd``. Twisted ignores
    the authorization identity; we refuse one that names someone else, as
    we support no proxy authorization."""

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise imap4.IllegalClientResponse("Malformed PLAIN response")
        authzid, self.username, self.password = parts
        if authzid and authzid.lower() != self.username.lower():
            raise imap4.IllegalClientResponse("Logging in as another user is not supported")


def decode_sasl(line: bytes) -> bytes:
    """A base64 SASL response (RFC 3501 §6.2.2); ``=`` is empty (RFC 4959)."""
    line = line.strip()
    if line == b"=":
        return b""
    try:
        return binascii.a2b_base64(line + b"=" * (-len(line) % 4)) if line else b""
    except binascii.Error as exc:
        raise imap4.IllegalClientResponse("The response is not base64") from exc


@implementer(ICredentialsChecker)
class StoreChecker:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, service: Any) -> None:
        self.service = service

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        try:
            email = (creds.username or b"").decode("utf-8")
            password = (creds.password or b"").decode("utf-8")
        except UnicodeDecodeError:
            return defer.fail(LoginRefused(FAILED))
        client_ip = getattr(creds, "client_ip", None)

        def check() -> Any:
            try:
                return authenticate(self.service.store, self.service.policy, email, password,
                                    client_ip=client_ip, protocol="imap", unwrap=True)
            except LoginLimited as exc:
                decision = exc.decision
                code = getattr(decision, "imap_code", "") or "UNAVAILABLE"
                text = getattr(decision, "text", "Too many failed logins; try again later.")
                raise LoginRefused(f"[{code}] {text}".encode("utf-8", "replace")) from None
            except AuthenticationFailed:
                raise LoginRefused(FAILED) from None

        return self.service.run(check)


@implementer(portal.IRealm)
class Realm:
    def __init__(self, service: Any) -> None:
        self.service = service

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, Account, Any]:
        if imap4.IAccount not in interfaces:
            raise NotImplementedError("IMAP accounts only")
        account = Account(avatar_id, self.service)
        return imap4.IAccount, account, account.logout


def make_portal(service: Any) -> portal.Portal:
    return portal.Portal(Realm(service), [StoreChecker(service)])
