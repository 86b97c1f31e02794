"""``postvault fsck`` as an admin runs it (a real subprocess on a real home):
clean on a fresh, active home; then each kind of damage is reported by exit
status and a line naming blob and message public ids -- never content --
and ``--repair`` removes old orphans only."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from postvault.conf.schema import Config
from postvault.store.api import Store
from postvault.store.models import Message

CANARY = "CANARY-fsck-7f3a"


def fsck(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    return subprocess.run([sys.executable, "-m", "postvault.cli.main", "fsck", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def deliver(store: Store, people: dict[str, str], n: int, body: bytes = b"") -> tuple[str, str]:
    raw = (f"From: {people['member']}\r\nTo: {people['member2']}\r\nSubject: {CANARY} {n}\r\n\r\n"
           .encode() + (body or f"{CANARY} body {n}\r\n".encode()))
    result = store.deliver(raw, people["member"], [people["member2"]])
    with store._sessions() as s:
        blob_id = s.scalar(select(Message.blob_id).where(Message.public_id == result.message_id))
    assert blob_id
    return result.message_id, blob_id


def test_fsck_clean_then_every_kind_of_damage(home: Path, config: Config, store: Store,
                                              people: dict[str, str]) -> None:
    msgs = [deliver(store, people, n) for n in range(5)]
    big = deliver(store, people, 99, body=os.urandom(200_000))
    proc = fsck(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == ["fsck: 6 messages, 12 copies, 6 blobs checked; clean"]

    root = config.store.blobs
    assert root is not None

    def path(blob_id: str) -> Path:
        return root / blob_id[:2] / blob_id[2:]

    (missing_pid, missing_blob), (flipped_pid, flipped_blob), (index_pid, _), (dangling_pid, _) = msgs[:4]
    # Small messages' blobs are rows of the blob table (store/smallblobs.py),
    # the big one's a file.
    assert not path(missing_blob).exists() and path(big[1]).is_file()
    db = sqlite3.connect(config.store.url.removeprefix("sqlite:///"))
    with db:
        assert db.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (missing_blob,)).rowcount == 1
        sealed = bytearray(db.execute("SELECT data FROM blob_chunks WHERE blob_id = ?", (flipped_blob,)).fetchone()[0])
        sealed[40] ^= 0x80
        db.execute("UPDATE blob_chunks SET data = ? WHERE blob_id = ?", (bytes(sealed), flipped_blob))
        table_orphan = "ab" * 32
        db.execute("INSERT INTO blob_chunks (blob_id, seq, data) VALUES (?, 0, ?)", (table_orphan, b"x" * 77))
    db.close()
    # Cut at a chunk boundary: the layout no longer gives the recorded size.
    os.truncate(path(big[1]), 25 + 65552)
    writer = store.blobs.writer()
    with writer:
        writer.write(os.urandom(3000))
        orphan = writer.commit()  # type: ignore[attr-defined]
    young_orphan_writer = store.blobs.writer()
    with young_orphan_writer:
        young_orphan_writer.write(os.urandom(100))
        young_orphan = young_orphan_writer.commit()  # type: ignore[attr-defined]
    old = time.time() - 2 * 3600
    os.utime(path(orphan), (old, old))
    db = sqlite3.connect(config.store.url.removeprefix("sqlite:///"))
    with db:
        db.execute("UPDATE message_copies SET uid = uid + 1000 WHERE message_id = "
                   "(SELECT id FROM messages WHERE public_id = ?) AND uid = 3", (index_pid,))
        db.execute("PRAGMA foreign_keys=OFF")
    with db:
        db.execute("UPDATE message_copies SET message_id = 99999 WHERE id = (SELECT MIN(c.id) FROM message_copies c "
                   "JOIN messages m ON m.id = c.message_id WHERE m.public_id = ?)", (dangling_pid,))
    db.close()

    proc = fsck(home)
    assert proc.returncode == 1
    out = proc.stdout
    lines = out.strip().splitlines()
    assert f"missing-blob: blob {missing_blob} of message {missing_pid} is missing" in lines
    assert any(line.startswith(f"damaged-blob: blob {flipped_blob} of message {flipped_pid}: its bytes no longer "
                               "match its SHA-256 id") for line in lines), out
    assert any(line.startswith(f"damaged-blob: blob {big[1]} of message {big[0]}") for line in lines), out
    assert any(line.startswith(f"orphan-blob: blob {orphan} (3") for line in lines), out
    assert any(line.startswith(f"orphan-blob: blob {young_orphan} (") for line in lines), out
    assert f"orphan-blob: blob {table_orphan} (77 bytes in 1 rows) is referred to by no message; kept (the " \
           "database records no age for it)" in lines, out
    assert any(line.startswith("index: copy ") and "has UID 1003, outside 1..UIDNEXT-1" in line
               for line in lines), out
    assert any("points at message row 99999, which does not exist" in line for line in lines), out
    assert any("message_copies row" in line and "missing messages row" in line for line in lines), out
    assert lines[-1].startswith("fsck: 6 messages")
    assert CANARY not in out + proc.stderr and "Traceback" not in proc.stderr

    # --quick reads no blob in full: the flipped byte goes unseen, the rest not.
    quick = fsck(home, "--quick")
    assert quick.returncode == 1 and flipped_blob not in quick.stdout and missing_blob in quick.stdout

    # --repair deletes the old orphan only; everything else is still reported.
    repaired = fsck(home, "--repair")
    assert repaired.returncode == 1
    assert any(line.startswith(f"orphan-blob: blob {orphan}") and line.endswith("(repaired)")
               for line in repaired.stdout.splitlines()), repaired.stdout
    assert not path(orphan).exists() and path(young_orphan).exists()
    assert missing_blob in repaired.stdout and flipped_blob in repaired.stdout
    again = fsck(home)
    assert orphan not in again.stdout


def test_fsck_repairs_to_clean(home: Path, config: Config, store: Store, people: dict[str, str]) -> None:
    deliver(store, people, 1, body=b"x" * 100_000)  # large enough for a blob file (store/smallblobs.py)
    root = config.store.blobs
    assert root is not None
    writer = store.blobs.writer()
    with writer:
        writer.write(b"sealed bytes of a delivery that crashed before its commit")
        orphan = writer.commit()  # type: ignore[attr-defined]
    stale = root / ".tmp-crashed.blob"
    stale.write_bytes(b"half")
    old = time.time() - 7200
    for p in (root / orphan[:2] / orphan[2:], stale):
        os.utime(p, (old, old))
    first = fsck(home, "--repair")
    assert first.returncode == 0, first.stdout
    assert "2 repaired" in first.stdout.splitlines()[-1]
    assert not stale.exists()
    assert fsck(home).stdout.strip().endswith("; clean")
    shutil.rmtree(root)
    gone = fsck(home)
    assert gone.returncode == 1 and "is missing" in gone.stdout
