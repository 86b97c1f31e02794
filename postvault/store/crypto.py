"""Encryption at rest: account keys, content keys and sealed message blobs.

This module is the only place in Postvault that touches cryptographic
primitives, and it only composes well-known constructions from the
``cryptography`` package; it invents none of its own.

* **Account keys.**  Each account has an X25519 key pair.  The private key is
  stored wrapped (AES-256-GCM) under a key derived from the account password
  (Argon2id) or, before sign-up, from the 256-bit invitation token (HKDF-SHA256:
  the token already has full entropy, so a slow KDF would add nothing).  The
  owner (account id) is bound into the associated data, so a wrapped key copied
  to another account does not open.
* **Content keys.**  Every message is sealed under a fresh 256-bit content key.
  That key is wrapped to each recipient's public key with an ephemeral X25519
  exchange, HKDF-SHA256 and AES-256-GCM (an ECIES / HPKE-base-mode style
  composition); owner and message id are bound in, so a wrapped key moved to
  another account or message does not open.
* **Sealed blobs.**  Message bytes are encrypted with the STREAM construction
  (Hoang, Reyhanitabar, Rogaway, Vizár 2015) over AES-256-GCM: fixed-size
  chunks, a nonce made of the chunk index and a "final chunk" flag, and
  associated data binding the header and the message id.  This gives bounded
  memory, random access, and detection of truncation, reordering, splicing
  and blobs moved to another message.
* **Search index entries.**  The header fields IMAP SEARCH matches on, one
  small value per message and account, sealed with AES-256-GCM under the
  account's search-index key: HKDF-SHA256 of the account's X25519 private
  key bytes with its own label (so only a logged-in session, which holds
  the private key, can make or read entries), bound to the account (key
  owner) and the message id (``search_index_key``, ``seal_search_entry``,
  ``open_search_entries``).
* **Header cache entries.**  A message's raw header block (what IMAP FETCH
  BODY[HEADER] and its relatives answer from), one value per message copy,
  sealed like a search index entry but under its own key, the account's
  header-cache key (HKDF-SHA256 of the private key with its own label), and
  with its own associated-data label (``header_cache_key``,
  ``seal_header_entry``, ``open_header_entries``).
* **Small sealed values.**  A message's summary (its ENVELOPE and
  BODYSTRUCTURE, which hold the subject) is sealed whole with AES-256-GCM
  under a key derived from the content key, bound to a label and the message
  id (``seal_small``/``open_small``).

Blob format (version 1)::

    header  = b"PVB1" || version (1 byte) || chunk_size (u32 BE) || salt (16 bytes)
    chunk_i = AES-256-GCM(chunk_key, nonce_i, plaintext_i, aad_i)   # ciphertext || 16-byte tag
    blob    = header || chunk_0 || ... || chunk_{n-1}

    chunk_key = HKDF-SHA256(content_key, salt, info=BLOB_KEY_LABEL)
    nonce_i   = i (11 bytes BE) || final flag (1 byte: 1 on the last chunk, else 0)
    aad_i     = enc(BLOB_AAD_LABEL, header, message_id) || i (u64 BE) || final flag

Every chunk but the last carries exactly ``chunk_size`` plaintext bytes; the
last carries 1..chunk_size bytes, or 0 only when the whole message is empty.
So the plaintext length follows from the blob length alone.

The per-blob ``chunk_key`` (as in Tink's streaming AEAD and age's payload key)
is a safety margin: counter nonces are only safe if a key never encrypts two
different streams, and deriving a fresh key from a random salt keeps that true
even if a caller ever re-seals different bytes under the same content key
(a retried delivery, a re-encoded draft).

Error messages are public text: they say what failed and where (a chunk
index), never what the data was.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from postvault.errors import CryptoError, IntegrityError, WrongSecret

__all__ = [
    "KEY_LEN",
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "KdfParams",
    "KeyPair",
    "generate_keypair",
    "derive_wrapping_key",
    "wrap_private_key",
    "unwrap_private_key",
    "new_content_key",
    "wrap_content_key",
    "unwrap_content_key",
    "unwrap_content_keys",
    "load_private_key",
    "seal_small",
    "open_small",
    "open_small_many",
    "search_index_key",
    "seal_search_entry",
    "open_search_entries",
    "header_cache_key",
    "seal_header_entry",
    "open_header_entries",
    "seal_stream",
    "SealedReader",
    "open_stream",
    "sealed_length",
]

KEY_LEN = 32
# 64 KiB keeps per-call overhead of AES-GCM well under the cost of the
# encryption itself (see docs/benchmarks.md) while a partial IMAP fetch
# decrypts at most a few tens of KiB more than it asked for.
DEFAULT_CHUNK_SIZE = 64 * 1024
# Upper bound accepted from a blob header, which is read before anything is
# authenticated: a forged header must not make a reader allocate gigabytes.
MAX_CHUNK_SIZE = 4 * 1024 * 1024

NONCE_LEN = 12
TAG_LEN = 16
SALT_LEN = 16
# A token-derived key protects a private key just like a password-derived
# one; with HKDF (no work factor) all the strength comes from the token.
MIN_TOKEN_LEN = 32

# Domain-separation labels: every key derivation and every AAD names its
# purpose and version, so no ciphertext of one kind opens as another.
_PRIVATE_KEY_LABEL = b"postvault/v1/wrapped-private-key"
_TOKEN_KDF_LABEL = b"postvault/v1/token-wrapping-key"
_CONTENT_KEY_KDF_LABEL = b"postvault/v1/content-key-wrap/kdf"
_CONTENT_KEY_AAD_LABEL = b"postvault/v1/content-key-wrap/aad"
_BLOB_KEY_LABEL = b"postvault/v1/blob/chunk-key"
_BLOB_AAD_LABEL = b"postvault/v1/blob/chunk"
_SMALL_KEY_LABEL = b"postvault/v1/small/key"
_SMALL_AAD_LABEL = b"postvault/v1/small/aad"
_SEARCH_KEY_LABEL = b"postvault/v1/search-index/key"
_SEARCH_AAD_LABEL = b"postvault/v1/search-index/entry"
_HEADER_KEY_LABEL = b"postvault/v1/header-cache/key"
_HEADER_AAD_LABEL = b"postvault/v1/header-cache/entry"

_PRIVATE_KEY_VERSION = 1
_SMALL_VERSION = 1
_SEARCH_VERSION = 1
_HEADER_VERSION = 1
_BLOB_MAGIC = b"PVB1"
_BLOB_VERSION = 1
_HEADER = struct.Struct(">4sBI16s")  # magic, version, chunk_size, salt
HEADER_LEN = _HEADER.size

_ARGON2ID = "argon2id"
# One Argon2id derivation at a time in this process. cryptography >= 50
# releases the GIL during it and lets OpenSSL spread the lanes over its own
# thread pool (sized to the CPU count); two derivations at once then hang or
# fail with a spurious MemoryError (seen with 50.0.2: two threads, lanes 4).
# A lone derivation still uses several cores, and the GIL stays free for the
# event loop and for bcrypt, which a login runs beside it (accounts.login).
_ARGON2_LOCK = threading.Lock()
_HKDF = "hkdf-sha256"
# Bounds accepted for stored Argon2id parameters: generous enough to raise
# the cost for years, tight enough that a corrupted row cannot ask for
# terabytes of memory or hours of work.
_MAX_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB
_MAX_ITERATIONS = 64
_MAX_LANES = 64
_MAX_SALT_LEN = 64


_U32 = struct.Struct(">I").pack


def _enc(*parts: bytes) -> bytes:
    """Length-prefix each part, so that distinct tuples never encode alike.

    Plain concatenation of variable-length fields is ambiguous
    (``b"ab" + b"c" == b"a" + b"bc"``); a 4-byte length before each
    part removes that ambiguity from every info string and AAD.
    """
    return b"".join([_U32(len(p)) + p for p in parts])


def _require_bytes(name: str, value: object, length: int | None = None) -> bytes:
    """Reject wrong types and lengths early: these are programming errors."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes")
    value = bytes(value)
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must be {length} bytes")
    return value


