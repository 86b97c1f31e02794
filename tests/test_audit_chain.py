"""The audit chain against someone who edits the SQLite file directly:
real homes made by ``init_home``, events from real store calls, the file
changed with the sqlite3 module as an attacker would, and the real
``postvault audit verify`` run as a subprocess, which must exit 1 naming
the right entry. Also retention pruning and export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from postvault.conf.load import load_config
from postvault.progress import Progress
from postvault.store import audit
from postvault.store.api import Store
from postvault.store.auditsign import checkpoint_fields, signed_bytes
from postvault.store.db import unit_of_work
from tests.conftest import PASSWORD

MEMBER, COLLEAGUE = "office@dental.test", "dr@ortho.test"


def postvault(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    return subprocess.run([sys.executable, "-m", "postvault.cli.main", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=120, env=env)


def verify(home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return postvault("audit", "verify", *extra, home=home)


def db(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(home / "data" / "postvault.db", isolation_level=None)


def events(home: Path) -> list[tuple]:
    with db(home) as c:
        return c.execute("SELECT id, at, event, actor, account, message, client_ip, protocol, detail, prev_hash, hash "
                         "FROM audit_events ORDER BY id").fetchall()


def rehash_from(home: Path, start: int) -> None:
    """What an attacker with the database does after an edit: recompute every
    hash from ``start`` on (the algorithm is public, it needs no secret)."""
    c = db(home)
    rows = events(home)
    prev = next(r[10] for r in rows if r[0] == start - 1) if start > 1 else audit.GENESIS
    for r in rows:
        if r[0] < start:
            continue
        at = datetime.fromisoformat(r[1]).replace(tzinfo=timezone.utc).isoformat()
        fields = dict(zip(("at", "event", "actor", "account", "message", "client_ip", "protocol", "detail"),
                          (at, *r[2:9])))
        new = audit.event_hash(prev, fields)
        c.execute("UPDATE audit_events SET prev_hash=?, hash=? WHERE id=?", (prev, new, r[0]))
        prev = new
    c.close()


@pytest.fixture
def active(home: Path, store: Store) -> Iterator[Path]:
    """A home with real activity and signed checkpoints in between:
    checkpoint #1 after the accounts, #2 after the mail."""
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    store.create_account(COLLEAGUE, "colleague", "Ortho", PASSWORD, invited_by=MEMBER)
    store.audit_checkpoint(home, "manual")
    raw = (f"From: {MEMBER}\r\nTo: {COLLEAGUE}\r\nSubject: Referral\r\n\r\nHello\r\n").encode()
    store.deliver(raw, MEMBER, [COLLEAGUE], client_ip="192.0.2.7", protocol="smtp")
    session = store.login(COLLEAGUE, PASSWORD, client_ip="192.0.2.8", protocol="imap")
    store.record_event("message.read", actor=COLLEAGUE, account=COLLEAGUE, message="m1", protocol="imap")
    store.set_flags(session, "INBOX", [1], ["\\Seen"], "add")
    store.audit_checkpoint(home, "periodic")
    store.record_event("message.read", actor=COLLEAGUE, account=COLLEAGUE, message="m2", protocol="imap")
    yield home


def signed_through(home: Path) -> int:
    with db(home) as c:
        return int(c.execute("SELECT max(event_id) FROM audit_checkpoints").fetchone()[0])


def broken(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("postvault: audit chain broken at "), line
    for word in words:
        assert word in line, (word, line)
    return line


def test_verify_passes_after_real_activity(active: Path) -> None:
    n = len(events(active))
    proc = verify(active)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"audit chain intact: {n} events, 2 checkpoints"), proc.stdout
    # Progress went to stderr, as counts only.
    assert f"audit verify: {n}/{n} events" in proc.stderr


def test_edited_detail_names_the_entry(active: Path) -> None:
    target = events(active)[2][0]
    with db(active) as c:
        c.execute("UPDATE audit_events SET detail='role=admin' WHERE id=?", (target,))
    broken(verify(active), f"entry {target} (", "contents changed")


