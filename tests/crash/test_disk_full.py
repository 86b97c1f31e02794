"""Issue 8 item 5: the store on a tiny file system that fills up.

The home's ``data/`` folder (the SQLite database and the blobs) is moved
onto a 32 MiB tmpfs mounted by the test (a loop-mounted ext4 image where
tmpfs cannot be mounted), the real ``postvault serve`` runs on it, and a
file fills it to the last byte. Then SMTP submission answers 452 4.3.1 and
IMAP APPEND NO [OVERQUOTA], each with a sentence; nothing is half-written
(no blob, no temporary file, no row); the server keeps running and its
sessions stay usable; and once the file is deleted the same message and the
same APPEND succeed, each stored exactly once. Both blob layouts: a blob
folder (ENOSPC from the blob write) and blobs in the database (SQLITE_FULL
from the commit).

Mounting needs root: CI runs as root; outside CI a non-root run skips, in
CI it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postvault.errors import StorageFull, storage_full

from .harness import APPENDER, PASSWORD, RECIPIENT, SENDER, Harness, make_message

SIZE_MIB = 32


def _mount(target: Path, scratch: Path) -> list[str]:
    """A SIZE_MIB file system at ``target``; the command that unmounts it."""
    tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MIB}m,mode=0700", "tmpfs", str(target)],
                           capture_output=True, text=True)
    if tmpfs.returncode == 0:
        return ["umount", str(target)]
    image = scratch / "tiny.img"
    with open(image, "wb") as f:
        f.truncate(SIZE_MIB * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True, capture_output=True)
    return ["umount", "-d", str(target)]


def _fill(folder: Path) -> Path:
    """A file that takes every free byte of ``folder``'s file system."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert storage_full(exc) is not None, exc
    os.sync()
    return filler


@pytest.fixture(params=["folder", "database"])
def tiny(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Harness, Path]]:
    """A harness home whose data/ lives on a tiny file system."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the disk-full tests mount a file system and must run as root (CI does)")
        pytest.skip("mounting a tiny file system needs root")
    h = Harness(tmp_path)
    if request.param == "database":
        h.server_env["POSTVAULT_STORE_BLOBS"] = "database"
    data = h.home / "data"
    saved = h.home / "data.before"
    data.rename(saved)
    data.mkdir(mode=0o700)
    unmount = _mount(data, tmp_path)
    try:
        for entry in saved.iterdir():
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, data / entry.name)
        yield h, data
    finally:
        if h.proc is not None and h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait(30)
        if subprocess.run(unmount, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(data)], capture_output=True)


def _stored(data: Path) -> tuple[int, int, int, list[str]]:
    """(messages, copies, blob rows, files in the blob folder) as on disk."""
    with sqlite3.connect(f"file:{data / 'postvault.db'}?mode=ro", uri=True, timeout=30) as db:
        messages, copies, chunks = db.execute(
            "SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM message_copies), "
            "(SELECT COUNT(*) FROM blob_chunks)").fetchone()
    blobs = data / "blobs"
    files = sorted(str(p.relative_to(blobs)) for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else []
    return messages, copies, chunks, files


def test_disk_full_then_space_returns(tiny: tuple[Harness, Path]) -> None:
    h, data = tiny
    h.start()
    # Bigger than any free room the database file keeps; in 76-character lines.
    blob = os.urandom(3 * 1024 * 1024).hex()
    attachment = "\r\n".join(blob[i:i + 76] for i in range(0, len(blob), 76))
    smtp = smtplib.SMTP_SSL("127.0.0.1", h.ports["submissions"], context=h.ctx, timeout=60)
    smtp.login(SENDER, PASSWORD)
    imap = h.imap(APPENDER)
    try:
        smtp.sendmail(SENDER, [RECIPIENT], make_message(SENDER, RECIPIENT, "smtp-warm"))
        assert imap.append("INBOX", None, None, make_message(APPENDER, APPENDER, "app-warm"))[0] == "OK"

        big_mail = make_message(SENDER, RECIPIENT, "smtp-full") + attachment.encode() + b"\r\n"
        big_append = make_message(APPENDER, APPENDER, "app-full") + attachment.encode() + b"\r\n"
        filler = _fill(data)
        before = _stored(data)

        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail(SENDER, [RECIPIENT], big_mail)
        assert refused.value.smtp_code == 452
        text = refused.value.smtp_error.decode()
        assert text.startswith("4.3.1 ") and "storage is full" in text and text.endswith(")."), text

        typ, answer = imap.append("INBOX", None, None, big_append)
        assert typ == "NO" and answer[0] is not None, answer
        assert answer[0].startswith(b"[OVERQUOTA] ") and answer[0].endswith(b"."), answer

        # Nothing half-written, and the server and both sessions live on.
        assert _stored(data) == before
        assert not [p for p in (data / "blobs").glob(".tmp-*")] if (data / "blobs").exists() else True
        assert h.proc is not None and h.proc.poll() is None
        assert smtp.noop()[0] == 250
        assert imap.noop()[0] == "OK"

        # Space comes back: the very same message and APPEND go through.
        filler.unlink()
        smtp.rset()
        smtp.sendmail(SENDER, [RECIPIENT], big_mail)
        typ, answer = imap.append("INBOX", None, None, big_append)
        assert typ == "OK" and b"[APPENDUID " in (answer[0] or b""), answer
        after = _stored(data)
        assert after[:2] == (before[0] + 2, before[1] + 3)  # INBOX + Sent, and the appended copy
    finally:
        imap.logout()
        smtp.quit()

    # Each stored once, and opens in full.
    inbox = h.contents()
    assert sorted(inbox[(RECIPIENT, "INBOX")].values()) == ["smtp-full", "smtp-warm"]
    assert sorted(inbox[(SENDER, "Sent")].values()) == ["smtp-full", "smtp-warm"]
    assert sorted(inbox[(APPENDER, "INBOX")].values()) == ["app-full", "app-warm"]
    assert not h.ledger.problems, h.ledger.problems
    h.wait_for_sweep()
    assert h.stop() == 0
    log = h.logs[-1].read_text()
    assert "Traceback" not in log and "the storage is full" in log
    fsck = h.cli("fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_storage_full_recognises_the_real_errors(tmp_path: Path) -> None:
    """ENOSPC from a real write and SQLITE_FULL from a real database on a
    full file system are both StorageFull; other errors are not."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test mounts a file system and must run as root (CI does)")
        pytest.skip("mounting a tiny file system needs root")
    target = tmp_path / "tiny"
    target.mkdir()
    unmount = _mount(target, tmp_path)
    try:
        db = sqlite3.connect(target / "x.db")
        db.execute("CREATE TABLE t (b BLOB)")
        _fill(target)
        with pytest.raises(sqlite3.OperationalError) as full:
            for _ in range(1000):
                db.execute("INSERT INTO t VALUES (randomblob(65536))")
                db.commit()
        assert isinstance(storage_full(full.value), StorageFull)
        db.close()
    finally:
        subprocess.run(unmount, capture_output=True)
    assert storage_full(OSError(28, "No space left on device")) is not None
    assert storage_full(OSError(13, "Permission denied")) is None
    assert storage_full(sqlite3.OperationalError("database is locked")) is None
    assert storage_full(ValueError("x")) is None


