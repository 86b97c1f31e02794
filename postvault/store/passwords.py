"""Password verification with bcrypt.

bcrypt reads at most 72 bytes and stops at NUL, and bcrypt >= 5 refuses
longer input. We feed it base64(SHA-256(password)) instead: 44 printable
bytes that depend on the whole password. The password also unwraps the
account's private key through Argon2id (``crypto``); bcrypt answers "is this
the password" without touching key material.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import unicodedata

import bcrypt

ROUNDS = 12


@functools.cache
def _dummy_hash() -> bytes:
    # Unknown users are checked against this hash so that a wrong address
    # costs the same time as a wrong password (no user enumeration by timing).
    return bcrypt.hashpw(b"postvault-dummy-password-for-timing", bcrypt.gensalt(rounds=ROUNDS))


def password_bytes(password: str) -> bytes:
    """The bytes of a password, for bcrypt and Argon2id alike; never raises.

    Plain ``encode("utf-8")`` raises on a lone surrogate (what a protocol
    layer decoding with ``surrogateescape`` produces from invalid UTF-8), and
    that ``UnicodeEncodeError`` quotes the character, its position and, in
    its ``object`` attribute, the whole password into logs and tracebacks.
    ``surrogatepass`` gives the same bytes for every valid string.

    Normalized to NFC first (RFC 8265 §4.2, OpaqueString), so the same
    password typed where a keyboard produces decomposed characters still
    opens the account.
    """
    return unicodedata.normalize("NFC", password).encode("utf-8", "surrogatepass")


def _prehash(password: str) -> bytes:
    return base64.b64encode(hashlib.sha256(password_bytes(password)).digest())


def hash_password(password: str, rounds: int = ROUNDS) -> bytes:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds=rounds))


def verify_password(password: str, stored: bytes | None) -> bool:
    """True if ``password`` matches; with ``stored=None`` spends the same time and says False."""
    # Make the dummy hash before branching, so that its one-time cost falls
    # on whichever login comes first, not on the first unknown address.
    dummy = _dummy_hash()
    if stored is None:
        bcrypt.checkpw(_prehash(password), dummy)
        return False
    return bcrypt.checkpw(_prehash(password), stored)
