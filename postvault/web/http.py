"""The HTTP layer under the pages: one request in, one ``Response`` out.

``WebRequest`` is what a handler sees (method, path, query, form, cookies,
client address, the session if any); ``Response`` is what it returns. The
Twisted side (``service.py``) turns a Twisted request into a ``WebRequest``
and writes the ``Response`` back, adding the security headers that every
response carries, whatever its status:

- ``Content-Security-Policy``: nothing but our own stylesheet, images and
  form targets; no script at all, no framing, no <base>;
- ``Strict-Transport-Security`` (a year): the pages only exist over TLS;
- ``Referrer-Policy: no-referrer``: a sign-up link sits in the path;
- ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` (for
  browsers that predate frame-ancestors), ``Cross-Origin-Opener-Policy``,
  ``Cross-Origin-Resource-Policy``, a ``Permissions-Policy`` that turns off
  what the pages never use;
- ``Cache-Control: no-store`` on everything but the stylesheet: account
  pages must not linger in a shared computer's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sessions import WebSession

CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CSP),
    ("Strict-Transport-Security", "max-age=31536000"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
)
SESSION_COOKIE = "__Host-pv_session"
PRE_COOKIE = "__Host-pv_pre"
HTML = "text/html; charset=utf-8"


def cookie(name: str, value: str, *, expire: bool = False) -> str:
    """A Set-Cookie value: host-only (``__Host-``: Secure, Path=/, no
    Domain), unreadable to script, never sent on cross-site requests."""
    tail = "; Max-Age=0" if expire else ""
    return f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict{tail}"


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = HTML
    headers: list[tuple[str, str]] = field(default_factory=list)
    cookies: list[str] = field(default_factory=list)
    cache: str = "no-store"


def redirect(location: str, *, cookies: list[str] | None = None) -> Response:
    """303 See Other: after a POST, the browser GETs the result page."""
    return Response(303, b"", HTML, [("Location", location)], cookies or [])


@dataclass
class WebRequest:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    cookies: dict[str, str]
    client_ip: str | None
    body: bytes = b""
    content_type: str = ""
    session: WebSession | None = None
    # Set when a pre-session cookie had to be made for this response.
    new_pre: str | None = None