# --------------------------------------------------------------------------
# Key derivation parameters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KdfParams:
    """How a wrapping key is derived from a secret; stored per account.

    ``algorithm`` is ``"argon2id"`` for passwords (slow, memory-hard) or
    ``"hkdf-sha256"`` for 256-bit invitation tokens (already high entropy).
    The Argon2id cost fields are ignored for HKDF.  Storing the parameters
    with each account lets the defaults be raised later: the next password
    change (or login) re-wraps with the new ones.
    """

    algorithm: str
    salt: bytes
    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        # Validate once here so that every instance, however made, is usable.
        if self.algorithm not in (_ARGON2ID, _HKDF):
            raise CryptoError("key derivation algorithm is not supported")
        if not isinstance(self.salt, bytes) or not (
            SALT_LEN <= len(self.salt) <= _MAX_SALT_LEN
        ):
            raise CryptoError("key derivation salt has an invalid length")
        for name, value, low, high in (
            ("lanes", self.lanes, 1, _MAX_LANES),
            ("iterations", self.iterations, 1, _MAX_ITERATIONS),
            ("memory_kib", self.memory_kib, 8, _MAX_MEMORY_KIB),
        ):
            # bool is an int subclass; True is not a cost parameter.
            if isinstance(value, bool) or not isinstance(value, int):
                raise CryptoError(f"key derivation parameter {name} must be an integer")
            if not low <= value <= high:
                raise CryptoError(f"key derivation parameter {name} is out of range")
        if self.memory_kib < 8 * self.lanes:
            # Argon2 needs at least 8 KiB of memory per lane.
            raise CryptoError("key derivation memory is too small for its lanes")

    @classmethod
    def for_password(
        cls, memory_kib: int = 65536, iterations: int = 3, lanes: int = 4
    ) -> KdfParams:
        """Argon2id parameters with a fresh random salt.

        The defaults (64 MiB, 3 passes, 4 lanes) follow RFC 9106's second
        recommended option and cost roughly 0.1-0.3 s on a server core.
        """
        return cls(_ARGON2ID, os.urandom(SALT_LEN), memory_kib, iterations, lanes)

    @classmethod
    def for_token(cls) -> KdfParams:
        """HKDF-SHA256 parameters with a fresh random salt, for invitation tokens."""
        return cls(_HKDF, os.urandom(SALT_LEN))

    def to_json(self) -> str:
        """A compact JSON text to store beside the wrapped private key."""
        doc: dict[str, object] = {
            "v": 1,
            "algorithm": self.algorithm,
            "salt": base64.b64encode(self.salt).decode("ascii"),
        }
        if self.algorithm == _ARGON2ID:
            doc.update(
                memory_kib=self.memory_kib,
                iterations=self.iterations,
                lanes=self.lanes,
            )
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> KdfParams:
        """Parse and validate ``to_json`` output; raise ``CryptoError`` on anything else."""
        try:
            doc = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise CryptoError("key derivation parameters are not valid JSON") from exc
        # type() check, not ==: JSON true and 1.0 compare equal to 1.
        if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != 1:
            raise CryptoError("key derivation parameters have an unknown format")
        algorithm = doc.get("algorithm")
        allowed = {"v", "algorithm", "salt"}
        if algorithm == _ARGON2ID:
            allowed |= {"memory_kib", "iterations", "lanes"}
        # Unknown keys mean a newer or corrupted format: refuse rather than
        # silently derive a different key.
        if set(doc) != allowed:
            raise CryptoError("key derivation parameters have unexpected fields")
        salt_text = doc["salt"]
        if not isinstance(salt_text, str):
            raise CryptoError("key derivation salt is not base64 text")
        try:
            salt = base64.b64decode(salt_text.encode("ascii"), validate=True)
        except (ValueError, binascii.Error) as exc:
            raise CryptoError("key derivation salt is not base64 text") from exc
        if algorithm == _ARGON2ID:
            return cls(
                _ARGON2ID, salt, doc["memory_kib"], doc["iterations"], doc["lanes"]
            )
        return cls(algorithm if isinstance(algorithm, str) else "", salt)


