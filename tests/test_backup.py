"""``postvault backup`` and ``postvault restore`` (issue 7 item 4), as an
admin runs them: real subprocesses, a real ``postvault serve`` taking SMTP
submissions over TLS while the backup runs, a restore into a new home, and
that home served again and read over IMAP with the same passwords."""

from __future__ import annotations

import imaplib
import io
import os
import re
import shutil
import smtplib
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from postvault.backup.make import make_backup
from postvault.certs.context import client_context
from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from postvault.store import audit
from postvault.store.models import Message
from tests.imapd.conftest import start_server, stop_server

PASSWORD = "correct horse battery staple"
SENDER, READER = "office@backup.test", "front@backup.test"
CANARY = "CANARY-backup-4e1d"
THREADS = 4


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    return subprocess.run([sys.executable, "-m", "postvault.cli.main", *args], capture_output=True, text=True,
                          timeout=300, env={**base, **(env or {})})


def make_home(path: Path) -> Path:
    init_home(path, "mail.example.test", {"store.kdf_iterations": 1})
    store = open_store(load_config(path, environ={}))
    try:
        store.create_account(SENDER, "member", "Backup Dental", PASSWORD)
        store.create_account(READER, "member", "Backup Clinic", PASSWORD)
    finally:
        store.close()
    return path


def body_of(token: str) -> bytes:
    return f"{CANARY} referral {token}\r\nPatient details for {token}.\r\n".encode()


def raw_message(token: str, file_blob: bool = False) -> bytes:
    """With ``file_blob``, over 64 KiB: its blob is a file of the blob
    folder, not a row of the database (store/smallblobs.py)."""
    padding = b"Scan notes, line for line.\r\n" * 2600 if file_blob else b""
    return (f"From: {SENDER}\r\nTo: {READER}\r\nSubject: {CANARY} {token}\r\nMessage-ID: <{token}@backup.test>\r\n"
            "\r\n").encode() + body_of(token) + padding


def assert_no_plaintext(path: Path) -> None:
    data = path.read_bytes()
    assert CANARY.encode() not in data and b"Patient details" not in data


def assert_audit_chain(db: Path) -> int:
    """Recompute every row's hash and link (audit.event_hash); returns the count."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT at, event, actor, account, message, client_ip, protocol, detail, prev_hash, hash "
                           "FROM audit_events ORDER BY id").fetchall()
    finally:
        con.close()
    prev = audit.GENESIS
    for at, event, actor, account, message, client_ip, protocol, detail, prev_hash, digest in rows:
        when = datetime.fromisoformat(at).replace(tzinfo=timezone.utc)
        fields = {"at": when.isoformat(), "event": event, "actor": actor, "account": account, "message": message,
                  "client_ip": client_ip, "protocol": protocol, "detail": detail}
        assert prev_hash == prev and digest == audit.event_hash(prev, fields), f"audit chain broken at {event}"
        prev = digest
    return len(rows)


class Load:
    """Threads submitting messages over SMTPS with AUTH until stopped;
    ``acked`` holds each token once its 250 came back."""

    def __init__(self, home: Path, port: int) -> None:
        self.ctx = client_context(home / "certs" / "ca.pem")
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: list[str] = []
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(THREADS)]

    def _run(self, n: int) -> None:
        try:
            with smtplib.SMTP_SSL("127.0.0.1", self.port, context=self.ctx, timeout=60) as smtp:
                smtp.login(SENDER, PASSWORD)
                for i in range(400):
                    if self.stop.is_set():
                        return
                    token = f"t{n}m{i:03d}"
                    smtp.sendmail(SENDER, [READER], raw_message(token))  # returns after the 250
                    with self.lock:
                        self.acked.append(token)
        except Exception as exc:  # reported by the test
            self.errors.append(exc)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def snapshot(self) -> set[str]:
        with self.lock:
            return set(self.acked)


def imap_bodies(home: Path, port: int, user: str, folder: str) -> dict[str, bytes]:
    """token -> BODY[TEXT] of every message in ``folder``, over IMAPS with
    the home's CA."""
    client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_context(home / "certs" / "ca.pem"),
                               timeout=60)
    try:
        assert client.login(user, PASSWORD)[0] == "OK"
        assert client.select(folder, readonly=True)[0] == "OK"
        typ, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)] BODY.PEEK[TEXT])")
        assert typ == "OK", data
        out: dict[str, bytes] = {}
        parts = [d for d in data if isinstance(d, tuple)]
        for header, text in zip(parts[::2], parts[1::2]):
            m = re.search(rb"<(t\d+m\d+)@backup\.test>", header[1])
            assert m, header
            out[m[1].decode()] = text[1]
        client.logout()
        return out
    finally:
        try:
            client.shutdown()
        except OSError:
            pass


