"""``postvault backup``: a consistent snapshot of a home folder while the
server runs.

Consistency rests on two store invariants (``store/api.py``): a blob is
written and fsynced before the row that refers to it commits, and a blob is
never changed after it is written. So:

1. The database is copied with SQLite's online backup API in one step: one
   read transaction, a consistent snapshot, and (WAL) writers carry on.
2. Every blob that snapshot refers to is then copied. Blobs written later
   are not referred to, so they are not needed.
3. The one hazard is EXPUNGE: it commits, then deletes the blob file, so a
   blob the snapshot still refers to can vanish before it is copied. Then a
   newer snapshot is taken and the blobs it adds are copied; a vanished
   blob the newer snapshot still refers to is really missing from the store
   (recorded in the manifest, reported). After ``MAX_ROUNDS`` the backup
   fails rather than loop forever.

The archive (``archive.py``) streams to a temporary file beside ``--out``,
optionally through gpg, and is renamed into place only when complete:
memory stays constant and a half-written backup never has the final name.
The backup holds sealed blobs and a database without plaintext content;
encryption to an OpenPGP key also hides account metadata.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, TextIO

from sqlalchemy.engine import make_url

from ..conf.load import load_config
from ..conf.schema import Config
from ..errors import BackupError, IntegrityError
from ..home import open_store
from ..progress import Progress
from ..store.blobs import FileBlobStore, _fsync_dir
from ..store.db import WRITE_LOCK_SUFFIX
from . import archive
from .archive import HashingReader, Manifest, member_info
from .openpgp import encrypting_sink

MAX_ROUNDS = 5
_PARTIAL = re.compile(r"\..+\.partial-[0-9a-f]{8}")
_TAR_BUFFER = 64 * 1024


@dataclass
class BackupResult:
    path: Path
    manifest: Manifest
    encrypted: bool
    notes: list[str] = field(default_factory=list)


def sqlite_file(url: str) -> Path:
    """The database file of a SQLite store URL; ``BackupError`` otherwise."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        # One line that says what to do instead (docs/scaling.md, PostgreSQL).
        raise BackupError("postvault backup copies SQLite stores; back up a PostgreSQL store with pg_dump "
                          "(it holds the blobs too when blobs = \"database\"), and the home folder beside it")
    return Path(parsed.database)


def _relative(path: Path, home: Path) -> str:
    try:
        return path.relative_to(home).as_posix()
    except ValueError:
        return str(path)