# --------------------------------------------------------------------------
# Account key pairs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A raw X25519 key pair; the private half never appears in a repr."""

    public: bytes
    private: bytes = field(repr=False)


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair for a new account."""
    private = X25519PrivateKey.generate()
    return KeyPair(
        public=private.public_key().public_bytes_raw(),
        private=private.private_bytes_raw(),
    )


def public_key_of(private: bytes) -> bytes:
    """The X25519 public key that belongs to ``private``."""
    _require_bytes("private key", private, KEY_LEN)
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def derive_wrapping_key(secret: bytes, kdf: KdfParams) -> bytes:
    """Derive the 32-byte key that wraps an account's private key.

    Slow (Argon2id) for passwords; fast (HKDF) for invitation tokens, which
    must be at least 32 bytes (a 256-bit random token, raw or encoded).
    """
    secret = _require_bytes("secret", secret)
    if kdf.algorithm == _ARGON2ID:
        with _ARGON2_LOCK:
            return Argon2id(
                salt=kdf.salt,
                length=KEY_LEN,
                iterations=kdf.iterations,
                lanes=kdf.lanes,
                memory_cost=kdf.memory_kib,
            ).derive(secret)
    if len(secret) < MIN_TOKEN_LEN:
        raise CryptoError("an invitation token must carry at least 256 bits")
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_LEN,
        salt=kdf.salt,
        info=_TOKEN_KDF_LABEL,
    ).derive(secret)


def _private_key_aad(owner: bytes) -> bytes:
    return _enc(_PRIVATE_KEY_LABEL, bytes([_PRIVATE_KEY_VERSION]), owner)


def wrap_private_key(private: bytes, wrapping_key: bytes, owner: bytes) -> bytes:
    """Encrypt a private key for storage: ``version || nonce || ciphertext+tag``.

    The owner (account id) is in the associated data, so the result only
    opens for that account.
    """
    private = _require_bytes("private", private, KEY_LEN)
    wrapping_key = _require_bytes("wrapping_key", wrapping_key, KEY_LEN)
    owner = _require_bytes("owner", owner)
    # A random nonce is safe: one wrapping key encrypts a handful of values
    # over its life (one per password change at most).
    nonce = os.urandom(NONCE_LEN)
    ct = AESGCM(wrapping_key).encrypt(nonce, private, _private_key_aad(owner))
    return bytes([_PRIVATE_KEY_VERSION]) + nonce + ct


def unwrap_private_key(wrapped: bytes, wrapping_key: bytes, owner: bytes) -> bytes:
    """Open ``wrap_private_key`` output.

    Raises ``WrongSecret`` when it does not open (wrong password or token,
    other owner, tampered); ``IntegrityError`` when the stored value is not
    a wrapped key of a known version at all (a corrupted row).
    """
    wrapped = _require_bytes("wrapped", wrapped)
    wrapping_key = _require_bytes("wrapping_key", wrapping_key, KEY_LEN)
    owner = _require_bytes("owner", owner)
    if len(wrapped) != 1 + NONCE_LEN + KEY_LEN + TAG_LEN:
        raise IntegrityError("wrapped private key has an invalid length")
    if wrapped[0] != _PRIVATE_KEY_VERSION:
        raise IntegrityError("wrapped private key has an unknown version")
    nonce = wrapped[1 : 1 + NONCE_LEN]
    try:
        return AESGCM(wrapping_key).decrypt(
            nonce, wrapped[1 + NONCE_LEN :], _private_key_aad(owner)
        )
    except InvalidTag:
        # Deliberately "from None": the InvalidTag adds nothing a log needs.
        raise WrongSecret("the secret does not unlock this account key") from None


# --------------------------------------------------------------------------
# Content keys
# --------------------------------------------------------------------------


def new_content_key() -> bytes:
    """A fresh random 256-bit key for sealing one message."""
    return AESGCM.generate_key(bit_length=256)


def _content_kek(
    shared: bytes, eph_pub: bytes, recipient_pub: bytes, owner: bytes, message_id: bytes
) -> bytes:
    # Binding both public keys into the KDF (as ECIES/HPKE do) ties the key
    # to this exact exchange; owner and message id make it single-purpose.
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_LEN,
        salt=None,
        info=_enc(_CONTENT_KEY_KDF_LABEL, eph_pub, recipient_pub, owner, message_id),
    ).derive(shared)


def wrap_content_key(
    content_key: bytes, recipient_public: bytes, owner: bytes, message_id: bytes
) -> bytes:
    """Wrap a content key to one recipient: ``eph_pub || nonce || ciphertext+tag``.

    No password is needed, so delivery works while the recipient is away.
    """
    content_key = _require_bytes("content_key", content_key, KEY_LEN)
    recipient_public = _require_bytes("recipient_public", recipient_public, KEY_LEN)
    owner = _require_bytes("owner", owner)
    message_id = _require_bytes("message_id", message_id)
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    try:
        shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    except ValueError:
        # A low-order point gives an all-zero secret; cryptography refuses it.
        raise CryptoError("recipient public key is not a usable X25519 key") from None
    kek = _content_kek(shared, eph_pub, recipient_public, owner, message_id)
    nonce = os.urandom(NONCE_LEN)
    ct = AESGCM(kek).encrypt(
        nonce, content_key, _enc(_CONTENT_KEY_AAD_LABEL, owner, message_id)
    )
    return eph_pub + nonce + ct


def load_private_key(private: bytes) -> X25519PrivateKey:
    """The key object for a raw X25519 private key.

    Loading one costs a scalar multiplication (OpenSSL derives the public
    key on import), as much as an exchange: a logged-in session loads its
    key once (``AccountSession.private_key_object``) and passes the object
    to the unwrapping functions below instead of the bytes.
    """
    return _private_key("private", private)


def _private_key(name: str, value: bytes | X25519PrivateKey) -> X25519PrivateKey:
    """``value`` as a key object: as given, or loaded from its raw bytes."""
    if isinstance(value, X25519PrivateKey):
        return value
    return X25519PrivateKey.from_private_bytes(_require_bytes(name, value, KEY_LEN))


def unwrap_content_key(
    wrapped: bytes, recipient_private: bytes | X25519PrivateKey, owner: bytes, message_id: bytes
) -> bytes:
    """Open ``wrap_content_key`` output; raise ``IntegrityError`` if it does not open.
    ``recipient_private``: the raw key or its loaded object (``load_private_key``)."""
    wrapped = _require_bytes("wrapped", wrapped)
    private = _private_key("recipient_private", recipient_private)
    owner = _require_bytes("owner", owner)
    message_id = _require_bytes("message_id", message_id)
    if len(wrapped) != KEY_LEN + NONCE_LEN + KEY_LEN + TAG_LEN:
        raise IntegrityError("wrapped content key has an invalid length")
    eph_pub = wrapped[:KEY_LEN]
    nonce = wrapped[KEY_LEN : KEY_LEN + NONCE_LEN]
    ct = wrapped[KEY_LEN + NONCE_LEN :]
    recipient_pub = private.public_key().public_bytes_raw()
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:
        raise IntegrityError("wrapped content key failed authentication") from None
    kek = _content_kek(shared, eph_pub, recipient_pub, owner, message_id)
    try:
        return AESGCM(kek).decrypt(
            nonce, ct, _enc(_CONTENT_KEY_AAD_LABEL, owner, message_id)
        )
    except InvalidTag:
        raise IntegrityError("wrapped content key failed authentication") from None


def unwrap_content_keys(
    items: Iterable[tuple[bytes, bytes]], recipient_private: bytes | X25519PrivateKey, owner: bytes
) -> list[bytes]:
    """``unwrap_content_key`` for many ``(wrapped, message_id)`` pairs of one
    owner, in order; raises ``IntegrityError`` on the first that does not open.

    Same result at about half the cost, which is what listing a large
    folder's summaries pays: the private key object and its public key (a
    scalar multiplication) are made once, and the constant parts of the KDF
    info and AAD are encoded once. The X25519 exchange per message remains.
    Given the loaded key object (``load_private_key``), not even the one
    load: what a session fetching one message at a time saves.
    """
    private = _private_key("recipient_private", recipient_private)
    owner = _require_bytes("owner", owner)
    recipient_pub = private.public_key().public_bytes_raw()
    # _enc(LABEL, eph_pub, recipient_pub, owner, message_id), in pieces.
    info_head = _enc(_CONTENT_KEY_KDF_LABEL) + _U32(KEY_LEN)
    info_mid = _enc(recipient_pub, owner)
    aad_head = _enc(_CONTENT_KEY_AAD_LABEL, owner)
    out = []
    for wrapped, message_id in items:
        if len(wrapped) != KEY_LEN + NONCE_LEN + KEY_LEN + TAG_LEN:
            raise IntegrityError("wrapped content key has an invalid length")
        eph_pub = bytes(wrapped[:KEY_LEN])
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        except ValueError:
            raise IntegrityError("wrapped content key failed authentication") from None
        mid = _U32(len(message_id)) + message_id
        kek = HKDF(
            algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info_head + eph_pub + info_mid + mid
        ).derive(shared)
        try:
            out.append(
                AESGCM(kek).decrypt(
                    wrapped[KEY_LEN : KEY_LEN + NONCE_LEN], wrapped[KEY_LEN + NONCE_LEN :], aad_head + mid
                )
            )
        except InvalidTag:
            raise IntegrityError("wrapped content key failed authentication") from None
    return out


# --------------------------------------------------------------------------
# Small sealed values (a message's summary)
# --------------------------------------------------------------------------
#
# Format: version (1 byte) || nonce (12 bytes) || AES-256-GCM ciphertext+tag
#
#   key = HKDF-SHA256(content_key, salt=None, info=enc(SMALL_KEY_LABEL, label))
#   aad = enc(SMALL_AAD_LABEL, label, message_id)
#
# The content key is never an AES key itself: the blob derives its chunk key
# with another label, so a summary and a blob chunk can never be swapped or
# share a (key, nonce) pair. The label names the value's purpose, the message
# id binds it to its message: a sealed summary copied to another message's
# row, or opened as another kind of value, fails authentication. One content
# key seals one summary (or a few, if one is ever rebuilt): random nonces are
# far from any collision bound.


def _small_key(content_key: bytes, label: bytes) -> AESGCM:
    return AESGCM(
        HKDF(
            algorithm=hashes.SHA256(),
            length=KEY_LEN,
            salt=None,
            info=_enc(_SMALL_KEY_LABEL, label),
        ).derive(content_key)
    )


def seal_small(content_key: bytes, label: bytes, message_id: bytes, data: bytes) -> bytes:
    """Encrypt a small value that belongs to one message (held in memory whole)."""
    content_key = _require_bytes("content_key", content_key, KEY_LEN)
    label = _require_bytes("label", label)
    message_id = _require_bytes("message_id", message_id)
    data = _require_bytes("data", data)
    nonce = os.urandom(NONCE_LEN)
    ct = _small_key(content_key, label).encrypt(
        nonce, data, _enc(_SMALL_AAD_LABEL, label, message_id)
    )
    return bytes([_SMALL_VERSION]) + nonce + ct


def open_small_many(label: bytes, items: Iterable[tuple[bytes, bytes, bytes]]) -> list[bytes]:
    """``open_small`` over ``(content_key, message_id, sealed)`` triples, in
    order, with the per-label encodings made once; ``IntegrityError`` on the
    first that does not open."""
    label = _require_bytes("label", label)
    info = _enc(_SMALL_KEY_LABEL, label)
    aad_head = _enc(_SMALL_AAD_LABEL, label)
    out = []
    for content_key, message_id, sealed in items:
        if len(content_key) != KEY_LEN:
            raise ValueError(f"content_key must be {KEY_LEN} bytes")
        if len(sealed) < 1 + NONCE_LEN + TAG_LEN or sealed[0] != _SMALL_VERSION:
            raise IntegrityError("sealed value has an unknown format")
        key = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info).derive(content_key)
        try:
            out.append(
                AESGCM(key).decrypt(
                    sealed[1 : 1 + NONCE_LEN], sealed[1 + NONCE_LEN :], aad_head + _U32(len(message_id)) + message_id
                )
            )
        except InvalidTag:
            raise IntegrityError("sealed value failed authentication") from None
    return out


def open_small(content_key: bytes, label: bytes, message_id: bytes, sealed: bytes) -> bytes:
    """Open ``seal_small`` output; ``IntegrityError`` if it does not open."""
    content_key = _require_bytes("content_key", content_key, KEY_LEN)
    label = _require_bytes("label", label)
    message_id = _require_bytes("message_id", message_id)
    sealed = _require_bytes("sealed", sealed)
    if len(sealed) < 1 + NONCE_LEN + TAG_LEN or sealed[0] != _SMALL_VERSION:
        raise IntegrityError("sealed value has an unknown format")
    try:
        return _small_key(content_key, label).decrypt(
            sealed[1 : 1 + NONCE_LEN],
            sealed[1 + NONCE_LEN :],
            _enc(_SMALL_AAD_LABEL, label, message_id),
        )
    except InvalidTag:
        raise IntegrityError("sealed value failed authentication") from None


# --------------------------------------------------------------------------
# Search index entries (one account's header fields for SEARCH)
# --------------------------------------------------------------------------
#
# Format: version (1 byte) || nonce (12 bytes) || AES-256-GCM ciphertext+tag
#
#   key = HKDF-SHA256(private_key, salt=None, info=enc(SEARCH_KEY_LABEL))
#   aad = enc(SEARCH_AAD_LABEL, owner, message_id)
#
# The private key is 32 uniformly random bytes, so HKDF (no work factor) is
# the right derivation; the label keeps the derived key apart from every
# other use of that secret (the X25519 exchanges never see it as HKDF input).
# Delivery has only the public key and so can make no entry: the account's
# own sessions fill them. One key seals all of an account's entries with
# random nonces: the usual 2^32-encryptions bound for random 96-bit GCM
# nonces is far above any mailbox (each entry is sealed once, re-sealed only
# if it was damaged). The message id in the associated data stops an entry
# from being moved to another message's row; the owner and the key, to
# another account's.


def search_index_key(private_key: bytes) -> bytes:
    """The account's search-index key, derived from its private key."""
    return _account_key(private_key, _SEARCH_KEY_LABEL)


