"""The audit log's signing key and the signed form of a checkpoint.

The Ed25519 key pair that signs audit checkpoints (``store.auditlog``) lives
in files in the home folder, never in the database::

    DIR/certs/audit-signing.key   private key, PKCS#8 PEM, mode 0600
    DIR/certs/audit-signing.pub   public key, PEM (give a copy to your auditor)
    DIR/certs/audit-head.json     the newest checkpoint, as signed

``audit-head.json`` is a copy of the newest checkpoint outside the database,
so that deleting the newest checkpoints from the database (to rewrite what
they covered) shows. The signed bytes are a fixed prefix and canonical JSON
(sorted keys, no spaces), the same construction the event hashes use.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import HomeError
from .blobs import _fsync_dir

KEY_FILE = Path("certs/audit-signing.key")
PUB_FILE = Path("certs/audit-signing.pub")
HEAD_FILE = Path("certs/audit-head.json")
# Domain separation: these bytes can never be mistaken for anything else we sign.
PREFIX = b"postvault audit checkpoint v1\n"


def utc_iso(at: datetime) -> str:
    """``at`` as the ISO text that was hashed or signed when it was written
    (SQLite returns naive UTC datetimes, PostgreSQL aware ones)."""
    at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
    return at.isoformat()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def checkpoint_fields(seq: int, at: datetime, kind: str, event_id: int, event_hash: bytes,
                      prev_sig_hash: bytes, key: str) -> dict[str, Any]:
    """What a checkpoint signature covers, as plain JSON values."""
    return {"v": 1, "seq": seq, "at": utc_iso(at), "kind": kind, "event_id": event_id,
            "event_hash": event_hash.hex(), "prev": prev_sig_hash.hex(), "key": key}


def signed_bytes(fields: dict[str, Any]) -> bytes:
    body = {k: fields[k] for k in ("v", "seq", "at", "kind", "event_id", "event_hash", "prev", "key")}
    return PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signature_ok(public: Ed25519PublicKey, fields: dict[str, Any], signature: bytes) -> bool:
    try:
        public.verify(signature, signed_bytes(fields))
    except InvalidSignature:
        return False
    return True


def _write_new(path: Path, data: bytes) -> bool:
    """Write ``path`` (0600) only if it does not exist; False if it did.
    Through a temporary file and a hard link, so a crash never leaves half a
    key and two processes making the key at once agree on one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def ensure_signing_key(home: Path) -> Ed25519PrivateKey:
    """The home's signing key, made on first need (``postvault init``, and
    the first ``serve`` or ``audit`` command in a home made before it)."""
    path = home / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = Ed25519PrivateKey.generate()
        _write_new(path, fresh.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    private = load_signing_key(home)
    assert private is not None
    pub = home / PUB_FILE
    if not pub.exists():
        _write_new(pub, public_pem(private.public_key()))
    return private


def load_signing_key(home: Path) -> Ed25519PrivateKey | None:
    path = home / KEY_FILE
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise HomeError(f"{path} is not a readable Ed25519 private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise HomeError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(home: Path, path: Path | None = None) -> Ed25519PublicKey | None:
    """The public key from ``path`` (default: the home's audit-signing.pub)."""
    path = path or home / PUB_FILE
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise HomeError(f"{path} is not a readable Ed25519 public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise HomeError(f"{path} is not an Ed25519 public key")
    return key


def read_head(home: Path) -> dict[str, Any] | None:
    path = home / HEAD_FILE
    try:
        return parse_checkpoint_line(path.read_text("utf-8"), str(path))
    except FileNotFoundError:
        return None


def parse_checkpoint_line(text: str, where: str) -> dict[str, Any]:
    """One checkpoint as ``write_head`` and ``audit checkpoint`` print it."""
    try:
        data = json.loads(text)
        fields = {"v": int(data["v"]), "seq": int(data["seq"]), "at": str(data["at"]), "kind": str(data["kind"]),
                  "event_id": int(data["event_id"]), "event_hash": str(data["event_hash"]),
                  "prev": str(data["prev"]), "key": str(data["key"]),
                  "signature": bytes.fromhex(str(data["signature"]))}
    except (ValueError, KeyError, TypeError) as exc:
        raise HomeError(f"{where}: not a Postvault audit checkpoint") from exc
    return fields


def checkpoint_line(fields: dict[str, Any], signature: bytes) -> str:
    return json.dumps({**fields, "signature": signature.hex()}, sort_keys=True, separators=(",", ":"))


def write_head(home: Path, fields: dict[str, Any], signature: bytes) -> None:
    """Replace audit-head.json with this checkpoint unless it already names a
    newer one (two processes may write checkpoints).

    Written whole or not at all: a temporary file, fsynced, renamed over the
    old one, then the folder fsynced (the rename itself must survive a power
    cut). A process killed before the rename leaves only its temporary file,
    which verification never reads; the next write removes such files once
    they are older than ``STALE_TMP_SECONDS`` (a younger one may be another
    process's write in progress)."""
    path = home / HEAD_FILE
    _remove_stale_temps(path)
    current = None
    try:
        current = read_head(home)
    except HomeError:
        pass  # a damaged head file is replaced; verify reports it before that
    if current is not None and current["seq"] >= fields["seq"]:
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(checkpoint_line(fields, signature) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


STALE_TMP_SECONDS = 60.0


def _remove_stale_temps(path: Path) -> None:
    """Temporary head files left by a killed writer (see ``write_head``)."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except FileNotFoundError:
            pass  # another writer finished or removed it