def test_deleted_middle_row_names_the_gap(active: Path) -> None:
    target = events(active)[3][0]
    with db(active) as c:
        c.execute("DELETE FROM audit_events WHERE id=?", (target,))
    broken(verify(active), f"entry {target}:", "missing (deleted)")


def test_reordered_rows_break_the_link(active: Path) -> None:
    rows = events(active)
    a, b = rows[3], rows[4]
    with db(active) as c:
        # Swap everything but the ids: the two events change places.
        for src, dst in ((a, b[0]), (b, a[0])):
            c.execute("UPDATE audit_events SET at=?, event=?, actor=?, account=?, message=?, client_ip=?, protocol=?, "
                      "detail=?, prev_hash=?, hash=? WHERE id=?", (*src[1:], dst))
    broken(verify(active), f"entry {a[0]} (", "link to entry")


def test_rewritten_and_rehashed_chain_fails_at_the_checkpoint(active: Path) -> None:
    target = events(active)[1][0]
    with db(active) as c:
        c.execute("UPDATE audit_events SET actor='someone-else' WHERE id=?", (target,))
    rehash_from(active, target)
    with db(active) as c:
        first_cp = c.execute("SELECT event_id FROM audit_checkpoints WHERE seq=1").fetchone()[0]
    # Every hash agrees with its row again; only the signed head disagrees.
    broken(verify(active), f"entry {first_cp} (", "signed checkpoint #1", "rewritten")


def test_forged_checkpoint_signature_is_named(active: Path) -> None:
    """The attacker rewrites, rehashes and signs new checkpoints with a key of
    their own, claiming the home's key id: the signature does not verify."""
    target = events(active)[1][0]
    with db(active) as c:
        c.execute("UPDATE audit_events SET detail='' WHERE id=?", (target,))
    rehash_from(active, target)
    theirs = Ed25519PrivateKey.generate()
    c = db(active)
    prev = b"\0" * 32
    for seq, at, kind, event_id, key_id in c.execute(
            "SELECT seq, at, kind, event_id, key_id FROM audit_checkpoints ORDER BY seq").fetchall():
        head = c.execute("SELECT hash FROM audit_events WHERE id=?", (event_id,)).fetchone()[0]
        fields = checkpoint_fields(seq, datetime.fromisoformat(at), kind, event_id, head, prev, key_id)
        sig = theirs.sign(signed_bytes(fields))
        c.execute("UPDATE audit_checkpoints SET event_hash=?, prev_sig_hash=?, signature=? WHERE seq=?",
                  (head, prev, sig, seq))
        prev = hashlib.sha256(sig).digest()
    c.close()
    (active / "certs" / "audit-head.json").unlink()  # would name the real signature
    broken(verify(active), "checkpoint #1", "signature does not verify")


def test_deleted_newest_checkpoint_shows_through_the_head_file(active: Path) -> None:
    with db(active) as c:
        c.execute("DELETE FROM audit_checkpoints WHERE seq=2")
    broken(verify(active), "checkpoint #2", "audit-head.json", "missing from the database")


def test_truncated_tail_under_a_checkpoint(active: Path) -> None:
    through = signed_through(active)
    with db(active) as c:
        c.execute("DELETE FROM audit_events WHERE id >= ?", (through - 1,))
    broken(verify(active), f"entry {through - 1}:", "missing (deleted)", f"covers entries up to {through}")


def test_deleted_oldest_rows_are_not_a_prune(active: Path) -> None:
    with db(active) as c:
        c.execute("DELETE FROM audit_events WHERE id <= 2")
    broken(verify(active), "entry 3 (", "entries 1-2 are gone", "no signed checkpoint")