def test_audit_checkpoints_survive_a_full_disk(tmp_path: Path) -> None:
    """certs/ (where audit-head.json is written) on a full file system: the
    server's checkpoint loop warns and carries on, and writes the head file
    again once space returns."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test mounts a file system and must run as root (CI does)")
        pytest.skip("mounting a tiny file system needs root")
    h = Harness(tmp_path)
    certs = h.home / "certs"
    saved = h.home / "certs.before"
    certs.rename(saved)
    certs.mkdir(mode=0o700)
    unmount = _mount(certs, tmp_path)
    try:
        for entry in saved.iterdir():
            shutil.copy2(entry, certs / entry.name)
        h.start()
        h.imap(APPENDER).logout()  # events, so a checkpoint is due
        head = certs / "audit-head.json"
        deadline = time.monotonic() + 60
        while not head.exists():
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        filler = _fill(certs)
        seq = json.loads(head.read_text())["seq"]
        h.imap(APPENDER).logout()
        deadline = time.monotonic() + 60
        while "checkpoint postponed, the storage is full" not in h.logs[-1].read_text():
            assert time.monotonic() < deadline, "the checkpoint was not attempted on the full disk"
            time.sleep(0.2)
        assert json.loads(head.read_text())["seq"] == seq
        assert not list(certs.glob(".audit-head.json.*.tmp")), "a half-written head file was left"

        filler.unlink()
        h.imap(APPENDER).logout()
        deadline = time.monotonic() + 60
        while json.loads(head.read_text())["seq"] <= seq:
            assert time.monotonic() < deadline, "the checkpoint loop did not carry on after the disk was full"
            time.sleep(0.2)
        assert h.stop() == 0
        assert "Traceback" not in h.logs[-1].read_text()
        verify = h.cli("audit", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        if h.proc is not None and h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait(30)
        if subprocess.run(unmount, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(certs)], capture_output=True)
