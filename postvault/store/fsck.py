"""``postvault fsck``: check every blob and the message index, without keys
and without reading content.

What can be checked without any password:

* the database file itself (SQLite ``PRAGMA integrity_check`` and
  ``foreign_key_check``; on PostgreSQL a note says to use ``pg_amcheck``);
* the index: UIDs are positive and below their folder's UIDNEXT (RFC 3501
  §2.3.1.1), unique per folder, copies point at folders and messages that
  exist and agree on the size, modseqs do not pass the folder's
  HIGHESTMODSEQ, messages have copies and valid blob ids, thread rows exist;
* every blob a message refers to: it exists, its layout (header, chunk
  sizes) gives exactly the plaintext size the index records, and -- unless
  ``quick`` -- its bytes still hash to its id (a blob id *is* the SHA-256 of
  the sealed bytes, ``store/blobs.py``), which catches any flipped byte;
* blobs no message refers to (orphans, e.g. after a crash between the blob
  write and the commit); ``repair`` deletes those of a blob folder that are
  older than ``orphan_age`` seconds (younger ones may belong to a delivery
  in progress), and stale temporary files likewise.

Opening the AES-GCM tags needs the content keys, hence a password; a
damaged blob is caught by its hash here and by its tag on FETCH. The audit
chain is checked by ``postvault audit verify``, not here.

Findings are public text: ids, counts, sizes, account addresses; never a
folder name, subject or any content.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import text

from ..errors import IntegrityError
from ..progress import Progress
from . import crypto
from .api import Store

_BLOB_ID = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_READ = 1024 * 1024


@dataclass(frozen=True)
class Finding:
    kind: str  # database | index | missing-blob | damaged-blob | orphan-blob | stray-file
    text: str
    repaired: bool = False

    def line(self) -> str:
        return f"{self.kind}: {self.text}" + (" (repaired)" if self.repaired else "")


@dataclass
class FsckReport:
    findings: list[Finding] = field(default_factory=list)
    messages: int = 0
    copies: int = 0
    blobs: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem is left (found ones were all repaired)."""
        return all(f.repaired for f in self.findings)

    def add(self, kind: str, text_: str, repaired: bool = False) -> None:
        self.findings.append(Finding(kind, text_, repaired))

    def summary(self) -> str:
        left = sum(not f.repaired for f in self.findings)
        fixed = len(self.findings) - left
        state = "clean" if not self.findings else f"{left} problem(s)" + (f", {fixed} repaired" if fixed else "")
        return (f"fsck: {self.messages} messages, {self.copies} copies, {self.blobs} blobs checked; {state}")


def fsck(store: Store, blob_root: Path | None, *, quick: bool = False, repair: bool = False,
         orphan_age: float = 3600.0, progress_stream: TextIO | None = None) -> FsckReport:
    """Check the store behind ``store`` (blobs in ``blob_root``, or in the
    database when None); see the module docstring."""
    report = FsckReport()
    _check_database(store, report)
    _check_index(store, report)
    _check_blobs(store, report, quick, progress_stream)
    if blob_root is not None:
        _check_blob_folder(store, blob_root, report, repair, orphan_age, progress_stream)
    # Beside a blob folder too: small messages' blobs are rows (smallblobs).
    _check_blob_table(store, report)
    return report


def _check_database(store: Store, report: FsckReport) -> None:
    if store.engine.dialect.name != "sqlite":
        # The PRAGMAs below are SQLite's. PostgreSQL enforces foreign keys
        # always (SQLite only when a connection asks), and checks its own
        # pages with its own tool.
        report.notes.append("the database's own pages are PostgreSQL's to check (pg_amcheck); "
                            "it enforces the foreign keys itself")
        return
    with store.engine.connect() as conn:
        rows = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check")]
        if rows != ["ok"]:
            for row in rows[:50]:
                report.add("database", f"SQLite integrity_check: {row}")
        for table, rowid, parent, _fk in conn.exec_driver_sql("PRAGMA foreign_key_check"):
            report.add("index", f"{table} row {rowid} refers to a missing {parent} row")


