"""Issue 8 item 5, the other half: the store on a slow file system.

The home's ``data/`` (the SQLite database and the blobs) is put on a FUSE
passthrough file system made by the test (``slowfs.py``: every fsync takes
``FSYNC_DELAY`` seconds, every write a little), and the real ``postvault
serve`` runs on it. SQLite runs with ``synchronous=FULL`` (these messages
are small: their blobs are rows written by that commit, store/smallblobs.py),
so every delivery and APPEND waits for at least one slow fsync. Then, at once: two SMTP senders, an IMAP appender, a
reader FETCHing and NOOPing in another session, and two clients that give
up (socket time-out) while their message is being committed.

Checked: every message that got its 250 or APPEND OK is stored exactly once
and opens; a message whose client timed out is stored at most once (the
client could not know: "lost in flight"); no error reply to any client that
waited; the reader's commands all answered; the server log holds no
traceback and no ERROR; ``postvault fsck`` is clean; the file system really
did the slow fsyncs. Latencies are printed (``-s``), never asserted.

Mounting needs root and /dev/fuse: CI runs as root; outside CI a non-root
run skips, in CI it fails. fusepy (``[test]`` extra) over Debian's libfuse2
(.ci/run).
"""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import APPENDER, PASSWORD, RECIPIENT, SENDER, Harness, make_message

