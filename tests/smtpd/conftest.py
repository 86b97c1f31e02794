"""Fixtures for the submission tests: one home folder made by ``init_home``
with a few accounts, and the real ``SubmissionService`` on an asyncio loop
in a background thread, listening on free 127.0.0.1 ports with the home's
real TLS certificate. Clients connect over real sockets.

Two servers share the home and its SQLite store: ``server`` with the
shipped limits, and ``tight`` with small ones (size, recipients, errors,
commands, idle time, connections per address) so that each limit can be
reached quickly.

Accounts cost an Argon2id and a bcrypt hash each, so they are made once
per test session; tests that change an account's state (lockout) get their
own account.
"""

from __future__ import annotations

import asyncio
import dataclasses
import smtplib
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from postvault.certs.context import client_context
from postvault.conf.schema import Endpoint, SmtpConfig
from postvault.home import init_home
from postvault.policy.load import PolicyHolder
from postvault.policy.schema import KiB, AttachmentPolicy, AuthPolicy, OfficeException, Policy
from postvault.runtime import Runtime
from postvault.smtpd.service import SubmissionService
from postvault.store.api import AccountSession, MessageMeta, Store

from .client import PASSWORD, Raw

HOST = "mail.example.test"
MEMBER, MEMBER2, COLLEAGUE, OUTSIDER = "office@dental.test", "front@clinic.test", "dr@ortho.test", "lab@lab.test"
NOT_INVITED, PENDING = "notyet@ortho.test", "new@ortho.test"

TEST_POLICY = Policy(
    # Small auth limits so a lockout is quick to reach; a high per-address
    # limit, since every test client comes from 127.0.0.1.
    auth=AuthPolicy(throttle_after=3, lockout_after=3, ip_throttle_after=100_000),
    offices=MappingProxyType({MEMBER: OfficeException(allow_extensions=frozenset({"img"}))}),
)
TIGHT_POLICY = dataclasses.replace(
    TEST_POLICY, attachments=AttachmentPolicy(max_size=32 * KiB, max_message_size=64 * KiB))
TIGHT_LIMITS = SmtpConfig(max_recipients=3, max_commands=40, max_errors=4, idle_timeout_seconds=2,
                          max_connections_per_ip=3)


@dataclass
class Server:
    runtime: Runtime
    service: SubmissionService
    loop: asyncio.AbstractEventLoop
    ctx: ssl.SSLContext
    _pool: dict[str, Raw] = field(default_factory=dict)

    @property
    def port465(self) -> int:
        return self.service.bound["submissions"][1]

    @property
    def port587(self) -> int:
        return self.service.bound["submission"][1]

    def smtps(self, user: str | None = MEMBER) -> smtplib.SMTP_SSL:
        client = smtplib.SMTP_SSL("localhost", self.port465, context=self.ctx, timeout=30)
        if user:
            client.login(user, PASSWORD)
        return client

    def starttls(self, user: str | None = MEMBER) -> smtplib.SMTP:
        client = smtplib.SMTP("localhost", self.port587, timeout=30)
        client.starttls(context=self.ctx)
        if user:
            client.login(user, PASSWORD)
        return client

    def raw(self, *, implicit: bool = True, user: str | None = None) -> Raw:
        client = Raw(self.port465 if implicit else self.port587, self.ctx, implicit=implicit)
        if user:
            client.ehlo()
            code, lines = client.login(user)
            assert code == 235, lines
        return client

    def session(self, user: str) -> Raw:
        """A logged-in connection on 465, kept open across tests (bcrypt at
        cost 12 makes every AUTH cost a quarter second). Reset with RSET;
        replaced if the server closed it (e.g. after too many errors)."""
        client = self._pool.get(user)
        # Well before the server's limit of refused commands (20).
        if client is not None and client.errors < 10:
            try:
                if client.cmd("RSET")[0] == 250:
                    return client
            except OSError:
                pass
            client.close()
        client = self._pool[user] = self.raw(user=user)
        return client

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@dataclass
class World:
    home: Path
    store: Store
    ca: Path
    tokens: dict[str, str]
    _sessions: dict[str, AccountSession] = field(default_factory=dict)

    def session(self, email: str) -> AccountSession:
        if email not in self._sessions:
            self._sessions[email] = self.store.login(email, PASSWORD)
        return self._sessions[email]

    def messages(self, email: str, mailbox: str = "INBOX") -> tuple[MessageMeta, ...]:
        return self.store.snapshot(self.session(email), mailbox).messages

    def count(self, email: str, mailbox: str = "INBOX") -> int:
        return len(self.messages(email, mailbox))

    def read(self, email: str, uid: int | None = None, mailbox: str = "INBOX") -> bytes:
        """A stored message, by default the newest."""
        if uid is None:
            uid = self.messages(email, mailbox)[-1].uid
        with self.store.open_message(self.session(email), mailbox, uid) as reader:
            return reader.read()