# Each query returns rows that break one rule; the lambda says which, with
# ids only.
_INDEX_RULES: list[tuple[str, Callable[[Any], str]]] = [
    (("SELECT c.id, c.uid, b.id, b.uidnext, a.email FROM message_copies c JOIN mailboxes b ON b.id = c.mailbox_id "
      "JOIN accounts a ON a.id = b.account_id WHERE c.uid < 1 OR c.uid >= b.uidnext"),
     lambda r: f"copy {r[0]} has UID {r[1]}, outside 1..UIDNEXT-1 ({r[3]}) of folder {r[2]} of {r[4]}"),
    (("SELECT mailbox_id, uid, COUNT(*) FROM message_copies GROUP BY mailbox_id, uid HAVING COUNT(*) > 1"),
     lambda r: f"UID {r[1]} is used {r[2]} times in folder {r[0]}"),
    (("SELECT c.id, c.mailbox_id FROM message_copies c LEFT JOIN mailboxes b ON b.id = c.mailbox_id "
      "WHERE b.id IS NULL"),
     lambda r: f"copy {r[0]} is in folder {r[1]}, which does not exist"),
    (("SELECT c.id, c.message_id FROM message_copies c LEFT JOIN messages m ON m.id = c.message_id "
      "WHERE m.id IS NULL"),
     lambda r: f"copy {r[0]} points at message row {r[1]}, which does not exist"),
    (("SELECT c.id, m.public_id, c.size, m.size FROM message_copies c JOIN messages m ON m.id = c.message_id "
      "WHERE c.size != m.size"),
     lambda r: f"copy {r[0]} of message {r[1]} records size {r[2]}, the message {r[3]}"),
    (("SELECT b.id, b.highestmodseq, MAX(c.modseq) FROM mailboxes b JOIN message_copies c ON c.mailbox_id = b.id "
      "GROUP BY b.id, b.highestmodseq HAVING MAX(c.modseq) > b.highestmodseq"),
     lambda r: f"folder {r[0]} has HIGHESTMODSEQ {r[1]} below a message's modseq {r[2]}"),
    (("SELECT m.public_id FROM messages m WHERE NOT EXISTS "
      "(SELECT 1 FROM message_copies c WHERE c.message_id = m.id)"),
     lambda r: f"message {r[0]} is in no folder"),
    (("SELECT m.public_id, m.thread_id FROM messages m LEFT JOIN threads t ON t.id = m.thread_id "
      "WHERE m.thread_id IS NOT NULL AND t.id IS NULL"),
     lambda r: f"message {r[0]} belongs to thread {r[1]}, which does not exist"),
    (("SELECT p.id, p.thread_id FROM thread_participants p LEFT JOIN threads t ON t.id = p.thread_id "
      "WHERE t.id IS NULL"),
     lambda r: f"thread participant row {r[0]} belongs to thread {r[1]}, which does not exist"),
]


def _check_index(store: Store, report: FsckReport) -> None:
    # One read transaction: every rule sees the same state of the index.
    with store.engine.connect() as conn, conn.begin():
        report.copies = int(conn.execute(text("SELECT COUNT(*) FROM message_copies")).scalar_one())
        for sql, describe in _INDEX_RULES:
            for row in conn.execute(text(sql)):
                report.add("index", describe(row))


def _still_there(store: Store, message_id: int) -> bool:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT 1 FROM messages WHERE id = :i"), {"i": message_id}).first() is not None


def _check_blobs(store: Store, report: FsckReport, quick: bool, progress_stream: TextIO | None) -> None:
    with store.engine.connect() as conn:
        total = int(conn.execute(text("SELECT COUNT(*) FROM messages")).scalar_one())
    last = 0
    with Progress("fsck: messages", total, unit="messages", stream=progress_stream) as progress:
        while True:
            # Pages by id: constant memory however many messages there are.
            with store.engine.connect() as conn:
                rows = conn.execute(text("SELECT id, public_id, blob_id, size FROM messages WHERE id > :last "
                                         "ORDER BY id LIMIT 1000"), {"last": last}).all()
            if not rows:
                break
            for message_id, public_id, blob_id, size in rows:
                report.messages += 1
                _check_one(store, report, message_id, public_id, blob_id, size, quick)
                progress.advance()
            last = rows[-1][0]


def _check_one(store: Store, report: FsckReport, message_id: int, public_id: str, blob_id: str, size: int,
               quick: bool) -> None:
    if not isinstance(blob_id, str) or not _BLOB_ID.fullmatch(blob_id):
        report.add("index", f"message {public_id} has a malformed blob id")
        return
    try:
        f = store.blobs.open(blob_id)
    except IntegrityError:
        # Expunged since the list was read? Then it is not a problem.
        if _still_there(store, message_id):
            report.add("missing-blob", f"blob {blob_id} of message {public_id} is missing")
        return
    report.blobs += 1
    with f:
        header = f.read(crypto.HEADER_LEN)
        length = f.seek(0, os.SEEK_END)
        try:
            plain = crypto.sealed_length(header, length)
        except IntegrityError as exc:
            report.add("damaged-blob", f"blob {blob_id} of message {public_id}: {exc}")
            return
        if plain != size:
            report.add("damaged-blob", f"blob {blob_id} of message {public_id} holds {plain} bytes, "
                                       f"the index records {size}")
            return
        if quick:
            return
        f.seek(0)
        h = hashlib.sha256()
        while chunk := f.read(_READ):
            h.update(chunk)
    if h.hexdigest() != blob_id:
        report.add("damaged-blob", f"blob {blob_id} of message {public_id}: its bytes no longer match its "
                                   "SHA-256 id (changed on disk)")


def _referenced(store: Store, blob_id: str) -> bool:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT 1 FROM messages WHERE blob_id = :b LIMIT 1"), {"b": blob_id}).first() \
            is not None


