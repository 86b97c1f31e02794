"""Fixtures for the web tests: the real ``postvault serve`` as a subprocess
(``tests/web/launcher.py``: the same server with a clock the test can move)
on free loopback ports, every listener on, over a home made by
``postvault init``; an aiosmtpd sink with STARTTLS as the notification
smarthost; and a small HTTPS client that keeps cookies and reads CSRF
tokens out of forms, as a browser would.

The server runs once per test session (start-up is the slow part); each
test makes its own accounts. Argon2id runs with one pass
(``POSTVAULT_STORE_KDF_ITERATIONS=1``), as in the IMAP tests.
"""

from __future__ import annotations

import http.client
import itertools
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from postvault.certs.context import client_context
from postvault.conf.load import load_config
from postvault.conf.schema import Config
from postvault.home import init_home, open_store
from postvault.store.api import Store
from tests.outbound.sink import Certs, SinkHandler, sink, write_certs
from tests.support import cheap_home_env, free_port

PASSWORD = "correct horse battery staple"
HOST = "mail.example.test"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
_counter = itertools.count(1)
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')




@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes
    set_cookies: list[str]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def csrf(self) -> str:
        match = _CSRF.search(self.text)
        assert match, "no CSRF token in the page"
        return match[1]


@dataclass
class Client:
    """An HTTPS client with a cookie jar (one per "browser")."""

    port: int
    context: ssl.SSLContext
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=30)
        hdrs = {"Host": f"{HOST}:{self.port}", **(headers or {})}
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        raw_cookies = resp.headers.get_all("Set-Cookie") or []
        for raw in raw_cookies:
            jar: SimpleCookie = SimpleCookie()
            jar.load(raw)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return Reply(resp.status, resp.headers, data, raw_cookies)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, form: dict[str, str], csrf: str | None = None) -> Reply:
        data = dict(form)
        if csrf is not None:
            data["csrf"] = csrf
        return self.request("POST", path, urlencode(data).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})

    def submit(self, page: str, action: str, form: dict[str, str]) -> Reply:
        """GET the page, then POST its form with its CSRF token, as a browser does."""
        return self.post(action, form, self.get(page).csrf())

    def login(self, email: str, password: str = PASSWORD) -> Reply:
        reply = self.submit("/login", "/login", {"email": email, "password": password})
        assert reply.status == 303, reply.text
        return reply


@dataclass
class Server:
    home: Path
    ports: dict[str, int]
    store: Store
    config: Config
    proc: subprocess.Popen[str]
    log: Path
    clock_file: Path
    sink: SinkHandler
    certs: Certs

    @property
    def https(self) -> int:
        return self.ports["https"]

    @property
    def ca(self) -> Path:
        return self.home / "certs" / "ca.pem"

    def context(self) -> ssl.SSLContext:
        # The project's own client context: verifies the dev CA and the name
        # (the certificate carries localhost and 127.0.0.1).
        return client_context(self.ca)

    def client(self) -> Client:
        return Client(self.https, self.context())

    def account(self, role: str = "member", invited_by: str | None = None, practice: str = "") -> str:
        n = next(_counter)
        email = f"{role}{n}@{'dental' if role == 'member' else 'ortho'}{n}.test"
        if role == "colleague":
            inviter = invited_by or self.account("member")
            self.store.create_account(email, "colleague", practice or f"Ortho {n}", PASSWORD, invited_by=inviter)
        else:
            self.store.create_account(email, "member", practice or f"Dental {n}", PASSWORD)
        return email

    def move_clock(self, seconds: float) -> None:
        self.clock_file.write_text(str(seconds))

    def wait_for_mail(self, predicate: Any, timeout: float = 30.0) -> Any:
        """The first message at the sink that ``predicate`` accepts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for got in list(self.sink.received):
                if predicate(got):
                    return got
            time.sleep(0.2)
        raise AssertionError("no such mail arrived at the sink")


def _env(ports: dict[str, int], clock_file: Path, relay_port: int, certs: Certs) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    env.update({
        "POSTVAULT_STORE_KDF_ITERATIONS": "1",
        "POSTVAULT_LISTEN_IMAPS": f"127.0.0.1:{ports['imaps']}",
        "POSTVAULT_LISTEN_IMAP": f"127.0.0.1:{ports['imap']}",
        "POSTVAULT_LISTEN_SUBMISSIONS": f"127.0.0.1:{ports['submissions']}",
        "POSTVAULT_LISTEN_SUBMISSION": f"127.0.0.1:{ports['submission']}",
        "POSTVAULT_LISTEN_HTTPS": f"127.0.0.1:{ports['https']}",
        "POSTVAULT_NOTIFY_RELAY": f"127.0.0.1:{relay_port}",
        "POSTVAULT_NOTIFY_RELAY_CA": str(certs.ca),
        "PV_TEST_WEB_CLOCK_FILE": str(clock_file),
        "POSTVAULT_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    })
    return env


def cli_env(home: Path) -> dict[str, str]:
    """The environment for ``postvault`` CLI commands on the test home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    env.update({"POSTVAULT_STORE_KDF_ITERATIONS": "1", "POSTVAULT_HOME": str(home)})
    return env


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("web")
    home = base / "home"
    certs = write_certs(base / "sink-certs")
    with cheap_home_env():
        init_home(home, HOST)
        config = load_config(home)
        store = open_store(config)
    clock_file = base / "clock"
    clock_file.write_text("0")
    with sink(certs) as (handler, relay_port):
        ports = {k: free_port() for k in ("imaps", "imap", "submissions", "submission", "https")}
        log = base / "serve.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.web.launcher", "serve", "--home", str(home)],
                env=_env(ports, clock_file, relay_port, certs), stdout=subprocess.PIPE, stderr=err, text=True,
                cwd=ROOT)
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line or line.startswith("postvault ready"):
                    break
            if proc.poll() is not None or not line.startswith("postvault ready"):
                raise RuntimeError("postvault serve did not start:\n" + log.read_text())
            yield Server(home, ports, store, config, proc, log, clock_file, handler, certs)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            store.close()


@pytest.fixture
def clock(server: Server) -> Iterator[Server]:
    """The server, with its web clock put back to real time afterwards."""
    yield server
    server.move_clock(0)


@pytest.fixture
def member(server: Server) -> str:
    return server.account("member")


@pytest.fixture
def web(server: Server) -> Client:
    return server.client()