def make_backup(home: Path, out: Path, *, encrypt_to: str | None = None, gnupg_home: Path | None = None,
                progress_stream: TextIO | None = None) -> BackupResult:
    """Write a backup of ``home`` to ``out`` (replaced atomically if it exists)."""
    home = home.absolute()
    config = load_config(home)
    db_path = sqlite_file(config.store.url)
    if not db_path.is_file():
        raise BackupError(f"{db_path}: no database here; is the home folder initialised?")
    out = out.absolute()
    if not out.parent.is_dir():
        raise BackupError(f"--out: folder {out.parent} does not exist")
    blob_root = config.store.blobs
    if blob_root is not None and out.is_relative_to(blob_root):
        raise BackupError("--out: the backup must not be written inside the blob folder")
    tmp_out = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    # Snapshots sit beside the live database: same protection, same disk.
    work = Path(tempfile.mkdtemp(prefix=".postvault-backup-", dir=db_path.parent))
    result = BackupResult(out, Manifest(), encrypt_to is not None)
    try:
        try:
            fd = os.open(tmp_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise BackupError(f"--out: cannot write in {out.parent}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            if encrypt_to is not None:
                with encrypting_sink(f, encrypt_to, gnupg_home) as sink:
                    _write_archive(sink, home, config, db_path, work, {out, tmp_out}, result, progress_stream)
            else:
                _write_archive(f, home, config, db_path, work, {out, tmp_out}, result, progress_stream)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_out, out)
        _fsync_dir(out.parent)
    except BaseException:
        tmp_out.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = result.manifest
    store = open_store(config)
    try:
        store.record_event("admin.backup", actor="admin", protocol="cli",
                           detail=f"messages={m.counts.get('messages', 0)} blobs={m.counts.get('blobs', 0)} "
                                  f"encrypted={'yes' if result.encrypted else 'no'}")
    finally:
        store.close()
    return result


def _write_archive(sink: BinaryIO, home: Path, config: Config, db_path: Path, work: Path, outputs: set[Path],
                   result: BackupResult, progress_stream: TextIO | None) -> None:
    blob_root = config.store.blobs
    m = result.manifest
    m.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    m.hostname = config.hostname
    m.db_path = _relative(db_path, home)
    m.blobs = "database" if blob_root is None else _relative(blob_root, home)
    for key in ("cert", "key"):
        path = getattr(config.tls, key)
        if not path.is_relative_to(home):
            result.notes.append(f"tls.{key} is outside the home folder ({path}); back it up separately")
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_TAR_BUFFER) as tar:
        beside_db = ("-wal", "-shm", "-journal", WRITE_LOCK_SUFFIX)
        skip_files = {db_path, *(db_path.with_name(db_path.name + s) for s in beside_db), *outputs}
        skip_dirs = {work, *([blob_root] if blob_root is not None else [])}
        files = 0
        for path, rel in _home_files(home, skip_files, skip_dirs, result):
            _add_file(tar, path, archive.HOME + rel, m)
            files += 1
        snapshot = _snapshot_and_blobs(tar, db_path, blob_root, work, m, progress_stream)
        _add_file(tar, snapshot, archive.DB, m)
        con = sqlite3.connect(snapshot)
        try:
            for table, key in (("accounts", "accounts"), ("messages", "messages"), ("message_copies", "copies")):
                m.counts[key] = int(con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        finally:
            con.close()
        m.counts["files"] = files
        data = m.to_json()
        tar.addfile(member_info(archive.MANIFEST, len(data)), io.BytesIO(data))


def _home_files(home: Path, skip_files: set[Path], skip_dirs: set[Path],
                result: BackupResult) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(home):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            p = here / d
            if p in skip_dirs or d.startswith((".postvault-backup-", ".postvault-restore-")):
                continue
            if p.is_symlink():
                skipped += 1
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = here / name
            if p in skip_files or _PARTIAL.fullmatch(name):
                continue  # the live database, this backup, others' partial outputs
            if not p.is_file():  # sockets, fifos, dangling links
                skipped += 1
                continue
            found.append((p, p.relative_to(home).as_posix()))
    if skipped:
        result.notes.append(f"skipped {skipped} entries of the home folder that are not regular files or folders")
    return found


def _add_file(tar: tarfile.TarFile, path: Path, name: str, m: Manifest) -> None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            h = HashingReader(f)
            tar.addfile(member_info(name, st.st_size, st.st_mtime), h)  # type: ignore[arg-type]
    except PermissionError:
        raise BackupError(f"{path}: permission denied; run the backup as the user that runs Postvault") from None
    except OSError as exc:
        # tarfile raises when a file shrinks under it (a log rotated).
        raise BackupError(f"{path} changed or could not be read while it was copied ({exc}); try again") from None
    m.members[name] = {"sha256": h.sha256.hexdigest(), "size": h.size}


def _snapshot(db_path: Path, dest: Path) -> None:
    src = sqlite3.connect(db_path, timeout=30)
    dst = sqlite3.connect(dest)
    try:
        # pages=-1: the whole database in one step, under one read
        # transaction, so the copy is one consistent state; under WAL the
        # server's writers are not blocked meanwhile.
        src.backup(dst, pages=-1)
        # A self-contained file: no -wal beside it in the archive.
        dst.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error as exc:
        raise BackupError(f"could not copy the database: {exc}") from None
    finally:
        dst.close()
        src.close()


def _snapshot_and_blobs(tar: tarfile.TarFile, db_path: Path, blob_root: Path | None, work: Path, m: Manifest,
                        progress_stream: TextIO | None) -> Path:
    """Snapshot the database and copy the blobs it refers to; returns the
    snapshot that went with the copied blobs (see the module docstring)."""
    blobs = FileBlobStore(blob_root) if blob_root is not None else None
    previous: Path | None = None
    vanished: list[str] = []
    copied = 0
    for round_no in range(1, MAX_ROUNDS + 1):
        snapshot = work / f"snapshot-{round_no}.db"
        _snapshot(db_path, snapshot)
        if blobs is None:
            return snapshot
        con = sqlite3.connect(snapshot)
        try:
            # Blobs kept in the blob table (store/smallblobs.py) are in the
            # snapshot already; only files are copied.
            in_files = "blob_id NOT IN (SELECT blob_id FROM blob_chunks)"
            if previous is None:
                new_ids = f"SELECT DISTINCT blob_id FROM messages WHERE {in_files}"
            else:
                con.execute("ATTACH DATABASE ? AS prev", (str(previous),))
                new_ids = (f"SELECT DISTINCT blob_id FROM messages WHERE {in_files} AND blob_id NOT IN "
                           "(SELECT blob_id FROM prev.messages)")
            total = int(con.execute(f"SELECT COUNT(*) FROM ({new_ids})").fetchone()[0])
            # A blob that vanished last round and is still referred to by
            # this newer snapshot was not expunged: it is missing.
            still = [b for b in vanished
                     if con.execute("SELECT 1 FROM messages WHERE blob_id = ? LIMIT 1", (b,)).fetchone()]
            label = "backup: blobs" if previous is None else f"backup: blobs (round {round_no})"
            with Progress(label, total + len(still), unit="blobs", stream=progress_stream) as progress:
                for blob_id in still:
                    if _copy_blob(tar, blobs, blob_id, m):
                        copied += 1
                    elif blob_id not in m.missing_blobs:
                        m.missing_blobs.append(blob_id)
                    progress.advance()
                vanished = []
                for (blob_id,) in con.execute(new_ids + " ORDER BY blob_id"):
                    if _copy_blob(tar, blobs, blob_id, m):
                        copied += 1
                    else:
                        vanished.append(blob_id)
                    progress.advance()
        finally:
            con.close()
        if previous is not None:
            previous.unlink()
        if not vanished:
            m.counts["blobs"] = copied
            return snapshot
        previous = snapshot
    raise BackupError(f"the store kept deleting blobs faster than the backup could copy them ({MAX_ROUNDS} rounds); "
                      "try again at a quieter time")


def _copy_blob(tar: tarfile.TarFile, blobs: FileBlobStore, blob_id: str, m: Manifest) -> bool:
    """Copy one blob as it is; False if it is not in the store."""
    try:
        f = blobs.open(blob_id)
    except IntegrityError:
        return False
    with f:
        st = os.fstat(f.fileno())
        h = HashingReader(f)
        tar.addfile(member_info(archive.BLOBS + blob_id, st.st_size, st.st_mtime), h)  # type: ignore[arg-type]
    if h.sha256.hexdigest() != blob_id:
        # Copied as found (a restore keeps the store as it was); fsck and
        # FETCH will name the message.
        m.damaged_blobs.append(blob_id)
    return True
