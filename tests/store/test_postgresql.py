"""The store on PostgreSQL with several server processes writing at once.

SQLite lets one writer in at a time (BEGIN IMMEDIATE); PostgreSQL runs
writers side by side, so UIDs, MODSEQs, the thread index and the audit
chain rest on row locks, conflict-tolerant inserts and the audit chain's
advisory lock instead (``store/sqlcompat.py``). Here several OS processes,
each with its own ``Store`` over one database, deliver, APPEND, set flags
and sign audit checkpoints into the same mailboxes at the same moment;
then the database must show what one writer at a time would have left.

These tests always use the throwaway cluster (``tests/pgcluster.py``),
whatever ``--db`` says; the other store tests run on PostgreSQL with
``--db postgresql -m databases``.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text

from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from postvault.store.api import Store
from postvault.store.db import make_engine, upgrade
from postvault.store.models import AuditEvent, Base, Mailbox, Message, MessageCopy, ThreadParticipant

from tests.conftest import PASSWORD
from tests.pgcluster import Cluster

SENDER, READER, NEWCOMER, OTHER = "office@dental.test", "front@clinic.test", "lab@dental.test", "desk@clinic.test"
WORKERS = 4
# Per worker and round: a delivery and an APPEND into one INBOX, an APPEND
# into a folder of its own, and every other round a flag change.
ROUNDS = 8


def mail(worker: int, n: int, *, reply_to: str | None = "<root@dental.test>") -> bytes:
    cite = f"In-Reply-To: {reply_to}\r\n" if reply_to else ""
    return (f"From: {SENDER}\r\nTo: {READER}\r\nSubject: w{worker} n{n}\r\n"
            f"Message-ID: <w{worker}-{n}@dental.test>\r\n{cite}\r\nbody {worker} {n}\r\n").encode()


def _worker(home: str, worker: int, start: "multiprocessing.synchronize.Barrier",
            out: "multiprocessing.Queue[tuple[int, list[tuple[str, str, int]]]]") -> None:
    """One server process: its own engine and connection pool, its own
    group-commit writer thread; reports (kind, public id, UID in READER's
    INBOX) of each message it filed there."""
    store = open_store(load_config(Path(home)))
    try:
        reader = store.login(READER, PASSWORD)
        done: list[tuple[str, str, int]] = []
        start.wait(60)
        for n in range(ROUNDS):
            # The first delivery of every worker brings NEWCOMER into the
            # root's thread: all of them add that participant (one after the
            # other: NEWCOMER's INBOX row lock).
            rcpts = [READER, NEWCOMER] if n == 0 else [READER]
            result = store.deliver(mail(worker, n), SENDER, rcpts)
            done.append(("deliver", result.message_id, dict(result.delivered)[READER]))
            appended = store.append(reader, "INBOX", mail(worker, 100 + n, reply_to=None))
            done.append(("append", appended.message_id, appended.uid))
            # A folder of this worker's own: these writers meet only on
            # the audit chain.
            store.append(reader, f"Worker {worker}", mail(worker, 200 + n, reply_to=None))
            if n % 2:
                store.set_flags(reader, "INBOX", [appended.uid], ["\\Flagged"], "add")
            if n == ROUNDS // 2:
                store.audit_checkpoint(Path(home))
        out.put((worker, done))
    finally:
        store.close()


@pytest.fixture
def pg_home(tmp_path: Path, pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in list(__import__("os").environ):
        if var.startswith("POSTVAULT_"):
            monkeypatch.delenv(var)
    home = tmp_path / "home"
    init_home(home, "mail.example.test", {
        "store.url": pg_cluster.new_database(), "store.blobs": "database", "store.kdf_iterations": 1})
    return home


def test_concurrent_writers_in_several_processes(pg_home: Path) -> None:
    store = open_store(load_config(pg_home))
    try:
        for email in (SENDER, READER, NEWCOMER, OTHER):
            store.create_account(email, "member", email.split("@")[1], PASSWORD)
        # The conversation every worker's deliveries reply to; the sender
        # holds it (its Sent copy), so the replies join its thread.
        root = store.deliver(mail(0, 0, reply_to=None).replace(b"<w0-0@", b"<root@"), SENDER, [READER, OTHER])
        reader = store.login(READER, PASSWORD)
        for w in range(WORKERS):
            store.create_mailbox(reader, f"Worker {w}")
    finally:
        store.close()

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WORKERS)
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(pg_home), w, start, out), daemon=True) for w in range(WORKERS)]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + 300
    try:
        while len(reports) < WORKERS and time.monotonic() < deadline:
            try:
                worker, done = out.get(timeout=1)
            except queue.Empty:
                # A worker that died (its error is on stderr) never reports.
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                continue
            reports[worker] = done
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * WORKERS
    assert sorted(reports) == list(range(WORKERS))
    filed = [entry for done in reports.values() for entry in done]
    assert len(filed) == WORKERS * ROUNDS * 2

    store = open_store(load_config(pg_home))
    try:
        with store._sessions() as s:
            inbox = s.scalar(select(Mailbox).where(Mailbox.name == "INBOX", Mailbox.account_id == reader.account_id))
            assert inbox is not None
            rows = s.execute(
                select(MessageCopy.uid, MessageCopy.modseq, MessageCopy.flags, Message.public_id, Message.thread_id,
                       Message.origin)
                .join(Message, Message.id == MessageCopy.message_id)
                .where(MessageCopy.mailbox_id == inbox.id)
            ).all()
            audit_ids = dict(s.execute(
                select(AuditEvent.message, AuditEvent.id)
                .where(AuditEvent.event.in_(["message.deliver", "message.append"]))
            ).all())
            root_thread = s.scalar(select(Message.thread_id).where(Message.public_id == root.message_id))
            participants = list(s.scalars(
                select(ThreadParticipant.email).where(ThreadParticipant.thread_id == root_thread)))
            # The audit chain's ids: one after the other, no gap.
            chain_ids = list(s.scalars(select(AuditEvent.id).order_by(AuditEvent.id)))

        # UIDs: one per message, 1..N with no gap and no repeat (the root
        # is 1; nothing failed, so nothing was skipped), uidnext next;
        # what each worker was told is what the mailbox holds.
        uids = [r.uid for r in rows]
        assert sorted(uids) == list(range(1, len(filed) + 2)), Counter(uids).most_common(3)
        assert inbox.uidnext == len(filed) + 2
        by_id = {r.public_id: r for r in rows}
        assert all(by_id[pid].uid == uid for _, pid, uid in filed)

        # In commit order (the audit chain: its lock is held from the
        # append to the commit, after the mailbox row lock was taken),
        # UIDs strictly ascend: no UID becomes visible below one already
        # seen, which is what IMAP clients rely on.
        committed = sorted((audit_ids[pid], by_id[pid].uid) for _, pid, _ in filed)
        in_order = [uid for _, uid in committed]
        assert in_order == sorted(in_order) and len(set(in_order)) == len(in_order)

        # MODSEQ: every change (a new copy, a flag change) took a modseq of
        # its own: no lost increment, no repeat.
        flag_changes = WORKERS * (ROUNDS // 2)
        assert inbox.highestmodseq == 1 + 1 + len(filed) + flag_changes  # start, root, these
        modseqs = [r.modseq for r in rows]
        assert len(set(modseqs)) == len(modseqs) and max(modseqs) == inbox.highestmodseq
        assert sum("\\Flagged" in r.flags for r in rows) == flag_changes

        # Thread index: every delivered reply joined the root's thread;
        # the newcomer that every worker added is there once.
        delivered = [by_id[pid] for kind, pid, _ in filed if kind == "deliver"]
        assert {r.thread_id for r in delivered} == {root_thread}
        assert sorted(participants) == sorted([SENDER, READER, OTHER, NEWCOMER])
        appended = [by_id[pid] for kind, pid, _ in filed if kind == "append"]
        assert len({r.thread_id for r in appended}) == len(appended)  # each its own

        for w in range(WORKERS):
            own = store.snapshot(reader, f"Worker {w}")
            assert [m.uid for m in own.messages] == list(range(1, ROUNDS + 1))

        # The audit chain holds and verifies (what `postvault audit verify` runs).
        assert chain_ids == list(range(chain_ids[0], chain_ids[0] + len(chain_ids)))
        report = store.audit_verify(pg_home)
        assert report.ok, report.summary()
        assert report.checkpoints >= WORKERS
    finally:
        store.close()


def test_migrated_postgresql_database_equals_models(pg_cluster: Cluster) -> None:
    """Alembic's revisions, run on an empty PostgreSQL database, give the
    schema of the models (types included: bytea, boolean, bigint)."""
    engine = make_engine(pg_cluster.new_database(empty=True))
    try:
        upgrade(engine)
        upgrade(engine)  # idempotent
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            assert diff == []
            assert set(Base.metadata.tables) <= set(conn.dialect.get_table_names(conn))
    finally:
        engine.dispose()


def test_database_blobs_in_postgresql(pg_cluster: Cluster) -> None:
    """A blob of several rows (``dbblobs.ROW_SIZE``) round-trips and seeks;
    writing the same bytes twice is one blob."""
    from postvault.store import dbblobs

    store = Store.open(pg_cluster.new_database(), "database")
    try:
        data = bytes(range(256)) * ((dbblobs.ROW_SIZE * 2 + 1000) // 256)
        ids = []
        for _ in range(2):
            with store.blobs.writer() as w:
                w.write(data)
                ids.append(w.commit())
        assert ids[0] == ids[1] and store.blobs.exists(ids[0])
        with store.blobs.open(ids[0]) as f:
            assert f.read() == data
            f.seek(dbblobs.ROW_SIZE + 5)
            assert f.read(10) == data[dbblobs.ROW_SIZE + 5 : dbblobs.ROW_SIZE + 15]
        store.blobs.delete(ids[0])
        assert not store.blobs.exists(ids[0])
    finally:
        store.close()


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    return subprocess.run([sys.executable, "-m", "postvault.cli.main", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_fsck_and_backup_on_postgresql(pg_home: Path, tmp_path: Path) -> None:
    """``postvault fsck`` checks the index and the blobs in the database
    (the SQLite file checks give way to a note); ``postvault backup``
    refuses in one line and names pg_dump."""
    store = open_store(load_config(pg_home))
    try:
        store.create_account(SENDER, "member", "dental", PASSWORD)
        store.create_account(READER, "member", "clinic", PASSWORD)
        for n in range(3):
            store.deliver(mail(0, n, reply_to=None), SENDER, [READER])
    finally:
        store.close()
    proc = cli(pg_home, "fsck")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        "note: the database's own pages are PostgreSQL's to check (pg_amcheck); it enforces the foreign keys itself",
        "fsck: 3 messages, 6 copies, 3 blobs checked; clean",
    ]

    store = open_store(load_config(pg_home))
    try:
        with store.engine.begin() as conn:  # one flipped byte in one sealed blob
            conn.execute(text("UPDATE blob_chunks SET data = set_byte(data, 40, get_byte(data, 40) # 1) "
                              "WHERE blob_id = (SELECT min(blob_id) FROM blob_chunks)"))
    finally:
        store.close()
    proc = cli(pg_home, "fsck")
    assert proc.returncode == 1
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["damaged-blob", "note", "fsck"]

    proc = cli(pg_home, "backup", "--out", str(tmp_path / "backup.tar"))
    assert proc.returncode == 1 and proc.stdout == "" and not (tmp_path / "backup.tar").exists()
    assert proc.stderr.splitlines() == [
        'postvault: postvault backup copies SQLite stores; back up a PostgreSQL store with pg_dump '
        '(it holds the blobs too when blobs = "database"), and the home folder beside it']