def test_backup_under_smtp_load_restores_every_acknowledged_message(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    backup = tmp_path / "out" / "postvault.backup"
    backup.parent.mkdir()
    proc, ports, _log = start_server(home)
    restored_proc = None
    try:
        load = Load(home, ports["submissions"])
        for t in load.threads:
            t.start()
        deadline = time.monotonic() + 120
        while load.count() < 20 and time.monotonic() < deadline and not load.errors:
            time.sleep(0.05)
        # Everything acknowledged before the backup starts must be in it.
        before = load.snapshot()
        assert len(before) >= 20, load.errors
        done = cli("backup", "--home", str(home), "--out", str(backup))
        during = load.count()
        # Keep the load on a little past the backup's end, then stop.
        while load.count() < during + THREADS and time.monotonic() < deadline and not load.errors:
            time.sleep(0.05)
        load.stop.set()
        for t in load.threads:
            t.join(60)
        assert not load.errors, load.errors
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert re.match(r"backup written to .*: 2 accounts, \d+ messages, \d+ blobs, \d+ other files; "
                        r"not encrypted$", done.stdout.strip()), done.stdout
        assert during > len(before), "the backup did not overlap the SMTP load"
        assert backup.stat().st_mode & 0o077 == 0
        assert not list(backup.parent.glob(".*partial*")) and not list((home / "data").glob(".postvault-backup-*"))
        assert_no_plaintext(backup)
        with tarfile.open(backup) as tar:
            names = tar.getnames()
        assert names[-1] == "MANIFEST.json" and "db/postvault.db" in names
        assert {"home/conf/postvault.toml", "home/conf/policy.toml", "home/certs/ca.pem", "home/certs/server.pem",
                "home/certs/server.key"} <= set(names)
        assert not any(n.startswith("home/data/") for n in names)
        sent = load.snapshot()
    finally:
        stop_server(proc)

    target = tmp_path / "restored"
    restored = cli("restore", str(backup), "--home", str(target))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith(f"restored {target} from the backup of ")
    assert (target / "data" / "postvault.db").is_file() and (target / "conf" / "postvault.toml").read_bytes() == \
        (home / "conf" / "postvault.toml").read_bytes()
    assert (target / "certs" / "server.key").read_bytes() == (home / "certs" / "server.key").read_bytes()
    assert target.stat().st_mode & 0o077 == 0
    assert assert_audit_chain(target / "data" / "postvault.db") > len(before)
    # The restored chain also verifies against its signed checkpoints and the
    # head file, which the backup copied before the database snapshot.
    verified = cli("audit", "verify", "--home", str(target))
    assert verified.returncode == 0 and verified.stdout.startswith("audit chain intact"), verified.stdout
    check = cli("fsck", "--home", str(target))
    assert check.returncode == 0 and check.stdout.strip().endswith("; clean"), check.stdout

    restored_proc, rports, _rlog = start_server(target)
    try:
        inbox = imap_bodies(target, rports["imaps"], READER, "INBOX")
        outbox = imap_bodies(target, rports["imaps"], SENDER, "Sent")
    finally:
        stop_server(restored_proc)
    assert before <= set(inbox), sorted(before - set(inbox))
    assert set(inbox) <= sent and set(outbox) == set(inbox)
    for token, text in inbox.items():
        assert text == body_of(token), token


def test_encrypted_backup_round_trip(tmp_path: Path) -> None:
    gpg = shutil.which("gpg")
    assert gpg, "gpg is not installed (.ci/run installs gnupg)"
    home = make_home(tmp_path / "home")
    store = open_store(load_config(home, environ={}))
    try:
        for n in range(3):
            store.deliver(raw_message(f"t9m{n:03d}"), SENDER, [READER])
    finally:
        store.close()
    keyring = tmp_path / "gpg"
    keyring.mkdir(mode=0o700)
    params = ("%no-protection\nKey-Type: eddsa\nKey-Curve: ed25519\nKey-Usage: sign\nSubkey-Type: ecdh\n"
              "Subkey-Curve: cv25519\nSubkey-Usage: encrypt\nName-Real: Privacy Officer\n"
              "Name-Email: officer@backup.test\nExpire-Date: 0\n%commit\n")
    try:
        subprocess.run([gpg, "--batch", "--homedir", str(keyring), "--gen-key"], input=params, text=True,
                       check=True, capture_output=True, timeout=120)
        public = tmp_path / "officer.asc"
        public.write_bytes(subprocess.run([gpg, "--homedir", str(keyring), "--armor", "--export",
                                           "officer@backup.test"], check=True, capture_output=True).stdout)
        out = tmp_path / "backup.pgp"
        made = cli("backup", "--home", str(home), "--out", str(out), "--encrypt-to", str(public))
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip().endswith("; encrypted to the OpenPGP key")
        data = out.read_bytes()
        assert data[0] & 0x80 and b"ustar" not in data and b"MANIFEST" not in data and b"PVB1" not in data
        assert_no_plaintext(out)
        # To a fingerprint in the keyring as well.
        by_name = cli("backup", "--home", str(home), "--out", str(tmp_path / "b2.pgp"), "--encrypt-to",
                      "officer@backup.test", "--gnupg-home", str(keyring))
        assert by_name.returncode == 0, by_name.stderr

        # Without the secret key: one line, and nothing left behind.
        empty = tmp_path / "empty-gpg"
        empty.mkdir(mode=0o700)
        refused = cli("restore", str(out), "--home", str(tmp_path / "nokey"), "--gnupg-home", str(empty))
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith("postvault: GnuPG could not decrypt the backup")
        assert not (tmp_path / "nokey").exists()

        target = tmp_path / "restored"
        target.mkdir()  # an empty folder is fine
        done = cli("restore", str(out), "--home", str(target), "--gnupg-home", str(keyring))
        assert done.returncode == 0, done.stderr
        assert "decrypted with GnuPG" in done.stdout
    finally:
        subprocess.run(["gpgconf", "--homedir", str(keyring), "--kill", "gpg-agent"], capture_output=True)
    store = open_store(load_config(target, environ={}))
    try:
        session = store.login(READER, PASSWORD)
        metas = store.snapshot(session, "INBOX").messages
        bodies = []
        for meta in metas:
            with store.open_message(session, "INBOX", meta.uid) as reader:
                bodies.append(reader.read())
    finally:
        store.close()
    assert len(bodies) == 3
    assert all(b.endswith(body_of(f"t9m{n:03d}")) for n, b in enumerate(bodies))


def test_restore_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    out = tmp_path / "b.tar"
    assert cli("backup", "--home", str(home), "--out", str(out)).returncode == 0
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = cli("restore", str(out), "--home", str(busy))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"postvault: {busy} already exists and is not empty; restore into a new or empty folder"]
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    # An existing home is refused the same way.
    assert cli("restore", str(out), "--home", str(home)).returncode == 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_restore_refuses_a_damaged_backup_and_leaves_nothing(tmp_path: Path, damage: str) -> None:
    home = make_home(tmp_path / "home")
    store = open_store(load_config(home, environ={}))
    try:
        store.deliver(raw_message("t8m000", file_blob=True), SENDER, [READER])
    finally:
        store.close()
    out = tmp_path / "b.tar"
    assert cli("backup", "--home", str(home), "--out", str(out)).returncode == 0
    data = bytearray(out.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        with tarfile.open(out) as tar:
            member = next(m for m in tar.getmembers() if m.name.startswith("blobs/"))
        data[member.offset_data + 40] ^= 0x01
    out.write_bytes(bytes(data))
    proc = cli("restore", str(out), "--home", str(tmp_path / "target"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("truncated" if damage == "truncate" else "differs from its name") in proc.stderr
    assert not (tmp_path / "target").exists()


class ExpungeOnFirstBar(io.StringIO):
    """A terminal-like progress stream (so Progress draws a tqdm bar at
    once) that expunges messages the moment the blob copy starts: between
    the database snapshot and the blob copy, the race the backup handles."""

    def __init__(self, expunge: Callable[[], None]) -> None:
        super().__init__()
        self.expunge = expunge
        self.fired = False

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not self.fired and "backup: blobs" in s:
            self.fired = True
            self.expunge()
        return super().write(s)


def test_blobs_expunged_between_snapshot_and_copy(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    store = open_store(load_config(home, environ={}))
    try:
        for n in range(6):
            # No Sent copy: expunging the INBOX copy deletes the blob.
            store.deliver(raw_message(f"t7m{n:03d}", file_blob=True), SENDER, [READER], save_sent=False)
        session = store.login(READER, PASSWORD)
        doomed = [m.uid for m in store.snapshot(session, "INBOX").messages[:3]]

        def expunge() -> None:
            store.set_flags(session, "INBOX", doomed, ["\\Deleted"], "add")
            assert store.expunge(session, "INBOX", doomed) == doomed

        stream = ExpungeOnFirstBar(expunge)
        result = make_backup(home, tmp_path / "b.tar", progress_stream=stream)
    finally:
        store.close()
    assert stream.fired and "round 2" in stream.getvalue()
    assert result.manifest.counts["messages"] == 3 and result.manifest.counts["blobs"] == 3
    assert result.manifest.missing_blobs == []
    target = tmp_path / "restored"
    assert cli("restore", str(tmp_path / "b.tar"), "--home", str(target)).returncode == 0
    check = cli("fsck", "--home", str(target))
    assert check.returncode == 0 and "3 messages" in check.stdout, check.stdout


def test_a_blob_already_missing_is_reported_not_fatal(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    store = open_store(load_config(home, environ={}))
    try:
        kept = store.deliver(raw_message("t6m000"), SENDER, [READER])
        lost = store.deliver(raw_message("t6m001", file_blob=True), SENDER, [READER])
        blob_root = load_config(home, environ={}).store.blobs
        assert blob_root is not None
        with store._sessions() as s:
            blob_id = s.scalar(select(Message.blob_id).where(Message.public_id == lost.message_id))
    finally:
        store.close()
    (blob_root / blob_id[:2] / blob_id[2:]).unlink()
    out = tmp_path / "b.tar"
    made = cli("backup", "--home", str(home), "--out", str(out))
    assert made.returncode == 1 and out.is_file()
    assert "warning: 1 blob(s) the database refers to were already missing" in made.stdout
    target = tmp_path / "restored"
    assert cli("restore", str(out), "--home", str(target)).returncode == 0
    check = cli("fsck", "--home", str(target))
    assert check.returncode == 1 and f"blob {blob_id} of message {lost.message_id} is missing" in check.stdout
    assert kept.message_id not in check.stdout