def seal_search_entry(index_key: bytes, owner: bytes, message_id: bytes, data: bytes) -> bytes:
    """Seal one message's search fields for one account."""
    return _seal_entry(index_key, _SEARCH_AAD_LABEL, _SEARCH_VERSION, owner, message_id, data)


def open_search_entries(
    index_key: bytes, owner: bytes, items: Iterable[tuple[bytes, bytes]]
) -> list[bytes | None]:
    """Open ``(message_id, sealed)`` entries of one account, in order; an
    entry that does not open (damaged, moved from another message or
    account, or sealed under another key) is None, and the rest still open."""
    return _open_entries(index_key, _SEARCH_AAD_LABEL, _SEARCH_VERSION, owner, items)


def _account_key(private_key: bytes, label: bytes) -> bytes:
    """A key of the account's own, HKDF-SHA256 of its private key under ``label``."""
    private_key = _require_bytes("private_key", private_key, KEY_LEN)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=_enc(label)).derive(private_key)


def _seal_entry(key: bytes, aad_label: bytes, version: int, owner: bytes, message_id: bytes, data: bytes) -> bytes:
    """version || nonce || AES-256-GCM(data), bound to ``aad_label``, the owner and the message id."""
    key = _require_bytes("key", key, KEY_LEN)
    owner = _require_bytes("owner", owner)
    message_id = _require_bytes("message_id", message_id)
    data = _require_bytes("data", data)
    nonce = os.urandom(NONCE_LEN)
    ct = AESGCM(key).encrypt(nonce, data, _enc(aad_label, owner, message_id))
    return bytes([version]) + nonce + ct


