"""Integrity on read (issue 7 item 5): a sealed blob damaged on disk is
refused on FETCH with a tagged ``NO [SERVERBUG]`` and a sentence (RFC
5530), never a crash or bytes that failed authentication; the connection
stays usable, the rest of the folder is still served, and each damaged
message gets an audit event and a log line naming only its public id."""

from __future__ import annotations

import os
import time

from sqlalchemy import select, update

from postvault.store.models import AuditEvent, BlobChunk, Message

from .client import Client
from .conftest import PASSWORD, Server

CHUNK = 64 * 1024 + 16  # crypto.DEFAULT_CHUNK_SIZE plus its tag
HEADER = 25


def message(sender: str, to: str, subject: str, body: bytes) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@ortho.test>\r\n\r\n"
            .encode() + body)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def blob_id_of(server: Server, public_id: str) -> str:
    with server.store._sessions() as s:
        blob_id = s.scalar(select(Message.blob_id).where(Message.public_id == public_id))
    assert blob_id
    return blob_id


def blob_path(server: Server, public_id: str) -> str:
    blob_id = blob_id_of(server, public_id)
    return str(server.store.blobs.files.root / blob_id[:2] / blob_id[2:])  # type: ignore[attr-defined]


def flip_last_byte_in_table(server: Server, public_id: str) -> None:
    """A small message's blob is a row of the blob table (store/smallblobs.py)."""
    blob_id = blob_id_of(server, public_id)
    with server.store.engine.begin() as conn:
        sealed = bytearray(conn.scalar(select(BlobChunk.data).where(BlobChunk.blob_id == blob_id)))
        sealed[-1] ^= 0x01
        conn.execute(update(BlobChunk).where(BlobChunk.blob_id == blob_id).values(data=bytes(sealed)))


def test_damaged_blob_is_refused_with_serverbug(server: Server, member: str) -> None:
    sender = server.account("colleague", invited_by=member)
    canary = "CANARY-integrity-subject"
    # Above server.INLINE_MAX (1 MiB): streamed chunk by chunk, not read whole.
    big_body = b"".join(b"line %06d of a long referral letter\r\n" % i for i in range(32000))  # ~19 chunks
    big = server.store.deliver(message(sender, member, canary + "-big", big_body), sender, [member])
    good = server.store.deliver(message(sender, member, canary + "-good", b"All fine.\r\n"), sender, [member])
    small = server.store.deliver(message(sender, member, canary + "-small", b"Short.\r\n"), sender, [member])
    assert os.path.getsize(blob_path(server, big.message_id)) > 3 * CHUNK
    # A middle chunk of the big one (its last chunk still opens, so the
    # damage is only found while reading), the last byte of the small one.
    flip(blob_path(server, big.message_id), HEADER + CHUNK + 100)
    assert not os.path.exists(blob_path(server, small.message_id))
    flip_last_byte_in_table(server, small.message_id)

    c = Client("127.0.0.1", server.imaps, server.context())
    try:
        c.response()
        assert c.command("l", f'LOGIN {member} "{PASSWORD}"')[-1].startswith(b"l OK")
        assert c.command("s", "SELECT INBOX")[-1].startswith(b"s OK")
        lines = c.command("f", "FETCH 1:3 (UID BODY.PEEK[HEADER] BODY.PEEK[])")
        tagged = lines[-1]
        assert tagged.startswith(b"f NO [SERVERBUG] 2 stored messages failed an integrity check"), tagged
        untagged = lines[:-1]
        # The big one: its header went out whole, then the FETCH response
        # was closed before the damaged body; the small one: nothing.
        assert untagged[0].startswith(b"* 1 FETCH (UID 1 BODY[HEADER] {") and untagged[0].endswith(b")")
        assert b"BODY[] {" not in untagged[0] and b"line 000000" not in untagged[0]
        assert untagged[1].startswith(b"* 2 FETCH (UID 2 BODY[HEADER] {") and b"All fine." in untagged[1]
        assert len(untagged) == 2, untagged
        # The connection is in sync and usable.
        assert c.command("n", "NOOP")[-1].startswith(b"n OK")
        again = c.command("g", "FETCH 2 BODY.PEEK[TEXT]")
        assert again[-1].startswith(b"g OK") and b"All fine." in again[0]
        # A partial fetch inside an intact chunk of the big one still works.
        part = c.command("p", "FETCH 1 BODY.PEEK[TEXT]<0.37>")
        assert part[-1].startswith(b"p OK") and b"line 000000 of a long referral letter" in part[0]
        assert c.command("q", "FETCH 3 BODY.PEEK[]")[-1].startswith(b"q NO [SERVERBUG] A stored message")
    finally:
        c.close()

    with server.store._sessions() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.account == member,
                                                         AuditEvent.event == "message.integrity")))
    assert sorted(e.message for e in events) == sorted([big.message_id, small.message_id, small.message_id])
    assert all(e.protocol == "imap" and e.client_ip and "chunk" in e.detail for e in events)
    assert all(canary not in e.detail for e in events)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = server.log.read_text()
        if log.count("failed its integrity check") >= 3:
            break
        time.sleep(0.1)
    assert f"stored message {big.message_id} failed its integrity check" in log
    assert f"stored message {small.message_id} failed its integrity check" in log
    assert good.message_id not in log and canary not in log and "Traceback" not in log
