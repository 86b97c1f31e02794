"""Load benchmark of the IMAP server: real ``postvault serve``, real TLS.

Run as ``python bench/imap_load.py`` (``--quick`` for a smoke run of a
minute or two). It prints the IMAP section of docs/benchmarks.md as
Markdown (machine line, tables, goals met or not).

What it does:

1. Makes a throwaway home (``postvault.home.init_home``) in a temporary
   folder, with the shipped config and KDF cost, and accounts: the reader
   ``reader@`` (10,000 messages in INBOX), ``big@`` (100,000), four
   senders, and a few for cold logins.
2. Files the messages (``bench/imap_populate.py``): realistic sizes (median
   ~5 KB, mean ~30 KB; 5 % with a PDF, 1 % with a JPEG), sealed and
   summarized by the store's own code, written in large transactions;
   ``check_equivalent`` first proves that the rows are those
   ``Store.deliver`` writes.
3. Starts ``postvault serve`` as a subprocess with only the ``imaps``
   listener on a free loopback port and waits for "postvault ready".
4. With C = 1 and C = 10 concurrent clients (asyncio, TLS verified against
   the home's ``certs/ca.pem``), in each of ``--runs`` runs: connect, LOGIN,
   SELECT INBOX, ``FETCH 1:* (FLAGS ENVELOPE)``, ``UID FETCH <uid> BODY[]``
   of 100 random messages per client, ``UID STORE`` of flags (100 per
   client, set and cleared in turn), and IDLE wake-up: every client IDLEs
   on INBOX while one more connection APPENDs, and the time from sending
   APPEND to each ``* N EXISTS`` is taken. Also cold logins (an account
   nobody logged into within the login cache's minute: bcrypt + Argon2id)
   and wake-up for mail delivered by *another process* (``Store.deliver``
   here, which the server's in-process change bus cannot hear).
5. On the 100,000-message INBOX: SELECT and ``FETCH 1:* (FLAGS)`` time. Then
   the throughput of a 20 MiB APPEND and of FETCH ``BODY.PEEK[]`` of it.
6. Memory per idle connection: a fresh server, one warm-up connection (lists
   INBOX, APPENDs a 2 MiB draft), then 200
   logged-in idle connections (spread over loopback source addresses
   127.0.0.2-9, since the server allows 50 per address); VmRSS of the
   server process from /proc before and after. Then 20 of them SELECT the
   10,000-message INBOX and IDLE, as a mail client's connection does.

The client shares the machine's CPUs with the server; its own CPU time is
printed beside the server's for the big operations.

``--py-spy PREFIX`` records the server with py-spy (raw collapsed stacks)
during the first 100,000-message SELECT and FETCH, for finding what
dominates; ``--home DIR`` keeps (and later reuses) the populated home.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# Run from a checkout without installing: make the package importable.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import Serve, free_port
from imap_populate import BulkFiler, Mix, check_equivalent, make_message

HOSTNAME = "mail.bench.test"
PASSWORD = "bench: correct horse battery staple"
READER = "reader@dental.bench.test"
BIG = "big@dental.bench.test"
SENDERS = tuple(f"sender{i}@ortho{i}.bench.test" for i in range(1, 5))
GOAL_SELECT_MS = 200.0
GOAL_FETCH_FLAGS_S = 2.0
GOAL_CONN_KB = 200.0
LITERAL_END = re.compile(rb"\{(\d+)\+?\}\r\n\Z")
EXISTS = re.compile(rb"\* (\d+) EXISTS\r\n")
MAX_LITERALS_PER_RESPONSE = 1000
MAX_RESPONSES = 5_000_000
SEND_TIMEOUT = 30.0
LOAD = [0.0, 0.0, 0.0]
SOURCE = ["unknown"]  # the code the server under test was started from


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import cryptography
    import twisted

    return (f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"Twisted {twisted.__version__}, cryptography {cryptography.__version__}")


def source_version() -> str:
    """The commit the server ran from, and whether postvault/ had local changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "postvault"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"commit {head or 'unknown'}" + (" with local changes to postvault/" if dirty else "")


# -- a small asyncio IMAP client -----------------------------------------------------------


class IMAPError(Exception):
    pass