def _check_blob_folder(store: Store, root: Path, report: FsckReport, repair: bool, orphan_age: float,
                       progress_stream: TextIO | None) -> None:
    if not root.is_dir():
        report.add("stray-file", f"the blob folder {root} does not exist")
        return
    now = time.time()
    with Progress("fsck: blob folder", None, unit="files", stream=progress_stream) as progress:
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.name.startswith(_TMP_PREFIX) and entry.is_file(follow_symlinks=False):
                # A write that never committed (crash); a young one may be
                # a delivery in progress.
                old = now - entry.stat(follow_symlinks=False).st_mtime > orphan_age
                done = repair and old and _unlink(Path(entry.path))
                if old:
                    report.add("orphan-blob", f"stale temporary file {entry.name} in the blob folder", done)
                continue
            if not (entry.is_dir(follow_symlinks=False) and re.fullmatch(r"[0-9a-f]{2}", entry.name)):
                report.add("stray-file", f"unexpected entry {entry.name!r} in the blob folder")
                continue
            for blob in sorted(os.scandir(entry.path), key=lambda e: e.name):
                progress.advance()
                blob_id = entry.name + blob.name
                if not (_BLOB_ID.fullmatch(blob_id) and blob.is_file(follow_symlinks=False)):
                    report.add("stray-file", f"unexpected entry {entry.name}/{blob.name!r} in the blob folder")
                    continue
                if _referenced(store, blob_id):
                    continue
                st = blob.stat(follow_symlinks=False)
                old = now - st.st_mtime > orphan_age
                # Re-checked right before deleting: a delivery may have
                # committed its row since.
                done = repair and old and not _referenced(store, blob_id) and _unlink(Path(blob.path))
                report.add("orphan-blob", f"blob {blob_id} ({st.st_size} bytes) is referred to by no message"
                           + ("" if old or not repair else "; kept, younger than an hour"), done)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return True


def _check_blob_table(store: Store, report: FsckReport) -> None:
    with store.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT blob_id, COUNT(*), SUM(LENGTH(data)) FROM blob_chunks WHERE blob_id NOT IN "
            "(SELECT blob_id FROM messages) GROUP BY blob_id ORDER BY blob_id")).all()
    for blob_id, parts, size in rows:
        report.add("orphan-blob", f"blob {blob_id} ({size} bytes in {parts} rows) is referred to by no message; "
                                  "kept (the database records no age for it)")


@dataclass
class SweepResult:
    """What ``sweep_leftovers`` removed (counts only)."""

    blobs: int = 0
    temp_files: int = 0
    table_blobs: int = 0


def sweep_table_leftovers(store: Store) -> int:
    """Blobs in the database table that no message refers to, deleted; how
    many. Only while nothing else writes: a delivery commits its blob rows
    before its message row, and those rows carry no age."""
    with store.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(text(
            "SELECT DISTINCT blob_id FROM blob_chunks WHERE blob_id NOT IN (SELECT blob_id FROM messages)"))]
        if ids:
            conn.execute(text("DELETE FROM blob_chunks WHERE blob_id NOT IN (SELECT blob_id FROM messages)"))
    return len(ids)


def sweep_leftovers(store: Store, root: Path, before: float, stop: Callable[[], bool] = lambda: False) \
        -> SweepResult:
    """What a killed writer left in the blob folder ``root``, deleted:
    temporary files, and blobs no message refers to (written, but the
    process died before the message row committed). Only entries last
    changed before ``before`` (a ``time.time()``): a newer one may belong to
    a delivery in progress. ``stop`` is asked between fan-out folders.

    One indexed range query per fan-out folder, not one per blob, so a
    large store costs a directory walk; the reference is checked again
    right before each delete. (Content addressing cannot make a new message
    reuse an orphan: every message is sealed under a fresh random key.)
    """
    result = SweepResult()
    if not root.is_dir():
        return result
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if stop():
            break
        if entry.name.startswith(_TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            if entry.stat(follow_symlinks=False).st_mtime < before and _unlink(Path(entry.path)):
                result.temp_files += 1
            continue
        if not (entry.is_dir(follow_symlinks=False) and re.fullmatch(r"[0-9a-f]{2}", entry.name)):
            continue
        names = [b for b in os.scandir(entry.path)
                 if _BLOB_ID.fullmatch(entry.name + b.name) and b.is_file(follow_symlinks=False)]
        if not names:
            continue
        lo, hi = entry.name, f"{int(entry.name, 16) + 1:02x}" if entry.name != "ff" else "g"
        with store.engine.connect() as conn:
            used = set(conn.execute(text("SELECT blob_id FROM messages WHERE blob_id >= :lo AND blob_id < :hi"),
                                    {"lo": lo, "hi": hi}).scalars())
        for blob in names:
            blob_id = entry.name + blob.name
            if blob_id in used or blob.stat(follow_symlinks=False).st_mtime >= before:
                continue
            if not _referenced(store, blob_id) and _unlink(Path(blob.path)):
                result.blobs += 1
    return result
