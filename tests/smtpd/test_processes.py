"""``[smtp] processes = 2``: the real ``postvault serve`` with one
submission worker process (``smtpd/workers.py``) beside the main one, over
real TLS on loopback and one SQLite file.

Which process served a session is read from the server's log: with
several processes every line carries "[main pid P]" or "[smtp N pid P]",
and a session's "connect" and "accepted queue_id=..." lines name its
listener and queue id (no message content). IDLE's poll of the database is
set to an hour, so an IDLE session that hears a message at all within
these waits heard the worker's relayed change notice.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postvault.conf.load import load_config
from postvault.errors import ConfigError
from postvault.home import init_home, open_store
from tests.imapd.conftest import Server, start_server, stop_server
from tests.imapd.test_imaplib import raw_session, read_until
from tests.pgcluster import Cluster
from tests.support import cheap_home_env, set_policy

from .client import PASSWORD, Raw, message, stuff, transaction

HOST = "mail.example.test"
SENDER, RECIPIENT = "office@procs.test", "front@procs.test"
LOCKED = "locked@procs.test"
WAIT = 15.0  # generous, for a loaded machine; the IDLE wake-up itself is held to 1 s
TAG = re.compile(r" INFO \[(main|smtp \d+) pid (\d+)\] ")


def _home(tmp: Path) -> Path:
    home = tmp / "home"
    with cheap_home_env():
        init_home(home, HOST)
    # Small login limits, reached quickly (as tests/imapd/test_multinode.py).
    set_policy(home, throttle_after=3, lockout_after=3, ip_throttle_after=1000)
    return home


def _serve(home: Path, processes: int = 2) -> Server:
    with cheap_home_env():
        store = open_store(load_config(home))
    proc, ports, log = start_server(home, {"POSTVAULT_SMTP_PROCESSES": str(processes),
                                           "POSTVAULT_IMAP_IDLE_POLL_SECONDS": "3600"})
    return Server(home, ports["imaps"], ports["imap"], ports["submissions"], ports["submission"], store, proc, log)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = _home(tmp_path_factory.mktemp("procs"))
    server = _serve(home)
    for email in (SENDER, RECIPIENT, LOCKED):
        server.store.create_account(email, "member", email.split("@")[0].title(), PASSWORD)
    try:
        yield server
    finally:
        stop_server(server.proc)
        server.store.close()
    assert server.proc.returncode == 0, server.log.read_text()


def lines(server: Server) -> list[str]:
    return server.log.read_text("utf-8", errors="replace").splitlines()


def who(line: str) -> str | None:
    """The process that wrote a log line: "main" or "smtp N"."""
    found = TAG.search(line)
    return found.group(1) if found else None


def workers(server: Server) -> list[int]:
    """The pids of the main process's children (its submission workers)."""
    pid = server.proc.pid
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def connect(server: Server, implicit: bool) -> Raw:
    return Raw(server.submissions if implicit else server.submission, server.context(), implicit=implicit)