class Client:
    """Just enough IMAP4rev1 for the bench: tagged commands, literals in
    responses, APPEND with a synchronizing literal, IDLE."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._n = 0
        self.closed = False

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOSTNAME,
                                    local_addr=(source, 0), limit=1 << 20), SEND_TIMEOUT)
        client = cls(reader, writer)
        greeting = await asyncio.wait_for(client.response(), SEND_TIMEOUT)
        if not greeting.startswith(b"* OK"):
            raise IMAPError(greeting[:200])
        return client

    def tag(self) -> bytes:
        self._n += 1
        return b"b%d" % self._n

    async def response(self) -> bytes:
        """One response line, with any literals it carries."""
        line = await self.reader.readuntil(b"\r\n")
        m = LITERAL_END.search(line)
        if m is None:
            return line
        parts = [line]
        for _ in range(MAX_LITERALS_PER_RESPONSE):
            parts.append(await self.reader.readexactly(int(m[1])))
            line = await self.reader.readuntil(b"\r\n")
            parts.append(line)
            m = LITERAL_END.search(line)
            if m is None:
                return b"".join(parts)
        raise IMAPError("too many literals in one response")

    async def _until(self, tag: bytes, keep: bool) -> tuple[list[bytes], int]:
        untagged: list[bytes] = []
        count = 0
        for _ in range(MAX_RESPONSES):
            r = await self.response()
            if r.startswith(tag + b" "):
                if r[len(tag) + 1:len(tag) + 3] != b"OK":
                    raise IMAPError(r[:300])
                return untagged, count
            count += 1
            if keep:
                untagged.append(r)
        raise IMAPError("no end to the responses")

    async def command(self, text: bytes, timeout: float = 120.0, keep: bool = True) -> tuple[list[bytes], int]:
        """Send one command; its untagged responses (if ``keep``) and their count."""
        tag = self.tag()
        self.writer.write(tag + b" " + text + b"\r\n")
        return await asyncio.wait_for(self._until(tag, keep), timeout)

    async def login(self, user: str, password: str) -> None:
        await self.command(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()), timeout=120)

    async def append(self, mailbox: str, message: bytes, timeout: float = 60.0) -> None:
        tag = self.tag()
        self.writer.write(tag + b' APPEND "%s" {%d}\r\n' % (mailbox.encode(), len(message)))

        async def go() -> None:
            first = await self.response()
            if not first.startswith(b"+"):
                raise IMAPError(first[:300])
            self.writer.write(message + b"\r\n")
            await self._until(tag, False)

        await asyncio.wait_for(go(), timeout)

    async def logout(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.command(b"LOGOUT", timeout=10, keep=False)
        except (IMAPError, OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, TimeoutError, ssl.SSLError):
            pass


class Idler:
    """A client in IDLE; records when each ``* N EXISTS`` arrives."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: dict[int, float] = {}
        self.changed = asyncio.Event()
        self._tag = b""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._tag = self.client.tag()
        self.client.writer.write(self._tag + b" IDLE\r\n")
        for _ in range(1000):
            r = await asyncio.wait_for(self.client.response(), SEND_TIMEOUT)
            if r.startswith(b"+"):
                break
            if r.startswith(self._tag):
                raise IMAPError(r[:300])
        else:
            raise IMAPError("no continuation for IDLE")
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        for _ in range(MAX_RESPONSES):
            r = await self.client.response()
            now = time.perf_counter()
            if r.startswith(self._tag + b" "):
                return
            m = EXISTS.match(r)
            if m:
                self.seen.setdefault(int(m[1]), now)
                self.changed.set()

    async def wait_for(self, n: int, timeout: float) -> float | None:
        deadline = time.perf_counter() + timeout
        for _ in range(100_000):
            if n in self.seen or any(k >= n for k in self.seen):
                return min(t for k, t in self.seen.items() if k >= n)
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return None
        return None

    async def stop(self) -> None:
        self.client.writer.write(b"DONE\r\n")
        assert self._task is not None
        await asyncio.wait_for(self._task, SEND_TIMEOUT)


# -- the server under test ------------------------------------------------------------------


class Server(Serve):
    """``postvault serve`` with only the imaps listener, on loopback."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        if SOURCE[0] == "unknown":  # the first server is the one measured for the tables
            SOURCE[:] = [source_version()]
        super().__init__(home, {"imaps": f"127.0.0.1:{self.port}"}, home / f"serve-{self.port}.log")


# -- measuring ----------------------------------------------------------------------------------


def pct(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(samples)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


@dataclass
class Phase:
    """One operation in one run: latencies of its commands, its wall time."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall > 0 else float("nan")


