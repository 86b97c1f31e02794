"""CSRF tokens (synchronizer token pattern, OWASP).

Every form carries a hidden ``csrf`` field, and every POST is refused with
403 before it does anything unless the field matches:

- logged in: the random token kept in the server-side session;
- before login (log-in and sign-up forms): an HMAC, under a key made per
  process, of a random pre-session cookie (``__Host-pv_pre``). Nothing is
  stored per visitor, so anonymous visits cost no memory, and a forged
  form cannot carry the token without reading our cookie. Login CSRF (a
  page logging the victim into the attacker's account) is refused too.

Comparisons are constant-time (``hmac.compare_digest``). SameSite=Strict
cookies are a second layer, not the defence.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


class CsrfKeys:
    """The per-process key for pre-session tokens."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def pre_token(self, pre_cookie: str) -> str:
        mac = hmac.new(self._key, b"postvault/pre-session/" + pre_cookie.encode("utf-8", "surrogatepass"),
                       hashlib.sha256)
        return mac.hexdigest()

    def check_pre(self, pre_cookie: str | None, given: str | None) -> bool:
        if not pre_cookie or not given:
            return False
        return same(self.pre_token(pre_cookie), given)


def same(expected: str, given: str | None) -> bool:
    """Constant-time equality of two tokens (False for a missing one)."""
    if not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8", "surrogatepass"), given.encode("utf-8", "surrogatepass"))
