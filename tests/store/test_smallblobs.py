"""Small messages' blobs are rows of the blob table, written by the
transaction that files the message (store/smallblobs.py); larger ones are
files in the blob folder. Both read back the same, go with the last copy,
and leave nothing behind when the filing fails."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import select

from postvault.errors import IntegrityError
from postvault.store.api import Store
from postvault.store.models import BlobChunk, Message
from postvault.store.smallblobs import SMALL_MAX, SplitBlobStore
from tests.conftest import PASSWORD
from tests.support import stored_blobs


def mail(size: int, subject: str = "Referral") -> bytes:
    """A message of exactly ``size`` bytes."""
    head = f"From: office@dental.test\r\nTo: front@clinic.test\r\nSubject: {subject}\r\n\r\n".encode()
    return head + b"x" * (size - len(head))


def blob_of(store: Store, public_id: str) -> str:
    with store._sessions() as s:
        blob_id = s.scalar(select(Message.blob_id).where(Message.public_id == public_id))
    assert blob_id
    return blob_id


def rows_of(store: Store, blob_id: str) -> list[int]:
    with store._sessions() as s:
        return list(s.scalars(select(BlobChunk.seq).where(BlobChunk.blob_id == blob_id)))


def file_of(store: Store, blob_id: str) -> Path:
    assert isinstance(store.blobs, SplitBlobStore)
    return store.blobs.files.root / blob_id[:2] / blob_id[2:]


def test_small_delivery_is_a_row_and_larger_a_file(store: Store, people: dict[str, str]) -> None:
    for size, in_table in ((SMALL_MAX, True), (SMALL_MAX + 1, False)):
        raw = mail(size, f"size {size}")
        result = store.deliver(raw, people["member"], [people["member2"]])
        blob_id = blob_of(store, result.message_id)
        assert (rows_of(store, blob_id) == [0]) is in_table
        assert file_of(store, blob_id).is_file() is not in_table
        for who, box in ((people["member2"], "INBOX"), (people["member"], "Sent")):
            session = store.login(who, PASSWORD)
            uid = store.snapshot(session, box).messages[-1].uid
            with store.open_message(session, box, uid) as f:
                assert f.read() == raw


def test_small_append_is_a_row_and_goes_with_its_last_copy(store: Store, people: dict[str, str]) -> None:
    session = store.login(people["member"], PASSWORD)
    small = store.append(session, "Drafts", mail(2000), ["\\Deleted"])
    big = store.append(session, "Drafts", mail(SMALL_MAX + 10), ["\\Deleted"])
    small_blob, big_blob = blob_of(store, small.message_id), blob_of(store, big.message_id)
    assert rows_of(store, small_blob) == [0] and not file_of(store, small_blob).exists()
    assert rows_of(store, big_blob) == [] and file_of(store, big_blob).is_file()
    with store.open_message(session, "Drafts", small.uid) as f:
        assert f.read() == mail(2000)
    store.expunge(session, "Drafts")
    assert rows_of(store, small_blob) == [] and not file_of(store, big_blob).exists()
    assert stored_blobs(store) == []


def test_failed_filing_leaves_no_row(store: Store, people: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr("postvault.store.audit.record_many", boom)
    with pytest.raises(RuntimeError):
        store.deliver(mail(3000), people["member"], [people["member2"]])
    monkeypatch.undo()
    assert stored_blobs(store) == []
    prepared = store.prepare_delivery(mail(3000), people["member"], [people["member2"]])
    assert prepared.inline is not None
    store.discard_delivery(prepared)
    assert stored_blobs(store) == []


def test_split_store_reads_files_then_rows(store: Store, people: dict[str, str]) -> None:
    blobs = store.blobs
    assert isinstance(blobs, SplitBlobStore)
    with blobs.writer() as w:
        w.write(b"sealed bytes in a file")
        in_file = w.commit()
    in_table = blob_of(store, store.deliver(mail(1000), people["member"], [people["member2"]]).message_id)
    assert blobs.exists(in_file) and blobs.exists(in_table)
    with blobs.open(in_file) as f:
        assert f.read() == b"sealed bytes in a file"
    with blobs.open(in_table) as f:
        assert isinstance(f, io.BytesIO) and f.read() == rows_data(store, in_table)
    missing = "0" * 64
    assert not blobs.exists(missing)
    with pytest.raises(IntegrityError, match="missing"):
        blobs.open(missing)
    blobs.delete(in_file)  # a file: the table is not touched
    assert not blobs.exists(in_file) and rows_of(store, in_table) == [0]
    blobs.delete(missing)  # neither: not an error


def rows_data(store: Store, blob_id: str) -> bytes:
    with store._sessions() as s:
        data = s.scalar(select(BlobChunk.data).where(BlobChunk.blob_id == blob_id))
    assert data is not None
    return bytes(data)
