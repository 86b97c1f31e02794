"""Recovery escrow with OpenPGP (issue 7 item 2): the escrow document that
holds an account's private key, and the recovery officers' public keys it
is encrypted to with GnuPG (python-gnupg).

Key handling (second look required on every change here):

- The escrow document is the account's raw X25519 private key with what
  binds it to the account: address, ``key_owner`` (the id bound into every
  key wrap of that account) and public key. Recovery checks all three and
  that the private key really belongs to the public key, so a document of
  another account, or of an older key pair, is refused.
- The plaintext document exists only in memory: python-gnupg hands it to
  ``gpg --encrypt`` through a pipe (stdin; checked in python-gnupg 0.5's
  ``_handle_io``: a thread copies a BytesIO into the subprocess's stdin, no
  temporary file) and gpg streams it; only the armored ciphertext comes
  back. Nothing here logs it.
- Postvault's GnuPG home (``[recovery] gnupg_home``) holds public keys only:
  a key file that carries a secret key is refused, so the officer's secret
  key can never end up on the server by mistake. gpg runs with
  ``--no-autostart``: encrypting to public keys needs no gpg-agent, and the
  server starts no daemons.
- The configured key files are the trust anchor (``--trust-model always``):
  whoever can write ``conf/`` decides who can recover accounts, exactly as
  they decide everything else about the server.

Decrypting needs an officer's offline secret key and happens outside
Postvault, with plain ``gpg --decrypt`` (docs/recovery.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EscrowError
from . import crypto

ESCROW_FORMAT = "postvault-key-escrow"
ESCROW_VERSION = 1
# A decrypted escrow document is a few hundred bytes; anything much larger
# is not one (and must not be read into memory whole).
MAX_ESCROW_SIZE = 64 * 1024

# python-gnupg logs gpg's command lines and status lines at DEBUG (never the
# data it pipes in); keep even those out of our logs.
logging.getLogger("gnupg").setLevel(logging.WARNING)


@dataclass(frozen=True)
class EscrowDocument:
    """What an escrow blob holds once an officer has decrypted it."""

    account: str
    key_owner: str
    public_key: bytes
    private_key: bytes = field(repr=False)

    def to_bytes(self) -> bytes:
        """One line of JSON and a newline (so a script can read it as a line)."""
        doc = {
            "format": ESCROW_FORMAT,
            "v": ESCROW_VERSION,
            "account": self.account,
            "key_owner": self.key_owner,
            "public_key": base64.b64encode(self.public_key).decode("ascii"),
            "private_key": base64.b64encode(self.private_key).decode("ascii"),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> EscrowDocument:
        """Parse a decrypted escrow; ``EscrowError`` with a one-line reason
        (never quoting the data) for anything else."""
        if len(data) > MAX_ESCROW_SIZE:
            raise EscrowError("this is not a decrypted Postvault escrow file (too large)")
        if data.lstrip().startswith(b"-----BEGIN PGP MESSAGE-----"):
            raise EscrowError("this escrow file is still encrypted; the recovery officer decrypts it "
                              "first with gpg --decrypt (see docs/recovery.md)")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise EscrowError("this is not a decrypted Postvault escrow file") from None
        if not isinstance(doc, dict) or doc.get("format") != ESCROW_FORMAT:
            raise EscrowError("this is not a decrypted Postvault escrow file")
        # type() check: JSON true == 1 in Python.
        if type(doc.get("v")) is not int or doc["v"] != ESCROW_VERSION:
            raise EscrowError("this escrow file has a version this Postvault does not know")
        expected = {"format", "v", "account", "key_owner", "public_key", "private_key"}
        if set(doc) != expected or not all(isinstance(doc[k], str) for k in expected - {"v"}):
            raise EscrowError("this escrow file has unexpected fields")
        try:
            public = base64.b64decode(doc["public_key"], validate=True)
            private = base64.b64decode(doc["private_key"], validate=True)
        except (ValueError, binascii.Error):
            raise EscrowError("this escrow file's keys are not base64") from None
        if len(public) != crypto.KEY_LEN or len(private) != crypto.KEY_LEN:
            raise EscrowError("this escrow file's keys have the wrong length")
        if crypto.public_key_of(private) != public:
            raise EscrowError("this escrow file is damaged: its private key does not belong to its public key")
        return cls(doc["account"], doc["key_owner"], public, private)

    def check_belongs_to(self, email: str, key_owner: str, public_key: bytes) -> None:
        """Refuse a document for another account or another key pair."""
        if self.key_owner != key_owner or self.account.lower() != email.lower():
            raise EscrowError(f"this escrow file belongs to another account ({self.account}), not {email}")
        if self.public_key != public_key:
            raise EscrowError(f"this escrow file holds an older key pair of {email}, not its current one")


@dataclass(frozen=True)
class OfficerKey:
    fingerprint: str
    uids: tuple[str, ...]
    source: Path


class RecoveryKeys:
    """The recovery officers' OpenPGP public keys, imported into
    Postvault's own GnuPG home, ready to encrypt escrow documents to."""

    def __init__(self, gpg: Any, keys: Sequence[OfficerKey]) -> None:
        self._gpg = gpg
        self.keys = tuple(keys)
        self.fingerprints = tuple(sorted({k.fingerprint for k in keys}))

    @property
    def recipients(self) -> str:
        """What an escrow row records it was made for (see models.RecoveryEscrow)."""
        return ",".join(self.fingerprints)

    @classmethod
    def load(cls, key_files: Sequence[Path], gnupg_home: Path, gpg_binary: str = "gpg") -> RecoveryKeys:
        """Import ``key_files`` (public keys only) into ``gnupg_home``;
        ``ConfigError`` naming ``[recovery] keys`` for anything unusable."""
        import gnupg  # only servers with escrow configured need it

        if not key_files:
            raise ConfigError("recovery.keys: no key files given")
        gnupg_home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(gnupg_home, 0o700)  # gpg warns about (and we want no) wider rights
        try:
            gpg = gnupg.GPG(gpgbinary=gpg_binary, gnupghome=str(gnupg_home), options=["--no-autostart"])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"recovery.keys is set but GnuPG ({gpg_binary}) cannot run: {exc}") from None
        found: list[OfficerKey] = []
        for path in key_files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"recovery.keys: {path}: cannot read: {exc.strerror}") from None
            scanned = gpg.scan_keys_mem(data)
            if any(k.get("type") == "sec" for k in scanned):
                raise ConfigError(f"recovery.keys: {path} holds a SECRET key; give the officer's public key only "
                                  "(gpg --armor --export), and keep the secret key offline")
            public = [k for k in scanned if k.get("type") == "pub"]
            if not public:
                raise ConfigError(f"recovery.keys: {path} holds no OpenPGP public key")
            result = gpg.import_keys(data)
            imported = set(result.fingerprints or ())
            for key in public:
                if key["fingerprint"] not in imported:
                    raise ConfigError(f"recovery.keys: {path}: GnuPG did not import key {key['fingerprint']}")
                found.append(OfficerKey(key["fingerprint"], tuple(key.get("uids") or ()), path))
        listed = {k["fingerprint"]: k for k in gpg.list_keys(keys=[k.fingerprint for k in found])}
        for key in found:
            info = listed.get(key.fingerprint)
            # An upper-case E: the key as a whole can encrypt now (not
            # expired, not revoked, has an encryption subkey).
            if info is None or "E" not in info.get("cap", ""):
                raise ConfigError(f"recovery.keys: {key.source}: key {key.fingerprint} cannot encrypt "
                                  "(expired, revoked, or without an encryption subkey)")
        return cls(gpg, found)

    def encrypt(self, doc: EscrowDocument) -> bytes:
        """The armored OpenPGP message of ``doc`` to every officer key."""
        result = self._gpg.encrypt(doc.to_bytes(), list(self.fingerprints), armor=True, always_trust=True)
        if not result.ok:
            # gpg's status word (e.g. "invalid recipient"), never data.
            raise EscrowError(f"OpenPGP encryption failed: {result.status or 'gpg gave no reason'}")
        return bytes(result.data)
