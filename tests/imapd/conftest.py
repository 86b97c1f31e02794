"""Fixtures for the IMAP tests: the real ``postvault serve`` as a subprocess
on free loopback ports (``POSTVAULT_LISTEN_*`` overrides, HTTPS off), over
a home made by ``postvault init``; accounts made through the store in this
process (the store, SQLite or with ``--db postgresql`` PostgreSQL, is
shared between the two processes).

The server runs once per test session; each test makes its own accounts,
so tests never see each other's mail. Argon2id runs with one pass here
(``POSTVAULT_STORE_KDF_ITERATIONS=1``) to keep account creation quick; the
memory cost is the shipped one.
"""

from __future__ import annotations

import itertools
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postvault.certs.context import client_context
from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from postvault.store.api import Store
from tests.support import cheap_home_env, free_port

PASSWORD = "correct horse battery staple"
HOST = "mail.example.test"
_counter = itertools.count(1)




@dataclass
class Server:
    home: Path
    imaps: int
    imap: int
    submissions: int
    submission: int
    store: Store
    proc: subprocess.Popen[str]
    log: Path

    @property
    def ca(self) -> Path:
        return self.home / "certs" / "ca.pem"

    def context(self) -> ssl.SSLContext:
        # The project's own client context: verifies the dev CA and the name
        # (the certificate carries localhost and 127.0.0.1).
        return client_context(self.ca)

    @property
    def sender(self) -> str:
        """One colleague shared by tests that only need mail from someone."""
        if not hasattr(self, "_sender"):
            self._sender = self.account("colleague")
        return self._sender

    def account(self, role: str = "member", invited_by: str | None = None, name: str = "") -> str:
        """A fresh account; colleagues are invited by ``invited_by``."""
        n = next(_counter)
        email = f"{name or role}{n}@{'dental' if role == 'member' else 'ortho'}{n}.test"
        if role == "colleague":
            inviter = invited_by or self.account("member")
            self.store.create_account(email, "colleague", f"Ortho {n}", PASSWORD, invited_by=inviter)
        else:
            self.store.create_account(email, "member", f"Dental {n}", PASSWORD)
        return email


def _env(home: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    env.update({
        "POSTVAULT_STORE_KDF_ITERATIONS": "1",
        "POSTVAULT_LISTEN_IMAPS": f"127.0.0.1:{ports['imaps']}",
        "POSTVAULT_LISTEN_IMAP": f"127.0.0.1:{ports['imap']}",
        "POSTVAULT_LISTEN_SUBMISSIONS": f"127.0.0.1:{ports['submissions']}",
        "POSTVAULT_LISTEN_SUBMISSION": f"127.0.0.1:{ports['submission']}",
        "POSTVAULT_LISTEN_HTTPS": "",
        "POSTVAULT_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def start_server(home: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], dict[str, int], Path]:
    """Start ``postvault serve``; a free port can be taken by someone else
    before the server binds it, so a failed start is retried on new ports."""
    for attempt in range(3):
        try:
            return _start_once(home, extra_env)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_once(home: Path, extra_env: dict[str, str] | None) -> tuple[subprocess.Popen[str], dict[str, int], Path]:
    ports = {k: free_port() for k in ("imaps", "imap", "submissions", "submission")}
    env = _env(home, ports)
    env.update(extra_env or {})
    log = home / f"serve-{ports['imaps']}.log"
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "postvault.cli.main", "serve", "--home", str(home)],
                            env=env, stdout=subprocess.PIPE, stderr=out, text=True)
    assert proc.stdout is not None
    # readline() would wait forever on a server that hangs before saying
    # anything; the timer's kill ends the wait with end-of-file.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("postvault ready"):
                return proc, ports, log
    finally:
        watchdog.cancel()
    proc.kill()
    proc.wait()
    raise RuntimeError("postvault serve did not start:\n" + log.read_text())


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, store_overrides: Callable[[], dict[str, str]]) -> Iterator[Server]:
    yield from _server(tmp_path_factory, store_overrides, allow_user_folders=False)


@pytest.fixture(scope="session")
def folders_server(tmp_path_factory: pytest.TempPathFactory,
                   store_overrides: Callable[[], dict[str, str]]) -> Iterator[Server]:
    """A server whose policy.toml allows user folders (CREATE, DELETE,
    RENAME of folders of one's own)."""
    yield from _server(tmp_path_factory, store_overrides, allow_user_folders=True)


# The shared servers fill no search index after login ([imap]
# index_on_login): tests that look at when entries are written
# (test_search_index.py, test_header_cache.py) would race the fill;
# test_index_fill.py starts its own server with the fill on.
NO_FILL = {"POSTVAULT_IMAP_INDEX_ON_LOGIN": "false"}


def _server(tmp_path_factory: pytest.TempPathFactory, store_overrides: Callable[[], dict[str, str]],
            allow_user_folders: bool, extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("imap") / "home"
    with cheap_home_env():
        init_home(home, HOST, store_overrides())
        store = open_store(load_config(home))
    if allow_user_folders:
        policy = home / "conf" / "policy.toml"
        text = policy.read_text("utf-8")
        assert "allow_user_folders = false" in text
        policy.write_text(text.replace("allow_user_folders = false", "allow_user_folders = true"), "utf-8")
    proc, ports, log = start_server(home, NO_FILL if extra_env is None else extra_env)
    try:
        yield Server(home, ports["imaps"], ports["imap"], ports["submissions"], ports["submission"], store, proc,
                     log)
    finally:
        stop_server(proc)
        store.close()


@pytest.fixture
def member(server: Server) -> str:
    return server.account("member")


@pytest.fixture
def colleague(server: Server, member: str) -> str:
    return server.account("colleague", invited_by=member)