def _start(runtime: Runtime, ctx: ssl.SSLContext) -> Server:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="smtpd-test-loop", daemon=True)
    thread.start()
    service = SubmissionService(runtime)
    server = Server(runtime, service, loop, ctx)
    server.call(service.start())
    return server


def _stop(server: Server) -> None:
    for client in server._pool.values():
        client.close()
    if server.service.servers:
        server.call(server.service.stop(0.5))
    server.call(server.loop.shutdown_default_executor())
    server.loop.call_soon_threadsafe(server.loop.stop)


def _runtime(home: Path, policy: Policy, limits: SmtpConfig) -> Runtime:
    runtime = Runtime.open(home)
    local = Endpoint("127.0.0.1", 0)
    runtime.config = dataclasses.replace(
        runtime.config, smtp=limits,
        listen=dataclasses.replace(runtime.config.listen, submissions=local, submission=local))
    runtime.policy = PolicyHolder(policy)
    return runtime


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, store_overrides: Callable[[], dict[str, str]]) -> Iterator[World]:
    mp = pytest.MonkeyPatch()
    for var in list(__import__("os").environ):
        if var.startswith("POSTVAULT_"):
            mp.delenv(var)
    home = tmp_path_factory.mktemp("smtpd") / "home"
    init_home(home, HOST, store_overrides())
    runtime = Runtime.open(home)
    store = runtime.store
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD, "America/New_York")
    store.create_account(MEMBER2, "member", "Family Clinic", PASSWORD)
    store.create_account(COLLEAGUE, "colleague", "Ortho Partners", PASSWORD, invited_by=MEMBER)
    store.create_account(OUTSIDER, "colleague", "Dental Lab", PASSWORD, invited_by=MEMBER2)
    store.add_contact(MEMBER, NOT_INVITED)
    token = store.invite(MEMBER, PENDING)
    assert token
    yield World(home, store, home / "certs" / "ca.pem", {PENDING: token})
    runtime.close()
    mp.undo()


@pytest.fixture(scope="session")
def ctx(world: World) -> ssl.SSLContext:
    return client_context(world.ca)


@pytest.fixture(scope="session")
def server(world: World, ctx: ssl.SSLContext) -> Iterator[Server]:
    srv = _start(_runtime(world.home, TEST_POLICY, SmtpConfig()), ctx)
    yield srv
    _stop(srv)
    srv.runtime.close()


@pytest.fixture(scope="session")
def tight(world: World, ctx: ssl.SSLContext) -> Iterator[Server]:
    srv = _start(_runtime(world.home, TIGHT_POLICY, TIGHT_LIMITS), ctx)
    yield srv
    _stop(srv)
    srv.runtime.close()


@pytest.fixture
def fresh_server(world: World, ctx: ssl.SSLContext) -> Iterator[Server]:
    """A server of its own, for tests that stop it or reload its certificate."""
    srv = _start(_runtime(world.home, TEST_POLICY, SmtpConfig()), ctx)
    yield srv
    _stop(srv)
    srv.runtime.close()