def test_anchor_kept_by_an_auditor_catches_a_full_rewrite(active: Path) -> None:
    """Even someone who can delete every checkpoint and the head file (or holds
    the key) cannot hide a rewrite from a checkpoint line kept elsewhere."""
    proc = postvault("audit", "checkpoint", home=active)
    assert proc.returncode == 0, proc.stderr
    anchor = active.parent / "auditor.jsonl"
    anchor.write_text(proc.stdout)
    assert json.loads(proc.stdout)["signature"]
    assert verify(active, "--anchor", str(anchor)).returncode == 0
    with db(active) as c:
        c.execute("UPDATE audit_events SET detail='' WHERE id=2")
        c.execute("DELETE FROM audit_checkpoints")
    rehash_from(active, 2)
    (active / "certs" / "audit-head.json").unlink()
    assert verify(active).returncode == 0  # nothing left inside the home to tell
    broken(verify(active, "--anchor", str(anchor)), "checkpoint #3", "auditor.jsonl line 1", "missing")


def test_verify_streams_with_progress(home: Path, store: Store) -> None:
    with unit_of_work(store._sessions) as s:  # one transaction: 2500 fsyncs would take half a minute
        for n in range(2500):
            audit.record(s, "message.read", actor=MEMBER, account=MEMBER, message=f"id{n}")
    store.audit_checkpoint(home)
    out = io.StringIO()
    with Progress("audit verify", store.audit_count(), unit="events", stream=out, interval=3600) as progress:
        report = store.audit_verify(home, progress=progress)
    assert report.ok and report.events == 2500 and progress.count == 2500 and progress.total == 2500
    assert report.summary() == f"audit chain intact: 2500 events, 1 checkpoints; signing key {report.key}"
    assert "2500/2500 events" in out.getvalue()


class _Past(datetime):
    """``datetime`` whose now() is ``_Past.offset`` ago: events recorded
    while it is installed are old, and their chain is honest."""

    offset = timedelta(0)

    @classmethod
    def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
        return datetime.now(tz) - cls.offset


