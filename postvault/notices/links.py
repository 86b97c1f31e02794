"""The addresses a person is sent to: the sign-up link and the sign-in
route (IMAP server, account pages), from the server config.

The sign-up path is ``/signup/<token>``: the HTTPS pages serve it. The token
sits in the path, not a query string, only for a tidier link; the pages
send ``Referrer-Policy: no-referrer`` either way, so it never leaks onward.
"""

from __future__ import annotations

from ..conf.schema import Config
from ..outbound.message import SignInRoute

SIGNUP_PATH = "/signup/"


def web_base(config: Config) -> str | None:
    """``https://HOST[:PORT]/``, or None when no HTTPS listener is set."""
    https = config.listen.https
    if https is None:
        return None
    port = "" if https.port == 443 else f":{https.port}"
    return f"https://{config.hostname}{port}/"


def signup_link(config: Config, token: str) -> str:
    base = web_base(config) or f"https://{config.hostname}/"
    return f"{base.rstrip('/')}{SIGNUP_PATH}{token}"


def sign_in_route(config: Config) -> SignInRoute:
    # Implicit TLS first (RFC 8314 §3.3 prefers it to STARTTLS).
    if config.listen.imaps is not None:
        port, tls = config.listen.imaps.port, "SSL/TLS"
    elif config.listen.imap is not None:
        port, tls = config.listen.imap.port, "STARTTLS"
    else:
        port, tls = None, ""
    return SignInRoute(config.hostname, port, tls, web_base(config))
