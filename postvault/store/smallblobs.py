"""Small sealed blobs kept in the database, written by the transaction that
files their message.

A blob in its own file is durable only after an fsync of the file and one of
its folder, on top of the commit that files the message: three flushes to
disk per message where a group commit (``groupcommit``) shares one among a
whole batch. So a message whose plaintext is at most ``SMALL_MAX`` bytes is
sealed in memory and its blob becomes one row of ``blob_chunks`` (the table
that ``[store] blobs = "database"`` keeps every blob in, ``dbblobs``),
inserted by the same transaction as the message row: one commit makes both
durable, and a crash before it leaves nothing behind, not even an orphan
file. Blobs this size read as fast from the database as from files
(https://www.sqlite.org/intern-v-extern-blob.html); larger messages are
still streamed to the configured blob store.

``SplitBlobStore`` is a blob folder with that table beside it: a blob is
looked up in the table, then in the folder.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import BinaryIO

from sqlalchemy import Connection

from ..errors import IntegrityError
from . import crypto
from .blobs import BlobWriter, FileBlobStore
from .dbblobs import DatabaseBlobStore
from .fastread import FastWrite
from .models import BlobChunk
from .sqlcompat import insert_ignoring_duplicates

__all__ = ["SMALL_MAX", "SplitBlobStore", "seal_in_memory", "write_rows"]

# Plaintext bytes; its sealed form fits one row of dbblobs (ROW_SIZE).
SMALL_MAX = 64 * 1024

_TABLE = BlobChunk.__table__
# Content addressing: the same bytes are the same blob, so a row already
# there is this row.
_ROW_SQLITE = FastWrite(insert_ignoring_duplicates(_TABLE, "sqlite"), ["blob_id", "seq", "data"])  # type: ignore[arg-type]


def seal_in_memory(data: bytes, key: bytes, aad: bytes) -> tuple[str, int, bytes]:
    """``data`` sealed as ``crypto.seal_stream`` seals it into a blob
    store; returns (blob id, plaintext size, sealed bytes)."""
    out = io.BytesIO()
    size = crypto.seal_stream(io.BytesIO(data), out, key, aad)
    sealed = out.getvalue()
    return hashlib.sha256(sealed).hexdigest(), size, sealed


def write_rows(conn: Connection, blobs: Sequence[tuple[str, bytes]]) -> None:
    """Insert (blob id, sealed bytes) pairs as one-row blobs, inside the
    caller's transaction (the one that files their messages)."""
    if not blobs:
        return
    rows = [{"blob_id": blob_id, "seq": 0, "data": sealed} for blob_id, sealed in blobs]
    if conn.dialect.name == "sqlite":
        _ROW_SQLITE.run_many(conn, rows)
    else:
        conn.execute(insert_ignoring_duplicates(_TABLE, conn.dialect.name), rows)  # type: ignore[arg-type]


class SplitBlobStore:
    """A blob folder (``files``) and the database's blob table (``table``):
    new blobs streamed through ``writer`` are files; small ones filed with
    their message are rows (see the module docstring)."""

    def __init__(self, files: FileBlobStore, table: DatabaseBlobStore) -> None:
        self.files = files
        self.table = table

    def writer(self) -> BlobWriter:
        return self.files.writer()

    def open(self, blob_id: str) -> BinaryIO:
        """The row if there is one, else the file; ``IntegrityError`` if
        neither. The row first: most messages are small, and a missing row
        costs one indexed read (a missing file cost a failed open and two
        exceptions, about as much as reading the row)."""
        try:
            return self.table.open(blob_id)
        except IntegrityError:
            return self.files.open(blob_id)

    def exists(self, blob_id: str) -> bool:
        return self.files.exists(blob_id) or self.table.exists(blob_id)

    def delete(self, blob_id: str) -> None:
        # A file, or else rows: not a database transaction for every file.
        if self.files.exists(blob_id):
            self.files.delete(blob_id)
        else:
            self.table.delete(blob_id)
