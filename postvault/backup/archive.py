"""The backup file format: a POSIX (pax) tar stream, optionally wrapped in
OpenPGP, whose members are, in this order::

    home/<path>        every file of the home folder except the live
                       database and the blob folder (config, certificates,
                       keys, anything else the admin keeps there)
    blobs/<blob id>    each sealed blob the database snapshot refers to,
                       when blobs are kept in a folder (already ciphertext)
    db/postvault.db    the database, copied with SQLite's backup API
    MANIFEST.json      format, version, counts, and the SHA-256 and size of
                       every member but the blobs

A blob's name is the SHA-256 of its bytes (``store.blobs``), so blobs need
no manifest entry: a restore checks each against its name, and then that
every blob the database refers to arrived. The manifest comes last because
it is only known at the end, and a stream cannot go back.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from ..errors import BackupError

FORMAT = "postvault-backup"
VERSION = 1
HOME = "home/"
BLOBS = "blobs/"
DB = "db/postvault.db"
MANIFEST = "MANIFEST.json"
MAX_MANIFEST = 16 * 1024 * 1024
BLOB_ID = re.compile(r"[0-9a-f]{64}")


class HashingReader:
    """Reads from ``src`` while hashing (SHA-256) and counting the bytes."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data


@dataclass
class Manifest:
    """What a backup holds; JSON, no content (counts, hashes, store layout)."""

    created_at: str = ""
    hostname: str = ""
    # Where the store was, relative to the home folder when it was inside it.
    db_path: str = ""
    blobs: str = "database"  # or the blob folder, relative when inside the home
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    # Blobs the snapshot refers to that the live store did not have, and
    # blobs whose bytes no longer matched their name: copied as found.
    missing_blobs: list[str] = field(default_factory=list)
    damaged_blobs: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, **self.__dict__}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except ValueError:
            raise BackupError("the backup's manifest is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BackupError("this file is not a Postvault backup")
        if doc.get("version") != VERSION:
            raise BackupError(f"backup format version {doc.get('version')!r} is not supported (expected {VERSION})")
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        return cls(**known)


def member_info(name: str, size: int, mtime: float | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(mtime if mtime is not None else time.time())
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def home_relpath(name: str) -> PurePosixPath:
    """The relative path of a ``home/`` member, refusing anything that could
    land outside the target folder (absolute, ``..``, empty parts)."""
    rel = PurePosixPath(name[len(HOME):])
    if not rel.parts or rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts) or "\\" in name:
        raise BackupError(f"the backup holds an unsafe path {name!r}; refusing to restore it")
    return rel
