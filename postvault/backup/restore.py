"""``postvault restore``: rebuild a home folder from a backup file.

The target must be new or empty. Members are streamed out of the archive
(through gpg when the file is OpenPGP) and hashed as they are written; the
database and blobs go to a staging folder first. Only when the manifest at
the end has matched every member (and every blob its name) are the
database and blobs moved to where the restored config says they live. Then
the schema is upgraded, every blob the database refers to is checked to be
present, blobs left over from a backup's extra rounds (``make.py``) are
dropped, and the restore is recorded in the restored audit log. On any
failure the target is left as empty as it was found.

Passwords need nothing special: accounts, their wrapped keys and KDF
parameters are rows of the database, so the same passwords open the same
mail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from ..conf.load import load_config
from ..errors import BackupError
from ..home import open_store
from ..progress import Progress
from ..store.blobs import FileBlobStore
from . import archive
from .archive import BLOB_ID, Manifest, home_relpath
from .make import sqlite_file
from .openpgp import decrypting_source, looks_encrypted

STAGING = ".postvault-restore"
_BUFFER = 64 * 1024


@dataclass
class RestoreResult:
    home: Path
    manifest: Manifest
    encrypted: bool
    blobs: int
    dropped: int


def restore_backup(src: Path, home: Path, *, gnupg_home: Path | None = None,
                   progress_stream: TextIO | None = None) -> RestoreResult:
    home = home.absolute()
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise BackupError(f"{home} already exists and is not empty; restore into a new or empty folder")
    if not src.is_file():
        raise BackupError(f"{src}: no such backup file")
    created = not home.exists()
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(home, 0o700)
    except OSError as exc:
        raise BackupError(f"cannot create {home}: {exc.strerror}") from None
    placed: list[Path] = []
    try:
        with open(src, "rb") as f:
            encrypted = looks_encrypted(f.read(512))
            f.seek(0)
            if encrypted:
                with decrypting_source(f, gnupg_home) as plain:
                    manifest, blobs = _extract(plain, home, progress_stream)
            else:
                manifest, blobs = _extract(f, home, progress_stream)
        dropped = _install(home, manifest, placed)
    except OSError as exc:
        _undo(home, created, placed)
        raise BackupError(f"restore failed: {exc.strerror or exc}"
                          + (f" ({exc.filename})" if exc.filename else "")) from None
    except BaseException:
        _undo(home, created, placed)
        raise
    return RestoreResult(home, manifest, encrypted, blobs, dropped)


def _undo(home: Path, created: bool, placed: list[Path]) -> None:
    """Leave the target as empty as it was found."""
    for path in placed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if created:
        shutil.rmtree(home, ignore_errors=True)
    else:
        for child in home.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _mkdirs(path: Path, top: Path) -> None:
    missing = []
    p = path
    while p != top and not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700)


def _write_member(src: BinaryIO, dest: Path, top: Path) -> tuple[str, int]:
    _mkdirs(dest.parent, top)
    h = hashlib.sha256()
    size = 0
    # O_EXCL and O_NOFOLLOW: a member never overwrites or follows anything.
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_BUFFER):
            h.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return h.hexdigest(), size


def _extract(stream: BinaryIO, home: Path, progress_stream: TextIO | None) -> tuple[Manifest, int]:
    staging = home / STAGING
    staging.mkdir(mode=0o700)
    seen: dict[str, tuple[str, int]] = {}
    bad_blobs: list[str] = []
    blobs = 0
    manifest: Manifest | None = None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=_BUFFER)
    except tarfile.TarError:
        raise BackupError("this file is not a Postvault backup (neither a tar archive nor OpenPGP)") from None
    with tar, Progress("restore", None, unit="files", stream=progress_stream) as progress:
        try:
            for info in tar:
                name = info.name
                if manifest is not None:
                    raise BackupError("the backup has members after its manifest; refusing it")
                if not info.isreg():
                    raise BackupError(f"the backup holds {name!r}, which is not a regular file; refusing it")
                reader = tar.extractfile(info)
                assert reader is not None
                if name == archive.MANIFEST:
                    if info.size > archive.MAX_MANIFEST:
                        raise BackupError("the backup's manifest is implausibly large")
                    manifest = Manifest.from_json(reader.read())
                    continue
                blob_id = None
                if name.startswith(archive.HOME):
                    dest, top = home / home_relpath(name), home
                elif name.startswith(archive.BLOBS):
                    blob_id = name[len(archive.BLOBS):]
                    if not BLOB_ID.fullmatch(blob_id):
                        raise BackupError(f"the backup holds a blob with a malformed name {name!r}")
                    dest, top = staging / "blobs" / blob_id[:2] / blob_id[2:], staging
                elif name == archive.DB:
                    dest, top = staging / "postvault.db", staging
                else:
                    raise BackupError(f"the backup holds an unexpected member {name!r}; refusing it")
                if name in seen or dest.exists():
                    raise BackupError(f"the backup holds {name!r} twice; refusing it")
                digest, size = _write_member(reader, dest, top)  # type: ignore[arg-type]
                if blob_id is not None:
                    blobs += 1
                    if digest != blob_id:
                        bad_blobs.append(blob_id)
                else:
                    seen[name] = (digest, size)
                progress.advance()
        except (tarfile.TarError, EOFError) as exc:
            raise BackupError(f"the backup is damaged or truncated ({exc})") from None
    if manifest is None:
        raise BackupError("the backup ends before its manifest: it is truncated")
    expected = set(manifest.members)
    if expected != set(seen):
        lacking = sorted(expected - set(seen))
        raise BackupError(f"the backup lacks {len(lacking)} file(s) its manifest lists, e.g. {lacking[:1]}"
                          if lacking else "the backup holds files its manifest does not list")
    for name, (digest, size) in seen.items():
        want = manifest.members[name]
        if want.get("sha256") != digest or want.get("size") != size:
            raise BackupError(f"{name} in the backup is damaged: its SHA-256 differs from the manifest")
    unexplained = [b for b in bad_blobs if b not in manifest.damaged_blobs]
    if unexplained:
        raise BackupError(f"blob {unexplained[0]} in the backup is damaged: its SHA-256 differs from its name")
    if archive.DB not in seen:
        raise BackupError("the backup has no database")
    return manifest, blobs


def _install(home: Path, manifest: Manifest, placed: list[Path]) -> int:
    """Move the staged database and blobs where the restored config wants
    them; check the result; returns how many leftover blobs were dropped."""
    staging = home / STAGING
    config = load_config(home)
    db_path = sqlite_file(config.store.url)
    for p in (db_path, db_path.with_name(db_path.name + "-wal")):
        if p.exists():
            raise BackupError(f"{p} exists already (the restored config keeps the database there); "
                              "move it away or edit [store] url")
    _mkdirs(db_path.parent, Path(db_path.anchor))
    shutil.move(staging / "postvault.db", db_path)
    if not db_path.is_relative_to(home):
        placed.append(db_path)
    staged_blobs = staging / "blobs"
    blob_root = config.store.blobs
    if blob_root is None:
        if staged_blobs.exists():
            raise BackupError('the backup holds a blob folder but the restored config says blobs = "database"')
    else:
        if blob_root.exists() and any(blob_root.iterdir()):
            raise BackupError(f"{blob_root} is not empty (the restored config keeps the blobs there)")
        if blob_root.exists():
            blob_root.rmdir()
        _mkdirs(blob_root.parent, Path(blob_root.anchor))
        if staged_blobs.exists():
            shutil.move(staged_blobs, blob_root)
        else:
            blob_root.mkdir(mode=0o700)
        if not blob_root.is_relative_to(home):
            placed.append(blob_root)
    staging.rmdir()
    store = open_store(config)  # brings an older backup's schema up to date
    try:
        dropped = _check_blobs(db_path, blob_root, manifest)
        store.record_event("admin.restore", actor="admin", protocol="cli",
                           detail=f"backup_created={manifest.created_at} messages={manifest.counts.get('messages', 0)}")
    finally:
        store.close()
    # One sync for the whole restore rather than an fsync per file.
    os.sync()
    return dropped


def _check_blobs(db_path: Path, blob_root: Path | None, manifest: Manifest) -> int:
    if blob_root is None:
        return 0
    blobs = FileBlobStore(blob_root)
    con = sqlite3.connect(db_path)
    try:
        known_missing = set(manifest.missing_blobs)
        # Blobs kept in the blob table (store/smallblobs.py) came with the database.
        for blob_id, public_id in con.execute("SELECT blob_id, public_id FROM messages WHERE blob_id NOT IN "
                                              "(SELECT blob_id FROM blob_chunks) ORDER BY id"):
            if not blobs.exists(blob_id) and blob_id not in known_missing:
                raise BackupError(f"the backup lacks blob {blob_id} of message {public_id}")
        dropped = 0
        for fan in sorted(p for p in blob_root.iterdir() if p.is_dir()):
            for f in sorted(fan.iterdir()):
                blob_id = fan.name + f.name
                if not con.execute("SELECT 1 FROM messages WHERE blob_id = ? LIMIT 1", (blob_id,)).fetchone():
                    # Copied in an earlier round of the backup, then expunged.
                    blobs.delete(blob_id)
                    dropped += 1
        return dropped
    finally:
        con.close()
