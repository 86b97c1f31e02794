"""Small helpers shared by the test suites."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from postvault.store.api import Store


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stored_blobs(store: "Store") -> list[str]:
    """Every blob the store holds, whichever kind of blob store it has:
    the files under a blob folder (temporary ones too, by name), or the
    blob ids in the database's chunk table."""
    from sqlalchemy import select

    from postvault.store.blobs import FileBlobStore
    from postvault.store.models import BlobChunk

    if isinstance(store.blobs, FileBlobStore):
        return sorted(str(p.relative_to(store.blobs.root)) for p in store.blobs.root.rglob("*") if p.is_file())
    with store._sessions() as s:
        return sorted(s.scalars(select(BlobChunk.blob_id).distinct()))
