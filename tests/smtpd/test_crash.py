"""``postvault serve`` as a real subprocess: it runs until SIGTERM, and a
kill -9 at any point loses nothing that was acknowledged and leaves nothing
half-stored."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select as sql_select

from postvault.certs.context import client_context
from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from postvault.store.api import AccountSession, Store
from postvault.store.models import Message, MessageCopy

from .client import PASSWORD, Raw, message, stuff, transaction
from tests.support import free_port

SENDER, RECIPIENT = "office@crash.test", "front@crash.test"




RUNNING: list[Serve] = []


@pytest.fixture(autouse=True)
def no_server_left_behind() -> Iterator[None]:
    """A failed test must not leave a server running."""
    yield
    while RUNNING:
        serve = RUNNING.pop()
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait(30)
        if not serve.log.closed:
            serve.log.close()


class Serve:
    """``postvault serve --home HOME`` with only the submission listeners."""

    def __init__(self, home: Path, log: Path) -> None:
        self.port465, self.port587 = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
        env.update(POSTVAULT_LISTEN_IMAPS="", POSTVAULT_LISTEN_IMAP="", POSTVAULT_LISTEN_HTTPS="",
                   POSTVAULT_LISTEN_SUBMISSIONS=f"127.0.0.1:{self.port465}",
                   POSTVAULT_LISTEN_SUBMISSION=f"127.0.0.1:{self.port587}")
        exe = shutil.which("postvault")
        assert exe, "the postvault console script is not installed"
        self.log = log.open("ab")
        self.proc = subprocess.Popen([exe, "serve", "--home", str(home)], env=env, stdout=subprocess.PIPE,
                                     stderr=self.log)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        line = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline and b"\n" not in line:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                line += chunk
        self.ready = line.decode()
        RUNNING.append(self)
        assert self.ready.startswith("postvault ready: "), (self.ready, log.read_text())

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.log.close()
        return code


@pytest.fixture
def crash_home(tmp_path: Path) -> Iterator[tuple[Path, Store]]:
    home = tmp_path / "home"
    init_home(home, "mail.example.test")
    store = open_store(load_config(home, environ={}))
    store.create_account(SENDER, "member", "Crash Dental", PASSWORD)
    store.create_account(RECIPIENT, "member", "Crash Clinic", PASSWORD)
    yield home, store
    store.close()


def client(serve: Serve, home: Path) -> Raw:
    c = Raw(serve.port465, client_context(home / "certs" / "ca.pem"), implicit=True)
    c.ehlo()
    assert c.login(SENDER)[0] == 235
    return c


_logins: dict[tuple[int, str], AccountSession] = {}


def login(store: Store, email: str) -> AccountSession:
    key = (id(store), email)
    if key not in _logins:
        _logins[key] = store.login(email, PASSWORD)
    return _logins[key]


def state(store: Store) -> tuple[int, int, int, int]:
    """(messages, copies, recipient's INBOX, sender's Sent), straight from the database."""
    with store._sessions() as s:
        messages = s.scalar(sql_select(func.count()).select_from(Message))
        copies = s.scalar(sql_select(func.count()).select_from(MessageCopy))
    inbox = len(store.snapshot(login(store, RECIPIENT), "INBOX").messages)
    sent = len(store.snapshot(login(store, SENDER), "Sent").messages)
    return int(messages or 0), int(copies or 0), inbox, sent


def test_serve_runs_until_sigterm(crash_home: tuple[Path, Store], tmp_path: Path) -> None:
    home, store = crash_home
    serve = Serve(home, tmp_path / "serve.log")
    assert serve.ready.strip() == (f"postvault ready: submissions 127.0.0.1:{serve.port465}, "
                                   f"submission 127.0.0.1:{serve.port587}")
    c = client(serve, home)
    assert transaction(c, [RECIPIENT], stuff(message(SENDER, RECIPIENT)), sender=SENDER)[0] == 250
    serve.proc.send_signal(signal.SIGTERM)
    # The open session is told, then closed (RFC 5321 section 3.8).
    assert c.reply()[1] == ["421 4.3.2 The server is restarting; please try again in a minute."]
    c.close()
    assert serve.stop() == 0
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "stopped" in log


def send_big(serve: Serve, home: Path, payload: bytes) -> Raw:
    c = client(serve, home)
    for command in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", "DATA"):
        assert c.cmd(command)[0] in (250, 354)
    c.send(payload)
    return c


def test_kill_9_in_data_and_after_250(crash_home: tuple[Path, Store], tmp_path: Path) -> None:
    home, store = crash_home
    log = tmp_path / "serve.log"
    big = message(SENDER, RECIPIENT, "big", msgid="<big@crash.test>",
                  attachments=(("scan.pdf", b"%PDF" + os.urandom(3_000_000)),))
    payload = stuff(big)
    before = state(store)

    # 1. Killed in the middle of DATA: nothing is stored.
    serve = Serve(home, log)
    c = client(serve, home)
    for command in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", "DATA"):
        assert c.cmd(command)[0] in (250, 354)
    c.send(payload[: len(payload) // 2])
    time.sleep(0.3)
    serve.kill9()
    c.close()
    assert state(store) == before

    # 2. Killed right after the 250: the message is there (checked below).
    # This run also times a whole delivery, for step 3.
    serve = Serve(home, log)
    started = time.monotonic()
    c = send_big(serve, home, payload)
    code, lines = c.reply()
    took = time.monotonic() - started
    serve.kill9()
    assert code == 250, lines
    c.close()
    assert state(store)[2:] == (before[2] + 1, before[3] + 1)

    # 3. Killed while the message is being checked, sealed and committed:
    # all or nothing (both copies or neither), never half.
    for fraction in (0.6, 0.9):
        serve = Serve(home, log)
        c = send_big(serve, home, payload)
        time.sleep(took * fraction)
        serve.kill9()
        c.close()
        messages, copies, inbox, sent = state(store)
        assert copies == 2 * messages and inbox == sent == messages

    # Everything stored opens, in full.
    reader, writer = login(store, RECIPIENT), login(store, SENDER)
    inbox = [store.open_message(reader, "INBOX", m.uid).read() for m in store.snapshot(reader, "INBOX").messages]
    sent = [store.open_message(writer, "Sent", m.uid).read() for m in store.snapshot(writer, "Sent").messages]
    assert inbox == sent and len(inbox) >= 1
    assert all(b.startswith(b"Received: ") and b.endswith(big) for b in inbox)
    assert "Traceback" not in log.read_text()