def accepted_by(server: Server, queue_id: str, seconds: float = WAIT) -> str:
    """Which process logged the acceptance of ``queue_id``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for line in lines(server):
            if f"accepted queue_id={queue_id} " in line:
                process = who(line)
                assert process is not None, line
                return process
        time.sleep(0.05)
    raise AssertionError(f"no log line for queue id {queue_id}")


def send_one(server: Server, c: Raw, n: int, sender: str = SENDER, rcpt: str = RECIPIENT) -> str:
    """One message over a logged-in session; its queue id."""
    code, reply = transaction(c, [rcpt], stuff(message(sender, rcpt, f"procs {n}", msgid=f"<p{n}@procs.test>")),
                              sender=sender)
    assert code == 250, reply
    found = re.search(r"queue id (\S+)$", reply[-1])
    assert found, reply
    return found.group(1)


def test_both_ports_are_served_by_both_processes(two: Server) -> None:
    assert len(workers(two)) == 1
    # "postvault ready" came only after the worker listened: its line is
    # in the log before the main process's.
    readies = [who(ln) for ln in lines(two) if re.search(r"\] postvault\.\S+: ready: ", ln)]
    assert readies[:2] == ["smtp 1", "main"], readies
    seen: set[tuple[str, str]] = set()
    wanted = {(p, k) for p in ("main", "smtp 1") for k in ("submissions", "submission")}
    start = len(lines(two))
    for n in range(80):
        implicit = n % 2 == 0
        c = connect(two, implicit)
        assert c.greeting[0] == 220
        c.ehlo()
        c.cmd("QUIT")
        c.close()
        if n % 8 == 7:
            time.sleep(0.2)  # let the log lines land
            for line in lines(two)[start:]:
                found = re.search(r" connect ip=\S+ listener=(\S+)", line)
                if found and who(line):
                    seen.add((who(line) or "", found.group(1)))
            if wanted <= seen:
                break
    assert wanted <= seen, seen


def test_idle_in_the_main_process_hears_a_message_filed_by_the_worker(two: Server) -> None:
    idle_hears_both(two)


def idle_hears_both(two: Server) -> None:
    """An IDLE session (in the main process) hears messages filed by
    either process within a second of their 250."""
    idler = raw_session(two, RECIPIENT)
    lines_ = idler.command("s", "SELECT INBOX")
    exists = next(int(m.group(1)) for ln in lines_ if (m := re.match(rb"\* (\d+) EXISTS", ln)))
    idler.send(b"i IDLE\r\n")
    assert idler.response() == b"+ idling"
    by: dict[str, float] = {}
    for n in range(40):
        c = connect(two, implicit=True)
        c.ehlo()
        assert c.login(SENDER)[0] == 235
        queue_id = send_one(two, c, 1000 + n)
        acked = time.monotonic()
        exists += 1
        read_until(idler, f"* {exists} EXISTS".encode(), WAIT)
        waited = time.monotonic() - acked
        c.cmd("QUIT")
        c.close()
        process = accepted_by(two, queue_id)
        by.setdefault(process, waited)
        if "smtp 1" in by and "main" in by:
            break
    assert set(by) == {"main", "smtp 1"}, by
    assert by["smtp 1"] < 1.0, by
    idler.send(b"DONE\r\n")


def test_on_postgresql_the_worker_is_heard_by_notify(tmp_path: Path, pg_cluster: Cluster) -> None:
    """On PostgreSQL nothing is relayed: the worker's LISTEN/NOTIFY bus
    (pgnotify.py) tells the main process."""
    home = tmp_path / "home"
    with cheap_home_env():
        init_home(home, HOST, {"store.url": pg_cluster.new_database(), "store.blobs": "database"})
    server = _serve(home)
    try:
        for email in (SENDER, RECIPIENT):
            server.store.create_account(email, "member", email.split("@")[0].title(), PASSWORD)
        idle_hears_both(server)
        assert "hearing other nodes' changes" in server.log.read_text()
    finally:
        stop_server(server.proc)
        server.store.close()
    assert server.proc.returncode == 0, server.log.read_text()


def test_ten_clients_fifty_messages_across_processes(two: Server) -> None:
    sender, rcpt = "bulk@procs.test", "bulk-in@procs.test"
    two.store.create_account(sender, "member", "Bulk", PASSWORD)
    two.store.create_account(rcpt, "member", "Bulk Inbox", PASSWORD)
    clients, count = 10, 50
    barrier = threading.Barrier(clients)
    queue_ids: list[str] = []

    def client(n: int) -> list[str]:
        c = connect(two, implicit=n % 2 == 1)
        if n % 2 == 0:
            c.ehlo()
            c.starttls()
        c.ehlo()
        assert c.login(sender)[0] == 235
        barrier.wait(60)
        ids = []
        for m in range(count):
            payload = stuff(message(sender, rcpt, f"#{n}/{m}", msgid=f"<c{n}-m{m}@procs.test>",
                                    body=f"client {n} message {m}\n" + "x" * (m * 97 % 3000)))
            code, reply = transaction(c, [rcpt], payload, sender=sender)
            assert code == 250, reply
            queue_ids.append(reply[-1])
            ids.append(f"<c{n}-m{m}@procs.test>")
        c.cmd("QUIT")
        c.close()
        return ids

    with ThreadPoolExecutor(clients) as pool:
        sent = [i for ids in pool.map(client, range(clients)) for i in ids]
    assert len(set(sent)) == clients * count

    session = {e: two.store.login(e, PASSWORD) for e in (sender, rcpt)}
    for email, mailbox in ((rcpt, "INBOX"), (sender, "Sent")):
        metas = two.store.snapshot(session[email], mailbox).messages
        uids = [m.uid for m in metas]
        assert uids == list(range(1, clients * count + 1)), mailbox
        assert len({m.message_id for m in metas}) == len(metas)
        modseqs = [m.modseq for m in metas]
        assert modseqs == sorted(set(modseqs)), mailbox  # unique, rising with the UIDs
    got = []
    for meta in two.store.snapshot(session[rcpt], "INBOX").messages:
        with two.store.open_message(session[rcpt], "INBOX", meta.uid) as reader:
            head = reader.read()[:4096]
        found = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", head)
        assert found
        got.append(found.group(1).decode())
    assert sorted(got) == sorted(sent)
    # Both processes filed some of them.
    accepted = {who(ln) for ln in lines(two) if " accepted queue_id=" in ln and "recipients=1" in ln}
    assert {"main", "smtp 1"} <= accepted
    assert "database is locked" not in two.log.read_text()
    # The audit log is still one valid chain.
    verify = subprocess.run([sys.executable, "-m", "postvault.cli.main", "audit", "verify", "--home", str(two.home)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert verify.returncode == 0, (verify.stdout, verify.stderr)


def test_lockout_holds_in_every_process(two: Server) -> None:
    for _ in range(3):
        c = connect(two, implicit=True)
        c.ehlo()
        assert c.login(LOCKED, "wrong password")[0] == 535
        c.close()
    start = len(lines(two))
    refused: set[str | None] = set()
    for _ in range(30):
        c = connect(two, implicit=True)
        c.ehlo()
        code, reply = c.login(LOCKED)
        c.close()
        assert code != 235, reply
        time.sleep(0.1)
        refused = {who(ln) for ln in lines(two)[start:] if "auth limited" in ln}
        if {"main", "smtp 1"} <= refused:
            break
    assert {"main", "smtp 1"} <= refused, refused


def test_sighup_reloads_every_process(two: Server) -> None:
    start = len(lines(two))
    two.proc.send_signal(signal.SIGHUP)
    done: set[str | None] = set()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not {"main", "smtp 1"} <= done:
        time.sleep(0.1)
        done = {who(ln) for ln in lines(two)[start:] if "reload done: ok" in ln}
    assert {"main", "smtp 1"} <= done, done
    # Still serving on both ports afterwards.
    for implicit in (True, False):
        c = connect(two, implicit)
        assert c.greeting[0] == 220
        c.close()


def test_proxy_protocol_listener_in_every_process(tmp_path: Path) -> None:
    from tests.proxy_clients import ProxiedSMTP, v1, v2

    home = _home(tmp_path)
    with cheap_home_env():
        store = open_store(load_config(home))
    proc, ports, log = start_server(home, {"POSTVAULT_SMTP_PROCESSES": "2",
                                           "POSTVAULT_PROXY_LISTENERS": "submissions, submission",
                                           "POSTVAULT_PROXY_TRUSTED": "127.0.0.1"})
    server = Server(home, ports["imaps"], ports["imap"], ports["submissions"], ports["submission"], store, proc, log)
    try:
        seen: set[tuple[str | None, str]] = set()
        for n in range(60):
            client = f"192.0.2.{n % 2 + 7}"
            header = (v1 if n % 2 else v2)(client, dport=server.submissions)
            smtp = ProxiedSMTP(server.submissions, header, server.context())
            assert smtp.ehlo()[0] == 250
            smtp.quit()
            time.sleep(0.05)
            seen = {(who(ln), m.group(1)) for ln in lines(server) if (m := re.search(r" connect ip=(\S+) ", ln))}
            if {("main", "192.0.2.7"), ("smtp 1", "192.0.2.7")} <= seen or \
                    {("main", "192.0.2.8"), ("smtp 1", "192.0.2.8")} <= seen:
                break
        # Both processes read the header: each logged a client's address, never the proxy's.
        assert {p for p, _ in seen} == {"main", "smtp 1"}, seen
        assert all(ip.startswith("192.0.2.") for _, ip in seen), seen
    finally:
        stop_server(proc)
        store.close()
    assert proc.returncode == 0, log.read_text()


def test_config_refuses_a_bad_process_count(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with cheap_home_env():
        init_home(home, HOST)
    for bad in ("0", "65", "two"):
        with pytest.raises(ConfigError) as err:
            load_config(home, environ={"POSTVAULT_SMTP_PROCESSES": bad})
        assert "smtp.processes" in str(err.value) and "\n" not in str(err.value)
    assert load_config(home, environ={}).smtp.processes == 1
    conf = home / "conf" / "postvault.toml"
    conf.write_text(conf.read_text("utf-8").replace("processes = 1", "processes = 0"), "utf-8")
    run = subprocess.run([sys.executable, "-m", "postvault.cli.main", "serve", "--home", str(home)],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")})
    assert run.returncode != 0
    assert "smtp.processes" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr


# -- each test below starts and stops its own server ---------------------------------------------


def test_sigterm_drains_every_process(tmp_path: Path) -> None:
    server = _serve(_home(tmp_path))
    try:
        server.store.create_account(SENDER, "member", "Office", PASSWORD)
        server.store.create_account(RECIPIENT, "member", "Front", PASSWORD)
        pids = workers(server)
        assert len(pids) == 1
        open_: list[Raw] = []
        for n in range(40):
            c = connect(server, implicit=True)
            c.ehlo()
            open_.append(c)
            time.sleep(0.05)
            tags = {who(ln) for ln in lines(server) if " connect ip=" in ln}
            if {"main", "smtp 1"} <= tags and len(open_) >= 4:
                break
        assert {"main", "smtp 1"} <= tags
        # One session in the middle of a transaction; its message is still filed.
        busy = connect(server, implicit=True)
        busy.ehlo()
        assert busy.login(SENDER)[0] == 235
        assert busy.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert busy.cmd(f"RCPT TO:<{RECIPIENT}>")[0] == 250
        server.proc.send_signal(signal.SIGTERM)
        for c in open_:
            assert c.reply()[1] == ["421 4.3.2 The server is restarting; please try again in a minute."]
            c.close()
        assert busy.cmd("DATA")[0] == 354
        busy.send(stuff(message(SENDER, RECIPIENT, "last one")))
        code, reply = busy.reply()
        assert code == 250, reply
        busy.close()
        assert server.proc.wait(60) == 0
        assert not Path(f"/proc/{pids[0]}").exists() or "zombie" in Path(f"/proc/{pids[0]}/status").read_text()
        log = server.log.read_text()
        assert "Traceback" not in log
        stopped = {who(ln) for ln in log.splitlines() if ln.endswith(": stopped")}
        assert {"main", "smtp 1"} <= stopped, stopped
        session = server.store.login(RECIPIENT, PASSWORD)
        assert len(server.store.snapshot(session, "INBOX").messages) == 1
    finally:
        stop_server(server.proc)
        server.store.close()


def test_a_killed_worker_loses_nothing_acknowledged_and_is_started_again(tmp_path: Path) -> None:
    server = _serve(_home(tmp_path))
    try:
        server.store.create_account(SENDER, "member", "Office", PASSWORD)
        server.store.create_account(RECIPIENT, "member", "Front", PASSWORD)
        (old,) = workers(server)
        acked: list[str] = []
        stop = threading.Event()

        def load(n: int) -> None:
            m = 0
            while not stop.is_set() and m < 200:
                try:
                    with smtplib.SMTP_SSL("127.0.0.1", server.submissions, context=server.context(),
                                          timeout=30) as smtp:
                        smtp.login(SENDER, PASSWORD)
                        while not stop.is_set() and m < 200:
                            msgid = f"<k{n}-{m}@procs.test>"
                            m += 1
                            smtp.sendmail(SENDER, [RECIPIENT], message(SENDER, RECIPIENT, "k", msgid=msgid))
                            acked.append(msgid)  # only after the 250
                except (smtplib.SMTPException, OSError):
                    pass  # this session was on the killed worker; start another

        threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not [p for p in workers(server) if p != old]:
            time.sleep(0.2)
        new = [p for p in workers(server) if p != old]
        assert new, server.log.read_text()[-3000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "listens again" not in server.log.read_text():
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(120)
        log = server.log.read_text()
        assert "ended unexpectedly" in log and "listens again" in log
        session = server.store.login(RECIPIENT, PASSWORD)
        stored = set()
        for meta in server.store.snapshot(session, "INBOX").messages:
            with server.store.open_message(session, "INBOX", meta.uid) as reader:
                found = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", reader.read()[:4096])
            assert found
            stored.add(found.group(1).decode())
        assert acked and set(acked) <= stored
        # The new worker serves: sessions reach it.
        start = len(lines(server))
        served = set()
        for n in range(60):
            c = connect(server, implicit=n % 2 == 0)
            c.close()
            time.sleep(0.05)
            served = {int(m.group(2)) for ln in lines(server)[start:] if " connect ip=" in ln
                      if (m := TAG.search(ln))}
            if new[0] in served:
                break
        assert new[0] in served
    finally:
        stop_server(server.proc)
        server.store.close()


def test_workers_stop_when_the_main_process_dies(tmp_path: Path) -> None:
    import socket

    server = _serve(_home(tmp_path))
    try:
        (worker,) = workers(server)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        # The worker hears its control socket close, stops listening and exits.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
            time.sleep(0.1)
        assert not Path(f"/proc/{worker}").exists()
        # Nothing holds the port any more: a new server could bind it.
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", server.submissions))
            s.listen()
    finally:
        stop_server(server.proc)
        server.store.close()


def test_a_worker_that_keeps_dying_is_left_down_and_the_rest_serves(tmp_path: Path) -> None:
    from postvault.smtpd.workers import RESTARTS

    server = _serve(_home(tmp_path))
    try:
        server.store.create_account(SENDER, "member", "Office", PASSWORD)
        server.store.create_account(RECIPIENT, "member", "Front", PASSWORD)
        killed: set[int] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "not starting it again" not in server.log.read_text():
            for pid in workers(server):
                if pid not in killed:  # each start of the worker is killed once
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.3)
        log = server.log.read_text()
        assert "not starting it again" in log, log[-3000:]
        assert log.count("ended unexpectedly") == RESTARTS - 1
        time.sleep(1.5)
        assert workers(server) == []
        # The main process still serves.
        c = connect(server, implicit=True)
        c.ehlo()
        assert c.login(SENDER)[0] == 235
        send_one(server, c, 1)
        c.close()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
    finally:
        stop_server(server.proc)
        server.store.close()


def test_control_frames_round_trip_and_refuse_what_is_not_ours() -> None:
    import asyncio
    import struct

    from postvault.smtpd.workers import MAX_FRAME, frame, read_frame
    from postvault.store.notify import Change
    from postvault.store.pgnotify import decode, encode

    change = Change(7, "Ünbox", "exists", (1, 2, 3, 9))

    async def read(data: bytes) -> list[object]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out: list[object] = []
        while (message := await read_frame(reader)) is not None:
            out.append(message)
        return out

    got = asyncio.run(read(frame({"t": "ready"}) + frame({"t": "change", "p": encode("w1", change)})))
    assert got[0] == {"t": "ready"}
    assert decode(got[1]["p"]) == ("w1", change)  # type: ignore[index]
    # A frame cut short by the worker's death is the end, not an error.
    assert asyncio.run(read(frame({"t": "ready"})[:-2])) == []
    with pytest.raises(ValueError):
        asyncio.run(read(struct.pack(">I", MAX_FRAME + 1)))
    with pytest.raises(TypeError):
        asyncio.run(read(struct.pack(">I", 2) + b"[]"))
    with pytest.raises(ValueError):
        asyncio.run(read(struct.pack(">I", 3) + b"{x}"))