def _open_entries(
    key: bytes, aad_label: bytes, version: int, owner: bytes, items: Iterable[tuple[bytes, bytes]]
) -> list[bytes | None]:
    """``_seal_entry``'s values opened in order; None for one that does not open."""
    key = _require_bytes("key", key, KEY_LEN)
    owner = _require_bytes("owner", owner)
    aead = AESGCM(key)
    aad_head = _enc(aad_label, owner)
    out: list[bytes | None] = []
    for message_id, sealed in items:
        if len(sealed) < 1 + NONCE_LEN + TAG_LEN or sealed[0] != version:
            out.append(None)
            continue
        try:
            out.append(aead.decrypt(sealed[1 : 1 + NONCE_LEN], sealed[1 + NONCE_LEN :],
                                    aad_head + _U32(len(message_id)) + message_id))
        except InvalidTag:
            out.append(None)
    return out


# --------------------------------------------------------------------------
# Header cache entries (one account's copy of a message's header block)
# --------------------------------------------------------------------------
#
# Format: version (1 byte) || nonce (12 bytes) || AES-256-GCM ciphertext+tag
#
#   key = HKDF-SHA256(private_key, salt=None, info=enc(HEADER_KEY_LABEL))
#   aad = enc(HEADER_AAD_LABEL, owner, message_id)
#
# The same construction as the search index entries above, for the same
# reasons, with labels of its own: the two keys are independent, and an
# entry of one kind never opens as the other (a search entry put in the
# header column, or the reverse, fails like any damaged entry). Each entry is
# sealed once per copy (again only if it was damaged), so the random-nonce
# bound is as far off as for the search index.


