"""Sealed blobs kept in the database (``[store] blobs = "database"``), so
that database replication and backups carry the whole store.

Same contract as ``blobs.FileBlobStore``: content-addressed by SHA-256 of
the sealed bytes, written only when complete, readable as a seekable file.
Rows are fixed-size slices, so a seek touches only the rows it needs.
"""

from __future__ import annotations

import hashlib
import io
import re
from types import TracebackType
from typing import BinaryIO

from sqlalchemy import Engine, bindparam, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from ..errors import IntegrityError
from . import fastread
from .db import unit_of_work
from .models import BlobChunk
from .sqlcompat import insert_ignoring_duplicates

ROW_SIZE = 1024 * 1024
_BLOB_ID = re.compile(r"[0-9a-f]{64}")


def _check_id(blob_id: str) -> None:
    if not _BLOB_ID.fullmatch(blob_id):
        raise IntegrityError("blob id is not a SHA-256 hex digest")


class DatabaseBlobWriter(io.RawIOBase):
    """Collects sealed bytes; nothing reaches the database before ``commit``."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory
        self._rows: list[bytes] = []
        self._pending = bytearray()
        self._hash = hashlib.sha256()
        self._blob_id: str | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        view = memoryview(data)
        self._hash.update(view)
        self._pending += view
        while len(self._pending) >= ROW_SIZE:
            self._rows.append(bytes(self._pending[:ROW_SIZE]))
            del self._pending[:ROW_SIZE]
        return len(view)

    def commit(self) -> str:
        if self._pending or not self._rows:
            self._rows.append(bytes(self._pending))
            self._pending.clear()
        blob_id = self._hash.hexdigest()
        with unit_of_work(self._factory) as session:
            exists = session.scalar(select(BlobChunk.seq).where(BlobChunk.blob_id == blob_id).limit(1))
            if exists is None:
                # The same bytes written by another process meanwhile are
                # the same blob: its rows stand (PostgreSQL; SQLite has one
                # writer at a time).
                conn = session.connection()
                for i, row in enumerate(self._rows):
                    conn.execute(insert_ignoring_duplicates(BlobChunk.__table__, conn.dialect.name),
                                 {"blob_id": blob_id, "seq": i, "data": row})
        self._rows.clear()
        self._blob_id = blob_id
        return blob_id

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._rows.clear()
        self._pending.clear()
        self.close()


class _RowReader(io.RawIOBase):
    def __init__(self, factory: sessionmaker[Session], blob_id: str, size: int) -> None:
        self._factory = factory
        self._blob_id = blob_id
        self._size = size
        self._pos = 0
        self._row: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if self._pos >= self._size:
            return 0
        seq, offset = divmod(self._pos, ROW_SIZE)
        if self._row is None or self._row[0] != seq:
            with self._factory() as session:
                data = session.scalar(
                    select(BlobChunk.data).where(BlobChunk.blob_id == self._blob_id, BlobChunk.seq == seq)
                )
            if data is None:
                raise IntegrityError("sealed blob is missing a part")
            self._row = (seq, bytes(data))
        part = self._row[1][offset : offset + len(buffer)]
        buffer[: len(part)] = part
        self._pos += len(part)
        return len(part)


# The first two rows of a blob: one row (most blobs, and every blob a
# delivery keeps in the table, ``smallblobs``) is the whole blob, read in
# this one query.
_FIRST_ROWS = fastread.FastSelect(
    select(BlobChunk.seq, BlobChunk.data).where(BlobChunk.blob_id == bindparam("blob")).order_by(BlobChunk.seq)
    .limit(2))


class DatabaseBlobStore:
    def __init__(self, factory: sessionmaker[Session], engine: Engine) -> None:
        self._factory = factory
        self._engine = engine

    def writer(self) -> DatabaseBlobWriter:
        return DatabaseBlobWriter(self._factory)

    def open(self, blob_id: str) -> BinaryIO:
        _check_id(blob_id)
        with fastread.snapshot(self._engine) as conn:
            first = _FIRST_ROWS.rows(conn, {"blob": blob_id})
        if not first:
            raise IntegrityError("sealed blob is missing")
        if len(first) == 1 and first[0].seq == 0:
            return io.BytesIO(first[0].data)
        with self._factory() as session:
            size = session.scalar(
                select(func.sum(func.length(BlobChunk.data))).where(BlobChunk.blob_id == blob_id)
            )
        if size is None:
            raise IntegrityError("sealed blob is missing")
        return io.BufferedReader(_RowReader(self._factory, blob_id, int(size)), ROW_SIZE)  # type: ignore[return-value]

    def exists(self, blob_id: str) -> bool:
        _check_id(blob_id)
        with self._factory() as session:
            return session.scalar(select(BlobChunk.seq).where(BlobChunk.blob_id == blob_id).limit(1)) is not None

    def delete(self, blob_id: str) -> None:
        _check_id(blob_id)
        with unit_of_work(self._factory) as session:
            session.execute(delete(BlobChunk).where(BlobChunk.blob_id == blob_id))
