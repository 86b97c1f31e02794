"""Content-addressed storage of sealed blobs in a plain folder.

A blob's id is the SHA-256 of its bytes (always ciphertext: callers write the
output of ``postvault.store.crypto.seal_stream``), stored as
``root/ab/cdef...`` with the first two hex digits as a fan-out folder so that
no single directory grows to millions of entries.

Writes are atomic and durable: bytes go to a temporary file inside ``root``
(the same file system, so the final rename is atomic), which is fsynced,
renamed into place, and then the directory entries are fsynced.  A reader
therefore sees either no blob or the whole blob, and a blob whose id has been
returned survives a crash; only then may the caller acknowledge the message.

Ids are validated (64 lower-case hex digits) before they are turned into
paths, so an id read from a damaged database row cannot reach outside
``root``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import weakref
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from postvault.errors import IntegrityError

__all__ = ["FileBlobStore", "BlobWriter"]

_BLOB_ID = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX needs the dir fsynced)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FileBlobStore:
    """A folder of content-addressed sealed blobs, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # Fan-out folders whose entry in root is known durable (see
        # BlobWriter.commit); a set's add and membership test are atomic.
        self._durable_fans: set[str] = set()
        if not self.root.is_dir():
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; set it explicitly so a
            # permissive umask cannot expose the folder to other users.
            os.chmod(self.root, _DIR_MODE)

    def _path(self, blob_id: str) -> Path:
        # fullmatch, not match: "$" would accept a trailing newline.
        if not isinstance(blob_id, str) or not _BLOB_ID.fullmatch(blob_id):
            raise IntegrityError("blob id is not a valid identifier")
        return self.root / blob_id[:2] / blob_id[2:]

    def writer(self) -> BlobWriter:
        """A new writer; use it as a context manager and call ``commit()``."""
        return BlobWriter(self)

    def open(self, blob_id: str) -> BinaryIO:
        """Open a blob for reading (seekable); ``IntegrityError`` if it is missing."""
        path = self._path(blob_id)
        try:
            # O_NOFOLLOW: a symlink planted in the store is never followed.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise IntegrityError("blob is missing from the store") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IntegrityError("blob is not a regular file") from None
            raise
        return os.fdopen(fd, "rb")

    def exists(self, blob_id: str) -> bool:
        """Whether the blob is stored."""
        try:
            return stat.S_ISREG(os.lstat(self._path(blob_id)).st_mode)
        except FileNotFoundError:
            return False

    def delete(self, blob_id: str) -> None:
        """Remove a blob; deleting a missing blob is not an error."""
        path = self._path(blob_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        # Make the removal durable too: a deleted message must not come back
        # after a crash.
        _fsync_dir(path.parent)


class BlobWriter:
    """A write-only file that becomes a blob on ``commit()``.

    ``write`` hashes (SHA-256) and writes to a temporary file in the store's
    root.  Leaving the ``with`` block without ``commit()`` (including by an
    exception) removes the temporary file.
    """

    def __init__(self, store: FileBlobStore) -> None:
        self._store = store
        # As tempfile.mkstemp (mode 0600, O_EXCL, a random name), without
        # its per-call name generator and path handling: one blob per message.
        while True:
            self._tmp_path = os.path.join(store.root, f"{_TMP_PREFIX}{secrets.token_hex(8)}.blob")
            try:
                fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # 64 random bits: practically never
                continue
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._blob_id: str | None = None
        self._done = False
        # If a writer is dropped without commit or a with block, still remove
        # its temp file when it is garbage collected.
        self._finalizer = weakref.finalize(
            self, BlobWriter._cleanup, self._file, self._tmp_path
        )

    @staticmethod
    def _cleanup(file: BinaryIO, tmp_path: str) -> None:
        try:
            file.close()
        finally:
            _remove_quietly(tmp_path)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._done

    def tell(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write and hash ``data``; return its length."""
        if self._done:
            raise ValueError("blob writer is already committed or aborted")
        view = memoryview(data).cast("B")
        self._file.write(view)
        self._hash.update(view)
        self._size += len(view)
        return len(view)

    def flush(self) -> None:
        # Durability comes from commit(); nothing to do per write.
        pass

    def commit(self) -> str:
        """Make the blob durable under its SHA-256 id and return that id."""
        if self._blob_id is not None:
            return self._blob_id
        if self._done:
            raise ValueError("blob writer was aborted")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        blob_id = self._hash.hexdigest()
        final = self._store._path(blob_id)
        fan_dir = final.parent
        try:
            try:
                fan_dir.mkdir(mode=_DIR_MODE)
            except FileExistsError:
                pass
            if _same_blob_exists(final, self._size):
                # Content addressing: identical bytes are already durable.
                _remove_quietly(self._tmp_path)
            else:
                os.replace(self._tmp_path, final)
                _fsync_dir(fan_dir)
            # Not only when this writer made fan_dir: a concurrent writer
            # (or an earlier process, killed before its fsync) may have made
            # it and not yet fsynced root, and our blob is only durable once
            # fan_dir's own entry is. But once one root fsync has completed
            # after fan_dir existed, its entry is on disk for good: at most
            # one per fan-out folder per process, not one per blob. (The
            # temp file's old entry in root may then come back after a
            # crash, like any temp file a crash interrupts: inert garbage.)
            if fan_dir.name not in self._store._durable_fans:
                _fsync_dir(self._store.root)
                self._store._durable_fans.add(fan_dir.name)
        except BaseException:
            self._abort()
            raise
        self._done = True
        self._finalizer.detach()
        self._blob_id = blob_id
        return blob_id

    def _abort(self) -> None:
        self._done = True
        self._finalizer()

    def abort(self) -> None:
        """Discard what was written (no-op after a commit)."""
        if self._blob_id is None:
            self._abort()

    def close(self) -> None:
        """Same as ``abort()`` unless committed: closing never publishes a blob."""
        self.abort()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def _same_blob_exists(path: Path, size: int) -> bool:
    """Whether ``path`` already holds a blob of this size.

    Same name means same SHA-256, so same bytes; the size check only guards
    against a file damaged outside Postvault, which is then replaced.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size