def header_cache_key(private_key: bytes) -> bytes:
    """The account's header-cache key, derived from its private key."""
    return _account_key(private_key, _HEADER_KEY_LABEL)


def seal_header_entry(cache_key: bytes, owner: bytes, message_id: bytes, data: bytes) -> bytes:
    """Seal one message's header block for one account."""
    return _seal_entry(cache_key, _HEADER_AAD_LABEL, _HEADER_VERSION, owner, message_id, data)


def open_header_entries(
    cache_key: bytes, owner: bytes, items: Iterable[tuple[bytes, bytes]]
) -> list[bytes | None]:
    """Open ``(message_id, sealed)`` header entries of one account, in
    order; an entry that does not open (damaged, moved from another message
    or account, or sealed under another key) is None, and the rest still
    open."""
    return _open_entries(cache_key, _HEADER_AAD_LABEL, _HEADER_VERSION, owner, items)


# --------------------------------------------------------------------------
# Sealed blobs (STREAM over AES-256-GCM)
# --------------------------------------------------------------------------


class _Stream:
    """Per-blob state shared by the writer and both readers."""

    __slots__ = ("aead", "aad_prefix", "chunk_size", "header")

    def __init__(
        self,
        content_key: bytes,
        message_id: bytes,
        header: bytes,
        salt: bytes,
        chunk_size: int,
    ) -> None:
        content_key = _require_bytes("content_key", content_key, KEY_LEN)
        message_id = _require_bytes("message_id", message_id)
        chunk_key = HKDF(
            algorithm=hashes.SHA256(),
            length=KEY_LEN,
            salt=salt,
            info=_BLOB_KEY_LABEL,
        ).derive(content_key)
        self.aead = AESGCM(chunk_key)
        self.header = header
        self.chunk_size = chunk_size
        # The header is in every chunk's AAD, so a forged chunk size or salt
        # fails on the first chunk that is opened.
        self.aad_prefix = _enc(_BLOB_AAD_LABEL, header, message_id)

    @staticmethod
    def nonce(index: int, final: bool) -> bytes:
        return index.to_bytes(NONCE_LEN - 1, "big") + (b"\x01" if final else b"\x00")

    def aad(self, index: int, final: bool) -> bytes:
        return self.aad_prefix + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")

    def open_chunk(self, index: int, final: bool, ct: bytes) -> bytes:
        try:
            return self.aead.decrypt(
                self.nonce(index, final), ct, self.aad(index, final)
            )
        except InvalidTag:
            raise IntegrityError(
                f"sealed message failed authentication at chunk {index}"
            ) from None


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError("chunk_size must be an integer")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}")


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes unless EOF comes first (pipes return short reads)."""
    data = src.read(n)
    if data is None:
        raise IntegrityError("sealed message source is not ready for reading")
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def sealed_length(header: bytes, blob_len: int) -> int:
    """The plaintext length a sealed blob of ``blob_len`` bytes starting
    with ``header`` must hold, from its layout alone: no key is needed, so
    ``postvault fsck`` can compare it with the recorded size. Raises
    ``IntegrityError`` for a header or length that ``seal_stream`` never
    writes. (Only the tags prove the bytes themselves; that needs keys.)"""
    if len(header) < HEADER_LEN:
        raise IntegrityError("sealed message is shorter than its header")
    magic, version, chunk_size, _salt = _HEADER.unpack(header[:HEADER_LEN])
    if magic != _BLOB_MAGIC:
        raise IntegrityError("sealed message has an unknown format")
    if version != _BLOB_VERSION:
        raise IntegrityError("sealed message has an unknown version")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError("sealed message has an invalid chunk size")
    body = blob_len - HEADER_LEN
    if body < TAG_LEN:
        raise IntegrityError("sealed message is truncated at chunk 0")
    full = chunk_size + TAG_LEN
    n_chunks = -(-body // full)
    last_ct = body - (n_chunks - 1) * full
    if last_ct < TAG_LEN or (n_chunks > 1 and last_ct == TAG_LEN):
        raise IntegrityError(f"sealed message is malformed at chunk {n_chunks - 1}")
    return (n_chunks - 1) * chunk_size + (last_ct - TAG_LEN)


def _read_header(src: BinaryIO, content_key: bytes, message_id: bytes) -> _Stream:
    header = _read_full(src, HEADER_LEN)
    if len(header) != HEADER_LEN:
        raise IntegrityError("sealed message is shorter than its header")
    magic, version, chunk_size, salt = _HEADER.unpack(header)
    if magic != _BLOB_MAGIC:
        raise IntegrityError("sealed message has an unknown format")
    if version != _BLOB_VERSION:
        raise IntegrityError("sealed message has an unknown version")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError("sealed message has an invalid chunk size")
    return _Stream(content_key, message_id, header, salt, chunk_size)


def seal_stream(
    src: BinaryIO,
    dst: BinaryIO,
    content_key: bytes,
    message_id: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Encrypt ``src`` into ``dst`` as a sealed blob; return the plaintext length.

    Memory stays at about two chunks whatever the message size: ``src`` is
    read one chunk ahead, because a chunk can only be sealed once it is known
    whether it is the last one.
    """
    _check_chunk_size(chunk_size)
    salt = os.urandom(SALT_LEN)
    header = _HEADER.pack(_BLOB_MAGIC, _BLOB_VERSION, chunk_size, salt)
    stream = _Stream(content_key, message_id, header, salt, chunk_size)
    dst.write(header)
    # One reusable output buffer: encrypt_into avoids a fresh allocation
    # (and its page faults) per chunk, which is most of the per-chunk cost.
    total = 0
    index = 0
    current = _read_full(src, chunk_size)
    # A short first chunk is the only one: size the buffer to it, so that
    # small messages do not pay for a whole chunk-sized allocation.
    out = bytearray(len(current) + TAG_LEN)
    while True:
        # A short chunk is necessarily last; a full one is last only if
        # nothing follows it.
        nxt = _read_full(src, chunk_size) if len(current) == chunk_size else b""
        final = not nxt
        # encrypt_into wants a buffer of exactly the output size.
        target = memoryview(out)[: len(current) + TAG_LEN]
        stream.aead.encrypt_into(
            stream.nonce(index, final), current, stream.aad(index, final), target
        )
        dst.write(target)
        total += len(current)
        if final:
            return total
        index += 1
        current = nxt