Results = dict[tuple[str, int], list[Phase]]


async def timed(lat: list[float], aw: Awaitable[object]) -> None:
    t = time.perf_counter()
    await aw
    lat.append(time.perf_counter() - t)


async def phase(results: Results, name: str, c: int, server: Server,
                jobs: Callable[[Phase], list[Awaitable[object]]]) -> Phase:
    ph = Phase()
    cpu0, ccpu0 = server.cpu_seconds(), time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*jobs(ph))
    ph.wall = time.perf_counter() - t0
    ph.server_cpu, ph.client_cpu = server.cpu_seconds() - cpu0, time.process_time() - ccpu0
    results.setdefault((name, c), []).append(ph)
    return ph


@dataclass
class Config:
    runs: int
    messages: int
    big: int
    bodies: int
    stores: int
    appends: int
    foreign: int
    idle_conns: int
    idle_selected: int
    cold: int
    concurrency: tuple[int, ...]
    cap: float  # seconds: a phase of many commands stops early after this long
    reps: int  # with C = 1: connections (each with LOGIN) and SELECTs per run


FULL = Config(runs=3, messages=10_000, big=100_000, bodies=100, stores=100, appends=10, foreign=2,
              idle_conns=200, idle_selected=20, cold=5, concurrency=(1, 10), cap=10.0, reps=5)
QUICK = Config(runs=3, messages=500, big=3_000, bodies=10, stores=10, appends=3, foreign=0,
               idle_conns=40, idle_selected=5, cold=1, concurrency=(1, 3), cap=5.0, reps=3)


def client_context(home: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(home / "certs" / "ca.pem"))
    ctx.check_hostname = True  # the server's certificate names HOSTNAME
    return ctx


def small_message(i: int) -> bytes:
    return (b"From: <%s>\r\nTo: <%s>\r\nSubject: idle probe %d\r\nMessage-ID: <idle-%d.%d@bench.test>\r\n"
            b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\nA short note.\r\n"
            % (READER.encode(), READER.encode(), i, i, os.getpid()))