FSYNC_DELAY = 0.2
WRITE_DELAY = 0.002
SLOWFS = Path(__file__).with_name("slowfs.py")


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[Harness, Path]]:
    """A harness home whose data/ lives on the slow file system; yields it
    and the path its counts are written to once unmounted."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        if os.environ.get("CI"):
            pytest.fail("the slow-disk test mounts a FUSE file system: it needs root and /dev/fuse (CI has both)")
        pytest.skip("mounting a FUSE file system needs root and /dev/fuse")
    h = Harness(tmp_path)
    data = h.home / "data"
    backing = tmp_path / "backing"
    shutil.copytree(data, backing)
    shutil.rmtree(data)
    data.mkdir(mode=0o700)
    stats = tmp_path / "slowfs.json"
    fs = subprocess.Popen([sys.executable, str(SLOWFS), str(backing), str(data), "--stats", str(stats),
                           "--fsync-delay", str(FSYNC_DELAY), "--write-delay", str(WRITE_DELAY)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(data):
            assert fs.poll() is None, f"slowfs.py did not mount: {fs.communicate()[0]}"
            assert time.monotonic() < deadline, "slowfs.py did not mount in 20 s"
            time.sleep(0.05)
        assert (data / "postvault.db").exists()
        yield h, stats
    finally:
        if h.proc is not None and h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait(30)
        if subprocess.run(["umount", str(data)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(data)], capture_output=True, check=False)
        try:
            fs.wait(20)
        except subprocess.TimeoutExpired:
            fs.kill()
            fs.wait()


def test_slow_disk_keeps_answering_and_loses_nothing(slow: tuple[Harness, Path]) -> None:
    h, stats_path = slow
    t0 = time.monotonic()
    h.start()
    started = time.monotonic() - t0
    # Something for the reader to read.
    first = h.imap(APPENDER)
    assert first.append("INBOX", None, None, make_message(APPENDER, APPENDER, "slow-seed"))[0] == "OK"
    first.logout()

    acked: list[str] = []  # tags whose 250 / APPEND OK the client read
    gave_up: list[str] = []  # tags whose client timed out waiting for the answer
    failures: list[str] = []  # any other reply or error
    latency: dict[str, list[float]] = {"smtp send": [], "imap append": [], "reader fetch": [], "reader noop": []}
    lock = threading.Lock()
    writers_done = threading.Event()

    def smtp_sender(n: int) -> None:
        try:
            s = smtplib.SMTP_SSL("127.0.0.1", h.ports["submissions"], context=h.ctx, timeout=60)
            s.login(SENDER, PASSWORD)
            for i in range(3):
                tag = f"smtp{n}-{i}"
                t = time.monotonic()
                s.sendmail(SENDER, [RECIPIENT], make_message(SENDER, RECIPIENT, tag))
                with lock:
                    latency["smtp send"].append(time.monotonic() - t)
                    acked.append(tag)
            s.quit()
        except (OSError, smtplib.SMTPException) as exc:
            with lock:
                failures.append(f"smtp sender {n}: {exc!r}")

    def appender() -> None:
        try:
            m = h.imap(APPENDER)
            for i in range(3):
                tag = f"app-{i}"
                t = time.monotonic()
                typ, data = m.append("INBOX", None, None, make_message(APPENDER, APPENDER, tag))
                with lock:
                    if typ == "OK":
                        latency["imap append"].append(time.monotonic() - t)
                        acked.append(tag)
                    else:
                        failures.append(f"append {tag}: {typ} {data!r}")
            m.logout()
        except (OSError, imaplib.IMAP4.error) as exc:
            with lock:
                failures.append(f"appender: {exc!r}")

    def reader() -> None:
        # Another session reading while the writers commit: not delayed by
        # the file system, so whatever it waits for is the server's doing.
        try:
            m = h.imap(APPENDER)
            assert m.select("INBOX")[0] == "OK"
            while not writers_done.is_set():
                t = time.monotonic()
                typ, data = m.fetch("1", "(BODY.PEEK[])")
                took = time.monotonic() - t
                if typ != "OK" or b"tag slow-seed" not in data[0][1]:  # type: ignore[index]
                    with lock:
                        failures.append(f"reader fetch: {typ} {data!r:.200}")
                    return
                t = time.monotonic()
                assert m.noop()[0] == "OK"
                with lock:
                    latency["reader fetch"].append(took)
                    latency["reader noop"].append(time.monotonic() - t)
            m.logout()
        except (OSError, imaplib.IMAP4.error) as exc:
            with lock:
                failures.append(f"reader: {exc!r}")

    def impatient_smtp() -> None:
        # Logs in, sends its message, and gives up after 50 ms of waiting
        # for the 250: far less than one commit on this disk.
        tag = "smtp-gave-up"
        s = smtplib.SMTP_SSL("127.0.0.1", h.ports["submissions"], context=h.ctx, timeout=60)
        s.login(SENDER, PASSWORD)
        s.mail(SENDER)
        s.rcpt(RECIPIENT)
        assert s.sock is not None
        s.sock.settimeout(0.05)
        try:
            code, _ = s.data(make_message(SENDER, RECIPIENT, tag))
        except (TimeoutError, smtplib.SMTPServerDisconnected, ssl.SSLError):
            with lock:
                gave_up.append(tag)
            s.close()
            return
        with lock:  # answered within 50 ms after all: then it must be a 250
            (acked if code == 250 else failures).append(tag if code == 250 else f"{tag}: {code}")
        s.close()

    def impatient_append() -> None:
        tag = "app-gave-up"
        m = h.imap(APPENDER)
        m.sock.settimeout(0.05)
        try:
            typ, _ = m.append("INBOX", None, None, make_message(APPENDER, APPENDER, tag))
        except (imaplib.IMAP4.abort, OSError):  # TimeoutError is an OSError
            with lock:
                gave_up.append(tag)
            m.shutdown()
            return
        with lock:
            (acked if typ == "OK" else failures).append(tag if typ == "OK" else f"{tag}: {typ}")
        m.logout()

    writers = [threading.Thread(target=smtp_sender, args=(n,)) for n in (1, 2)]
    writers += [threading.Thread(target=appender), threading.Thread(target=impatient_smtp),
                threading.Thread(target=impatient_append)]
    read = threading.Thread(target=reader)
    read.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(120)
    writers_done.set()
    read.join(60)
    assert not any(t.is_alive() for t in [*writers, read]), "a client hung"
    assert not failures, failures
    assert len([t for t in acked if not t.endswith("gave-up")]) == 9
    assert latency["reader fetch"], "the reader never got an answer"

    # Each acked message exactly once, and opens (FETCH BODY[] decrypts it);
    # one whose client gave up at most once.
    contents = h.contents()
    inbox = sorted(contents[(RECIPIENT, "INBOX")].values())
    sent = sorted(contents[(SENDER, "Sent")].values())
    appended = sorted(contents[(APPENDER, "INBOX")].values())
    stored = inbox + appended
    for tag in acked:
        assert stored.count(tag) == 1, (tag, inbox, appended)
    for tag in gave_up:
        assert stored.count(tag) <= 1, (tag, inbox, appended)
    assert inbox == sent  # delivered and filed in Sent together, or neither
    assert set(stored) <= {*acked, *gave_up, "slow-seed"}, stored
    assert not h.ledger.problems, h.ledger.problems
    h.wait_for_sweep()
    assert h.stop() == 0
    log = h.logs[-1].read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    fsck = h.cli("fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # The slowness was real: unmount so the file system writes its counts.
    data = h.home / "data"
    subprocess.run(["umount", str(data)], check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while not stats_path.exists():
        assert time.monotonic() < deadline, "slowfs.py wrote no counts"
        time.sleep(0.05)
    counts = json.loads(stats_path.read_text())
    assert counts["fsync"] >= 12, counts  # the slow fsyncs were in the path (a run does about 60)

    def summary(xs: list[float]) -> str:
        xs = sorted(xs)
        return f"n={len(xs)} median={xs[len(xs) // 2] * 1000:.0f} ms max={xs[-1] * 1000:.0f} ms" if xs else "n=0"

    print(f"\nslow disk: fsync {FSYNC_DELAY * 1000:.0f} ms, write {WRITE_DELAY * 1000:.0f} ms; "
          f"server start {started:.1f} s; file system: {counts}")
    for name, xs in latency.items():
        print(f"  {name}: {summary(xs)}")
    print(f"  gave up: {gave_up}; of those stored: {[t for t in gave_up if t in stored]}")