def open_stream(src: BinaryIO, content_key: bytes, message_id: bytes) -> Iterator[bytes]:
    """Decrypt a sealed blob sequentially, one chunk of plaintext at a time.

    The header is checked at once; chunks are checked as they are yielded.
    ``src`` need not be seekable.  A truncated blob raises ``IntegrityError``
    only at its end, so a consumer must discard what it received if the
    iteration raises (STREAM authenticates each chunk, and the whole message
    only once the final chunk has opened).
    """
    stream = _read_header(src, content_key, message_id)
    return _iter_chunks(src, stream)


def _iter_chunks(src: BinaryIO, stream: _Stream) -> Iterator[bytes]:
    full = stream.chunk_size + TAG_LEN
    index = 0
    current = _read_full(src, full)
    while True:
        if len(current) < TAG_LEN:
            # No bytes at all where a chunk should be, or too few for a tag:
            # the final chunk was cut off.
            raise IntegrityError(
                f"sealed message is truncated at chunk {index}"
            )
        nxt = _read_full(src, full) if len(current) == full else b""
        final = not nxt
        if final and index > 0 and len(current) == TAG_LEN:
            # Only a wholly empty message may end in an empty chunk; anything
            # else is not what seal_stream writes.
            raise IntegrityError(f"sealed message is malformed at chunk {index}")
        plain = stream.open_chunk(index, final, current)
        if plain:
            yield plain
        if final:
            return
        index += 1
        current = nxt