async def run_mailbox_ops(server: Server, cfg: Config, c: int, results: Results, rng: random.Random,
                          n_uids: int, append_no: list[int]) -> None:
    """One run of every 10,000-mailbox operation with ``c`` clients."""
    ctx = client_context(server.home)
    reps = cfg.reps if c == 1 else 1
    # Client i connects from 127.0.0.(2 + i % 8): the server allows 50
    # connections per address.
    conns: list[list[Client]] = [[] for _ in range(c)]

    async def connect(ph: Phase, i: int) -> None:
        for _ in range(reps):
            t = time.perf_counter()
            conns[i].append(await Client.connect(server.port, ctx, f"127.0.0.{2 + i % 8}"))
            ph.latencies.append(time.perf_counter() - t)

    async def login(ph: Phase, mine: list[Client]) -> None:
        for cl in mine:
            await timed(ph.latencies, cl.login(READER, PASSWORD))

    async def select(ph: Phase, cl: Client) -> None:
        for _ in range(reps if c == 1 else 1):
            await timed(ph.latencies, cl.command(b"SELECT INBOX", keep=False))

    await phase(results, "connect + TLS + greeting", c, server, lambda ph: [connect(ph, i) for i in range(c)])
    clients = [mine[-1] for mine in conns]
    try:
        # One untimed login first, so the timed ones find the login cache
        # warm (misses are the cold-login row).
        warm = await Client.connect(server.port, ctx)
        await warm.login(READER, PASSWORD)
        await warm.logout()
        await phase(results, "LOGIN (login cache warm)", c, server, lambda ph: [login(ph, mine) for mine in conns])
        await asyncio.gather(*(cl.logout() for mine in conns for cl in mine[:-1]))
        await phase(results, f"SELECT INBOX ({cfg.messages:,} messages)", c, server,
                    lambda ph: [select(ph, cl) for cl in clients])
        await phase(results, "FETCH 1:* (FLAGS ENVELOPE)", c, server,
                    lambda ph: [timed(ph.latencies, cl.command(b"FETCH 1:* (FLAGS ENVELOPE)", timeout=600,
                                                               keep=False)) for cl in clients])

        async def bodies(cl: Client, ph: Phase, uids: list[int]) -> None:
            deadline = time.perf_counter() + cfg.cap
            for u in uids:
                await timed(ph.latencies, cl.command(b"UID FETCH %d BODY[]" % u, keep=False))
                if time.perf_counter() > deadline:
                    break

        await phase(results, f"UID FETCH BODY[] ({cfg.bodies} random per client)", c, server,
                    lambda ph: [bodies(cl, ph, [rng.randint(1, n_uids) for _ in range(cfg.bodies)])
                                for cl in clients])

        async def stores(cl: Client, ph: Phase, uids: list[int]) -> None:
            deadline = time.perf_counter() + cfg.cap
            for u in uids:
                await timed(ph.latencies, cl.command(b"UID STORE %d +FLAGS (\\Flagged)" % u, keep=False))
                await timed(ph.latencies, cl.command(b"UID STORE %d -FLAGS (\\Flagged)" % u, keep=False))
                if time.perf_counter() > deadline:
                    break

        await phase(results, "UID STORE ±FLAGS (\\Flagged)", c, server,
                    lambda ph: [stores(cl, ph, [rng.randint(1, n_uids) for _ in range(cfg.stores // 2)])
                                for cl in clients])
        # Catch up with each other's flag changes before IDLE.
        await asyncio.gather(*(cl.command(b"NOOP", keep=False) for cl in clients))
        await idle_wakeup(server, cfg, c, results, clients, ctx, append_no)
    finally:
        await asyncio.gather(*(cl.logout() for mine in conns for cl in mine))


async def idle_wakeup(server: Server, cfg: Config, c: int, results: Results, clients: list[Client],
                      ctx: ssl.SSLContext, append_no: list[int]) -> None:
    """Every client IDLEs on INBOX; another connection APPENDs, one at a time."""
    appender = await Client.connect(server.port, ctx)
    await appender.login(READER, PASSWORD)
    try:
        status, _ = await appender.command(b"STATUS INBOX (MESSAGES)")
        count = int(re.search(rb"MESSAGES (\d+)", status[0])[1])  # type: ignore[index]
        idlers = [Idler(cl) for cl in clients]
        await asyncio.gather(*(i.start() for i in idlers))
        ph = Phase()
        apph = Phase()
        cpu0, ccpu0 = server.cpu_seconds(), time.process_time()
        t_all = time.perf_counter()
        missed = 0
        deadline = time.perf_counter() + 2 * cfg.cap
        for _ in range(cfg.appends):
            if time.perf_counter() > deadline:
                break
            append_no[0] += 1
            t0 = time.perf_counter()
            await appender.append("INBOX", small_message(append_no[0]))
            apph.latencies.append(time.perf_counter() - t0)
            count += 1
            seen = await asyncio.gather(*(i.wait_for(count, 30.0) for i in idlers))
            for t in seen:
                if t is None:
                    missed += 1
                else:
                    ph.latencies.append(t - t0)
            await asyncio.sleep(0.2)
        ph.wall = apph.wall = time.perf_counter() - t_all
        ph.server_cpu = server.cpu_seconds() - cpu0
        ph.client_cpu = time.process_time() - ccpu0
        if missed:
            log(f"IDLE: {missed} wake-ups not seen within 30 s")
            ph.latencies += [float("inf")] * missed
        results.setdefault(("IDLE wake-up: APPEND sent → * N EXISTS (each of C idlers)", c), []).append(ph)
        results.setdefault(("APPEND (small message, other connection)", c), []).append(apph)
        if cfg.foreign and c == min(cfg.concurrency):
            await foreign_wakeup(server, cfg, results, idlers, count, c)
        await asyncio.gather(*(i.stop() for i in idlers))
    finally:
        await appender.logout()


async def foreign_wakeup(server: Server, cfg: Config, results: Results, idlers: list[Idler], count: int,
                         c: int) -> None:
    """Mail delivered by another process: only the server's IDLE poll sees it."""
    store = server_store(server.home)
    ph = Phase()
    try:
        for k in range(cfg.foreign):
            raw = make_message(99, 10_000_000 + k + int(time.time()), SENDERS[0], READER,
                               datetime.now(timezone.utc), Mix(pdf_share=0, jpeg_share=0))
            t0 = time.perf_counter()
            await asyncio.to_thread(store.deliver, raw, SENDERS[0], [READER], save_sent=False,
                                    client_ip="127.0.0.1", protocol="smtp")
            count += 1
            seen = await asyncio.gather(*(i.wait_for(count, 15.0) for i in idlers))
            ph.latencies += [float("inf") if t is None else t - t0 for t in seen]
    finally:
        store.close()
    results.setdefault(("IDLE wake-up: Store.deliver in another process → * N EXISTS", c), []).append(ph)


def server_store(home: Path):  # type: ignore[no-untyped-def]
    from postvault.conf.load import load_config
    from postvault.home import open_store

    return open_store(load_config(home))


async def cold_logins(server: Server, cold: list[str], results: Results) -> None:
    ctx = client_context(server.home)
    ph = Phase()
    for email in cold:
        cl = await Client.connect(server.port, ctx)
        try:
            await timed(ph.latencies, cl.login(email, PASSWORD))
        finally:
            await cl.logout()
    results.setdefault(("LOGIN, cold (bcrypt + Argon2id)", 1), []).append(ph)


class Spy:
    """py-spy recording the server (raw collapsed stacks, one file per
    operation), or nothing if no prefix was given."""

    def __init__(self, server: Server, prefix: str | None, name: str) -> None:
        self.args = None if prefix is None else [
            "py-spy", "record", "--pid", str(server.pid), "--format", "raw", "--rate", "250", "--threads",
            "--output", f"{prefix}-{name}.txt"]
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> None:
        if self.args is not None:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            await asyncio.sleep(1.5)  # attached and sampling

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = await asyncio.to_thread(self.proc.communicate, None, 60)
            if self.proc.returncode:
                log("py-spy: " + err.decode(errors="replace")[-500:])
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def big_mailbox(server: Server, cfg: Config, results: Results, py_spy: str | None) -> None:
    ctx = client_context(server.home)
    select_name = f"SELECT INBOX ({cfg.big:,} messages)"
    fetch_name = f"FETCH 1:* (FLAGS) ({cfg.big:,} messages)"
    for run in range(cfg.runs):
        prefix = py_spy if run == 0 else None  # profile the first run only
        cl = await Client.connect(server.port, ctx)

        def one(command: bytes, timeout: float, cl: Client = cl) -> Callable[[Phase], list[Awaitable[object]]]:
            return lambda ph: [timed(ph.latencies, cl.command(command, timeout=timeout, keep=False))]

        try:
            await cl.login(BIG, PASSWORD)
            async with Spy(server, prefix, "select"):
                await phase(results, select_name, 1, server, one(b"SELECT INBOX", 600))
            async with Spy(server, prefix, "fetch-flags"):
                await phase(results, fetch_name, 1, server, one(b"FETCH 1:* (FLAGS)", 900))
        finally:
            await cl.logout()
        log(f"big mailbox run {run + 1}: SELECT {results[(select_name, 1)][-1].wall:.2f} s, "
            f"FETCH {results[(fetch_name, 1)][-1].wall:.2f} s")


LARGE_MIB = 20


def large_message(mib: int) -> bytes:
    """A message of about ``mib`` MiB: a scan as a base64 attachment."""
    import base64

    rng = random.Random(9)
    data = base64.encodebytes(rng.randbytes(mib * 1024 * 1024 * 3 // 4)).replace(b"\n", b"\r\n")
    head = (b"From: scanner@dental.bench.test\r\nTo: reader@dental.bench.test\r\nSubject: scan\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n"
            b"Content-Type: text/plain\r\n\r\nThe scan.\r\n--b1\r\nContent-Type: application/pdf\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")
    return head + data + b"--b1--\r\n"


async def large_messages(server: Server, cfg: Config, results: Results) -> None:
    """Throughput of one big APPEND and one FETCH of it through TLS (C = 1)."""
    ctx = client_context(server.home)
    message = large_message(LARGE_MIB)
    append_name = f"APPEND of a {LARGE_MIB} MiB message"
    fetch_name = "UID FETCH BODY.PEEK[] of it"
    for run in range(cfg.runs):
        cl = await Client.connect(server.port, ctx)
        try:
            await cl.login(READER, PASSWORD)
            await phase(results, append_name, 1, server,
                        lambda ph: [timed(ph.latencies, cl.append("Drafts", message, timeout=600))])
            lines, _ = await cl.command(b"SELECT Drafts")
            uidnext = int(re.search(rb"UIDNEXT (\d+)", b"".join(lines))[1])  # type: ignore[index]
            got: list[int] = []

            async def fetch() -> None:
                out, _ = await cl.command(b"UID FETCH %d BODY.PEEK[]" % (uidnext - 1), timeout=600)
                got.append(sum(len(x) for x in out))

            await phase(results, fetch_name, 1, server, lambda ph: [timed(ph.latencies, fetch())])
            if not got or got[0] < len(message):
                raise IMAPError("the large message did not come back whole")
        finally:
            await cl.logout()
        log(f"large message run {run + 1}: APPEND {results[(append_name, 1)][-1].wall:.2f} s, "
            f"FETCH {results[(fetch_name, 1)][-1].wall:.2f} s")


async def idle_memory(server: Server, cfg: Config) -> dict[str, float]:
    """Server RSS growth per idle logged-in connection (and per selected one)."""
    ctx = client_context(server.home)
    # Warm-up as a mail client's first connection does: list the INBOX and
    # save a draft with an attachment, so that the server has served mail
    # (imports, caches, allocator state) before the idle connections come.
    warm = await Client.connect(server.port, ctx)
    await warm.login(READER, PASSWORD)
    await warm.command(b"SELECT INBOX", keep=False)
    await warm.command(b"FETCH 1:* (FLAGS ENVELOPE)", keep=False, timeout=600)
    await warm.append("Drafts", large_message(2), timeout=600)
    await warm.logout()
    await asyncio.sleep(1.0)
    before = server.rss_kib()
    clients: list[Client] = []
    sources = [f"127.0.0.{2 + i % 8}" for i in range(cfg.idle_conns)]  # the server allows 50 per address
    for batch in range(0, cfg.idle_conns, 20):
        new = await asyncio.gather(*(Client.connect(server.port, ctx, s) for s in sources[batch:batch + 20]))
        await asyncio.gather(*(cl.login(READER, PASSWORD) for cl in new))
        clients += new
    await asyncio.sleep(2.0)
    after = server.rss_kib()
    sel = clients[: cfg.idle_selected]
    for cl in sel:
        await cl.command(b"SELECT INBOX", keep=False)
    idlers = [Idler(cl) for cl in sel]
    await asyncio.gather(*(i.start() for i in idlers))
    await asyncio.sleep(2.0)
    after_sel = server.rss_kib()
    await asyncio.gather(*(i.stop() for i in idlers))
    await asyncio.gather(*(cl.logout() for cl in clients))
    return {"before": before, "after": after, "after_selected": after_sel, "n": len(clients),
            "n_selected": len(sel)}


# -- set-up -----------------------------------------------------------------------------------


def make_home(home: Path, cfg: Config, workers: int) -> list[str]:
    from postvault.home import init_home, open_store

    saved = {k: v for k, v in os.environ.items() if k.startswith("POSTVAULT_")}
    for k in saved:
        del os.environ[k]
    try:
        config = init_home(home, HOSTNAME)
    finally:
        os.environ.update(saved)
    store = open_store(config)
    cold = [f"cold{i}@dental.bench.test" for i in range(cfg.cold)]
    scratch = ["check-a@dental.bench.test", "check-b@dental.bench.test"]
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:  # Argon2id and bcrypt release the GIL
        list(pool.map(lambda e: store.create_account(e, "member", "Bench " + e.split("@")[0], PASSWORD),
                      [READER, BIG, *SENDERS, *cold, *scratch]))
    log(f"accounts made in {time.perf_counter() - t:.1f} s (shipped KDF cost)")
    check_equivalent(store, scratch[0], scratch[1], SENDERS[0], PASSWORD, HOSTNAME)
    log("bulk filing checked against Store.deliver: same plaintext, summary, flags, thread, audit fields")
    for email, n, seed in ((READER, cfg.messages, 1), (BIG, cfg.big, 2)):
        t = time.perf_counter()
        filer = BulkFiler(store, email, SENDERS, HOSTNAME, seed=seed)
        step = max(n // 5, 1)

        def progress(done: int, total: int, t: float = t, step: int = step) -> None:
            if done % step < 2000 or done == total:
                log(f"  {done:,}/{total:,} messages filed ({time.perf_counter() - t:.0f} s)")

        filer.file(n, workers=workers, progress=progress)
        log(f"{n:,} messages filed for {email} in {time.perf_counter() - t:.1f} s")
    store.close()
    (home / "bench.json").write_text(json.dumps({"messages": cfg.messages, "big": cfg.big, "cold": cold}))
    return cold


# -- report ----------------------------------------------------------------------------------------


def ms(x: float) -> str:
    if math.isnan(x):
        return "—"
    if x == float("inf"):
        return "lost"
    return f"{x * 1000:.0f}" if x >= 0.0995 else f"{x * 1000:.1f}"


def mmm(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    v = sorted(values)
    return f"{fmt(v[0])} / {fmt(statistics.median(v))} / {fmt(v[-1])}"


def report(results: Results, cfg: Config, mem: dict[str, float], total: float) -> None:
    print(f"Machine: {machine_line()}. Server code: {SOURCE[0]}.\n")
    print(f"### {cfg.messages:,}-message INBOX\n")
    print("| operation | C | n | commands/s | p50 (ms) | p99 (ms) | server CPU per command (ms) "
          "| client CPU per command (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    order = ["connect + TLS + greeting", "LOGIN (login cache warm)", f"SELECT INBOX ({cfg.messages:,} messages)",
             "FETCH 1:* (FLAGS ENVELOPE)", f"UID FETCH BODY[] ({cfg.bodies} random per client)",
             "UID STORE ±FLAGS (\\Flagged)", "APPEND (small message, other connection)",
             "IDLE wake-up: APPEND sent → * N EXISTS (each of C idlers)",
             "IDLE wake-up: Store.deliver in another process → * N EXISTS", "LOGIN, cold (bcrypt + Argon2id)"]
    for name in order:
        for c in sorted({k[1] for k in results if k[0] == name}):
            runs = results[(name, c)]
            rate = "—" if name.startswith(("IDLE", "LOGIN, cold", "APPEND")) else \
                mmm([p.rate for p in runs], lambda x: f"{x:.1f}" if x < 100 else f"{x:.0f}")
            p50 = mmm([pct(p.latencies, 50) for p in runs], ms) if len(runs) > 1 else ms(pct(runs[0].latencies, 50))
            p99 = mmm([pct(p.latencies, 99) for p in runs], ms) if len(runs) > 1 else ms(pct(runs[0].latencies, 99))
            no_cpu = name.startswith(("LOGIN, cold", "APPEND")) or "another process" in name
            cpu = "—" if no_cpu else mmm([p.server_cpu / max(1, len(p.latencies)) for p in runs], ms)
            ccpu = "—" if no_cpu else mmm([p.client_cpu / max(1, len(p.latencies)) for p in runs], ms)
            n = statistics.median(len(p.latencies) for p in runs)
            print(f"| {name} | {c} | {n:.0f} | {rate} | {p50} | {p99} | {cpu} | {ccpu} |")
    print(f"\nEach cell with three figures: min / median / max over {cfg.runs} runs (p50 and p99 are taken "
          "within each run over all the commands of all C clients). n: commands timed per run (median). "
          "commands/s: commands completed by all clients together divided by the wall time of the phase. "
          "Server CPU: user + system time of the server process over the phase, divided by n (IDLE: "
          "per wake-up, APPEND included); client CPU likewise for this bench's own process. "
          f"Phases of many commands stop after {cfg.cap:.0f} s (IDLE: {2 * cfg.cap:.0f} s).\n")
    print(f"### {cfg.big:,}-message INBOX (C = 1)\n")
    print("| operation | wall time (s), min / median / max | server CPU (s), median | client CPU (s), median "
          "| goal | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, goal in ((f"SELECT INBOX ({cfg.big:,} messages)", GOAL_SELECT_MS / 1000),
                       (f"FETCH 1:* (FLAGS) ({cfg.big:,} messages)", GOAL_FETCH_FLAGS_S)):
        runs = results.get((name, 1), [])
        if not runs:
            continue
        walls = [p.wall for p in runs]
        met = "yes" if statistics.median(walls) < goal else "**no**"
        goal_text = f"< {goal * 1000:.0f} ms" if goal < 1 else f"< {goal:.0f} s"
        print(f"| {name} | {mmm(walls, lambda x: f'{x:.2f}')} | {statistics.median(p.server_cpu for p in runs):.2f} "
              f"| {statistics.median(p.client_cpu for p in runs):.2f} | {goal_text} | {met} |")
    print()
    large = [k for k in results if k[0].startswith(("APPEND of a", "UID FETCH BODY.PEEK[] of it"))]
    if large:
        print(f"### A {LARGE_MIB} MiB message through TLS (C = 1)\n")
        print("| operation | wall time (s), min / median / max | MiB/s, median | server CPU (s), median |")
        print("| --- | --- | --- | --- |")
        for key in large:
            runs = results[key]
            walls = [p.wall for p in runs]
            print(f"| {key[0]} | {mmm(walls, lambda x: f'{x:.2f}')} | {LARGE_MIB / statistics.median(walls):.1f} "
                  f"| {statistics.median(p.server_cpu for p in runs):.2f} |")
        print()
    per = (mem["after"] - mem["before"]) / mem["n"]
    per_sel = (mem["after_selected"] - mem["after"]) / mem["n_selected"]
    print("### Memory per idle connection\n")
    print("| connections | server VmRSS before (MiB) | after (MiB) | per connection (KiB) | goal | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {mem['n']:.0f} logged in, nothing selected | {mem['before'] / 1024:.1f} | {mem['after'] / 1024:.1f} "
          f"| {per:.0f} | < {GOAL_CONN_KB:.0f} KB | {'yes' if per < GOAL_CONN_KB * 1000 / 1024 else '**no**'} |")
    print(f"| {mem['n_selected']:.0f} of them then SELECT the {cfg.messages:,}-message INBOX and IDLE "
          f"| {mem['after'] / 1024:.1f} | {mem['after_selected'] / 1024:.1f} | {per_sel:.0f} more | — | — |")
    print(f"\nWhole run: {total / 60:.1f} minutes including set-up; load average "
          f"{LOAD[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")


# -- main --------------------------------------------------------------------------------------


async def measure(server: Server, cfg: Config, cold: list[str], results: Results, n_uids: int) -> None:
    rng = random.Random(5)
    await cold_logins(server, cold, results)
    append_no = [0]
    for run in range(cfg.runs):
        for c in cfg.concurrency:
            t = time.perf_counter()
            await run_mailbox_ops(server, cfg, c, results, rng, n_uids, append_no)
            log(f"run {run + 1}, C={c}: {time.perf_counter() - t:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    ap.add_argument("--runs", type=int, help="repetitions (default 3)")
    ap.add_argument("--home", help="use (and keep) this home folder; reused if the bench made it before")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes sealing the messages")
    ap.add_argument("--py-spy", metavar="PREFIX",
                    help="record the server with py-spy during the first big-mailbox SELECT and FETCH "
                         "(PREFIX-select.txt, PREFIX-fetch-flags.txt: raw collapsed stacks)")
    ap.add_argument("--skip-10k", action="store_true", help="only the 100k mailbox and memory")
    ap.add_argument("--messages", type=int, help="size of the first mailbox (default 10,000)")
    ap.add_argument("--big", type=int, help="size of the big mailbox (default 100,000)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    for name in ("runs", "messages", "big"):
        if getattr(args, name):
            cfg = Config(**{**cfg.__dict__, name: max(1, getattr(args, name))})
    LOAD[:] = os.getloadavg()
    started = time.perf_counter()
    tmp = None
    if args.home:
        home = Path(args.home).absolute()
    else:
        tmp = tempfile.mkdtemp(prefix="postvault-imap-bench-")
        home = Path(tmp) / "home"
    try:
        marker = home / "bench.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if (saved["messages"], saved["big"]) != (cfg.messages, cfg.big):
                raise SystemExit(f"{home} was made for {saved['messages']}/{saved['big']} messages")
            cold = saved["cold"]
            log(f"reusing {home} (cold logins are only cold if the server has not seen them)")
        else:
            cold = make_home(home, cfg, args.workers)
        results: Results = {}
        server = Server(home)
        log(f"postvault serve ready on 127.0.0.1:{server.port} (pid {server.pid})")
        try:
            if not args.skip_10k:
                asyncio.run(measure(server, cfg, cold, results, cfg.messages))
            asyncio.run(big_mailbox(server, cfg, results, args.py_spy))
            asyncio.run(large_messages(server, cfg, results))
        finally:
            server.stop()
        # Memory: a fresh server, so that memory freed by earlier phases
        # can't hide what the new connections take.
        server = Server(home)
        try:
            mem = asyncio.run(idle_memory(server, cfg))
        finally:
            server.stop()
        report(results, cfg, mem, time.perf_counter() - started)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