def test_prune_by_retention_keeps_the_chain_verifiable(home: Path, store: Store,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "datetime", _Past)
    _Past.offset = timedelta(days=7 * 365)
    for n in range(5):
        store.record_event("login.ok", actor=MEMBER, account=MEMBER, detail=f"old {n}")
    store.audit_checkpoint(home)
    _Past.offset = timedelta(days=30)
    for n in range(3):
        store.record_event("login.ok", actor=MEMBER, account=MEMBER, detail=f"recent {n}")
    monkeypatch.undo()
    # Default retention: 2190 days (6 years).
    assert load_config(home).audit.retention_days == 2190
    proc = postvault("audit", "prune", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "pruned 5 audit events older than 2190 days" in proc.stdout
    kept = events(home)
    assert kept[0][0] == 6 and [r[8] for r in kept[:3]] == ["recent 0", "recent 1", "recent 2"]
    assert [r[2] for r in kept[3:]] == ["audit.prune", "admin.command"]
    proc = verify(home)
    assert proc.returncode == 0, proc.stderr
    # Pruning again finds nothing (but the events are still counted right).
    assert "pruned 0" in postvault("audit", "prune", home=home).stdout
    assert verify(home).returncode == 0
    # Deleting the prune anchor leaves the oldest kept entry unanchored.
    with db(home) as c:
        c.execute("DELETE FROM audit_checkpoints WHERE kind='prune'")
    assert verify(home).returncode == 1


def test_prune_refuses_a_broken_chain(home: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "datetime", _Past)
    _Past.offset = timedelta(days=3000)
    for n in range(3):
        store.record_event("login.ok", actor=MEMBER, account=MEMBER)
    monkeypatch.undo()
    with db(home) as c:
        c.execute("UPDATE audit_events SET actor='x' WHERE id=2")
    proc = postvault("audit", "prune", home=home)
    assert proc.returncode == 1 and "not pruning" in proc.stderr and "entry 2" in proc.stderr
    assert len(events(home)) == 4  # nothing deleted; the refusal itself is recorded


def test_export_filters_by_date_and_account(home: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "datetime", _Past)
    _Past.offset = timedelta(days=40)
    store.record_event("login.ok", actor=MEMBER, account=MEMBER, client_ip="192.0.2.1", protocol="imap")
    store.record_event("login.ok", actor=COLLEAGUE, account=COLLEAGUE, client_ip="192.0.2.2", protocol="imap")
    _Past.offset = timedelta(days=10)
    store.record_event("message.read", actor=MEMBER, account=MEMBER, message="abc", protocol="imap",
                       detail="client=-")
    store.record_event("invitation.create", actor=MEMBER, account=COLLEAGUE, detail=f"member={MEMBER}")
    store.record_event("login.failed", actor="unknown-user", client_ip="=cmd|'/c calc'!A1", protocol="smtp")
    monkeypatch.undo()
    day = lambda d: (datetime.now(timezone.utc) - timedelta(days=d)).date().isoformat()  # noqa: E731

    proc = postvault("audit", "export", "--since", day(20), "--account", MEMBER, "--format", "jsonl", home=home)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["event"] for r in rows] == ["message.read", "invitation.create"]
    assert rows[0]["message"] == "abc" and rows[0]["protocol"] == "imap" and len(rows[0]["hash"]) == 64
    assert "exported 2 audit events" in proc.stderr

    proc = postvault("audit", "export", "--until", day(20), "--format", "csv", home=home)
    table = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [(r["event"], r["account"], r["client_ip"]) for r in table] == [
        ("login.ok", MEMBER, "192.0.2.1"), ("login.ok", COLLEAGUE, "192.0.2.2")]

    out = home.parent / "export.csv"
    proc = postvault("audit", "export", "--since", day(20), "--until", day(0), "--format", "csv", "--out", str(out),
                     home=home)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o077 == 0
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    # Then the two exports above, each an admin command.
    assert [r["event"] for r in table] == ["message.read", "invitation.create", "login.failed"] + 2 * ["admin.command"]
    # A spreadsheet would run a cell that starts with "=": it is quoted.
    assert table[2]["client_ip"] == "'=cmd|'/c calc'!A1"
    again = postvault("audit", "export", "--out", str(out), home=home)
    assert again.returncode == 1 and "--force" in again.stderr

    bad = postvault("audit", "export", "--since", "last tuesday", home=home)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_admin_commands_are_audited(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    proc = subprocess.run([sys.executable, "-m", "postvault.cli.main", "member", "add", MEMBER, "--practice",
                           "Smile Dental", "--password-stdin", "--home", str(home)],
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "postvault.cli.main", "member", "add", MEMBER, "--practice",
                           "Smile Dental", "--password-stdin", "--home", str(home)],
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    rows = [r for r in events(home) if r[2] == "admin.command"]
    assert [(r[4], r[7], r[8]) for r in rows] == [
        (MEMBER, "cli", "command=member add result=ok"),
        (MEMBER, "cli", "command=member add result=error=AccountExists"),
    ]
    assert all(r[3].startswith("admin") for r in rows)


def test_existing_home_gets_a_key_on_first_checkpoint(home: Path, store: Store) -> None:
    for name in ("audit-signing.key", "audit-signing.pub"):
        (home / "certs" / name).unlink()
    store.record_event("login.ok", actor=MEMBER, account=MEMBER)
    assert verify(home).returncode == 0  # nothing signed yet, nothing to check
    info = store.audit_checkpoint(home)
    assert info is not None and info.seq == 1
    assert (home / "certs" / "audit-signing.key").stat().st_mode & 0o777 == 0o600
    assert verify(home).returncode == 0
    # The public key gone: the checkpoints can no longer be checked, and verify says so.
    shutil.move(home / "certs" / "audit-signing.key", home.parent / "away.key")
    (home / "certs" / "audit-signing.pub").unlink()
    broken(verify(home), "checkpoint #1", "public key")