class SealedReader(io.RawIOBase):
    """A readable, seekable file over a sealed blob, for partial fetches.

    Only the chunks that cover a read are fetched and opened, and at most one
    decrypted chunk is kept.  The layout is checked on construction by
    opening the last chunk with the final flag, so a blob that lost its tail
    is refused before any byte is returned.  ``src`` must be seekable; it is
    closed with the reader.
    """

    def __init__(self, src: BinaryIO, content_key: bytes, message_id: bytes) -> None:
        super().__init__()
        # Until construction succeeds the caller still owns src: a refused
        # blob must not have its file closed behind the caller's back.
        self._owns_src = False
        self._src = src
        src.seek(0)
        self._stream = _read_header(src, content_key, message_id)
        blob_len = src.seek(0, io.SEEK_END)
        body = blob_len - HEADER_LEN
        full = self._stream.chunk_size + TAG_LEN
        self._full = full
        if body < TAG_LEN:
            raise IntegrityError("sealed message is truncated at chunk 0")
        # Chunks before the last are full; the last holds what remains.
        n_chunks = -(-body // full)
        last_ct = body - (n_chunks - 1) * full
        if last_ct < TAG_LEN or (n_chunks > 1 and last_ct == TAG_LEN):
            raise IntegrityError(
                f"sealed message is malformed at chunk {n_chunks - 1}"
            )
        self._n_chunks = n_chunks
        self._size = (n_chunks - 1) * self._stream.chunk_size + (last_ct - TAG_LEN)
        self._pos = 0
        self._cached_index = -1
        self._cached: bytes = b""
        # Opening the last chunk proves the final flag is where the length
        # says it is: a blob cut at a chunk boundary fails right here.
        self._load(n_chunks - 1)
        self._owns_src = True

    @property
    def size(self) -> int:
        """Plaintext length in bytes."""
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError("invalid whence")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def _load(self, index: int) -> bytes:
        if index != self._cached_index:
            # Drop the old plaintext before fetching the next, so that at
            # most one decrypted chunk is alive at a time.
            self._cached = b""
            self._cached_index = -1
            final = index == self._n_chunks - 1
            self._src.seek(HEADER_LEN + index * self._full)
            if final:
                want = self._size - index * self._stream.chunk_size + TAG_LEN
            else:
                want = self._full
            ct = _read_full(self._src, want)
            if len(ct) != want:
                raise IntegrityError(f"sealed message is truncated at chunk {index}")
            self._cached = self._stream.open_chunk(index, final, ct)
            self._cached_index = index
        return self._cached

    def verify(self, start: int = 0, length: int | None = None) -> None:
        """Authenticate the chunks that cover ``length`` bytes from ``start``
        (to the end if None) without returning plaintext; ``IntegrityError``
        on the first that fails. A server calls this before it promises a
        literal of a known length, so a damaged chunk is refused before the
        first byte is sent rather than in the middle of the literal. The
        last chunk opened stays cached, so a range inside one chunk is
        decrypted once in all."""
        self._checkClosed()
        end = self._size if length is None else min(self._size, start + length)
        if end <= start:
            return
        cs = self._stream.chunk_size
        for index in range(start // cs, (end - 1) // cs + 1):
            self._load(index)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self._checkClosed()
        out = memoryview(buffer).cast("B")
        want = min(len(out), max(0, self._size - self._pos))
        done = 0
        cs = self._stream.chunk_size
        while done < want:
            index, skip = divmod(self._pos, cs)
            plain = self._load(index)
            n = min(len(plain) - skip, want - done)
            out[done : done + n] = memoryview(plain)[skip : skip + n]
            done += n
            self._pos += n
        return done

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        if size is None or size < 0:
            size = max(0, self._size - self._pos)
        buf = bytearray(min(size, max(0, self._size - self._pos)))
        # readinto always fills buf here: its length was clamped to what is
        # left, and every chunk's length is known from the layout.
        self.readinto(buf)
        return bytes(buf)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if not self.closed:
            self._cached = b""
            self._cached_index = -1
            try:
                if getattr(self, "_owns_src", False):
                    self._src.close()
            finally:
                super().close()
