"""Fixtures for the protocol abuse suite (issue 8 item 2).

Two real servers, both reused from the protocol suites rather than started
by new code:

- ``smtp`` and ``tight``: the submission service of tests/smtpd/conftest.py
  in this process (asyncio loop in a thread, real TLS sockets on loopback),
  over the ``world`` home with its accounts; the store is at hand for
  counting what was (not) delivered and for reading the audit log.
- ``serve``: the real ``postvault serve`` subprocess of
  tests/imapd/conftest.py (``start_server``), with every listener on,
  HTTPS included, for the IMAP abuse, the brute-force and the TLS checks.
  A subprocess, so its memory can be read from /proc while it is attacked.
  Its policy.toml has small auth limits (a lock is quick to reach) and a
  high per-address limit (every test client is 127.0.0.1).

Accounts made here cost one Argon2id pass (``POSTVAULT_STORE_KDF_ITERATIONS``
is 1 for the subprocess's home, as in the IMAP tests).
"""

from __future__ import annotations

import itertools
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postvault.certs.context import client_context
from postvault.conf.load import load_config
from postvault.conf.schema import SmtpConfig
from postvault.home import init_home, open_store
from postvault.store.api import Store
from tests.imapd.client import Client
from tests.imapd.conftest import start_server, stop_server
from tests.smtpd.conftest import (  # noqa: F401
    TEST_POLICY,
    Server,
    _runtime,
    _start,
    _stop,
    ctx,
    tight,
    world,
)
from tests.support import cheap_home_env, free_port, set_policy

PASSWORD = "correct horse battery staple"
HOST = "mail.example.test"
# serve's auth limits: throttle (2 s) from the 2nd failure of one name, lock at the 4th.
THROTTLE_AFTER, LOCKOUT_AFTER = 2, 4
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def smtp(world: object, ctx: ssl.SSLContext) -> Iterator[Server]:  # noqa: F811
    """The submission service with the shipped limits and TEST_POLICY."""
    srv = _start(_runtime(world.home, TEST_POLICY, SmtpConfig()), ctx)  # type: ignore[attr-defined]
    yield srv
    _stop(srv)
    srv.runtime.close()


@dataclass
class Serve:
    """``postvault serve`` as a subprocess, and its store."""

    home: Path
    ports: dict[str, int]
    store: Store
    pid: int

    @property
    def ca(self) -> Path:
        return self.home / "certs" / "ca.pem"

    def context(self) -> ssl.SSLContext:
        return client_context(self.ca)

    def account(self, role: str = "member", invited_by: str | None = None, name: str = "") -> str:
        n = next(_counter)
        email = f"{name or role}{n}@{'dental' if role == 'member' else 'ortho'}{n}.test"
        if role == "colleague":
            inviter = invited_by or self.account("member")
            self.store.create_account(email, "colleague", f"Ortho {n}", PASSWORD, invited_by=inviter)
        else:
            self.store.create_account(email, "member", f"Dental {n}", PASSWORD)
        return email

    @property
    def sender(self) -> str:
        """One colleague shared by tests that only need mail from someone."""
        if not hasattr(self, "_sender"):
            self._sender = self.account("colleague")
        return self._sender

    def imaps(self) -> Client:
        return Client("127.0.0.1", self.ports["imaps"], self.context())

    def login(self, email: str) -> Client:
        c = self.imaps()
        assert c.response().startswith(b"* OK")
        assert c.command("l", f'LOGIN {email} "{PASSWORD}"')[-1].startswith(b"l OK")
        return c

    def rss_kib(self) -> int:
        """The server process's resident memory (Linux /proc)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert m, status
        return int(m[1])


def _small_auth_limits(home: Path) -> None:
    set_policy(home, throttle_after=THROTTLE_AFTER, lockout_after=LOCKOUT_AFTER, ip_throttle_after=100_000,
               delay_seconds=2, max_delay_seconds=2, lockout_minutes=15)


@pytest.fixture(scope="session")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    home = tmp_path_factory.mktemp("security") / "home"
    with cheap_home_env():
        init_home(home, HOST)
        _small_auth_limits(home)
        store = open_store(load_config(home))
    https = free_port()
    proc, ports, _log = start_server(home, {"POSTVAULT_LISTEN_HTTPS": f"127.0.0.1:{https}"})
    ports["https"] = https
    try:
        yield Serve(home, ports, store, proc.pid)
    finally:
        stop_server(proc)
        store.close()
