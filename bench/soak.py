"""Soak and concurrency test: many IMAP and SMTP clients against one server.

Run as ``python bench/soak.py`` (``--minutes 10 --imap 50 --smtp 10`` are
the defaults). It stops by itself: the load runs for ``--minutes``, then the
senders stop, the IMAP clients collect the last messages (at most
``--drain`` seconds) and log out, and the server is stopped.

What it does:

1. Makes a throwaway home (``postvault.home.init_home``) and accounts, all
   members: the mailboxes that the IMAP clients watch (``--per-account``
   clients share each one, as a practice's several mail clients do) and one
   account per SMTP sender.
2. Starts the real ``postvault serve`` (bench/_server.py) with the imaps and
   submissions listeners on free loopback ports, and its new-mail
   notifications relayed to a local SMTP sink (tests/outbound/sink.py), so
   that nothing leaves loopback (not even a DNS lookup).
3. Runs, for ``--minutes``:

   - ``--imap`` IMAP clients (asyncio, TLS verified against the home's CA,
     spread over 127.0.0.2-9 since the server allows 50 connections per
     address). Each logs in, SELECTs INBOX, then loops: IDLE until an
     ``* N EXISTS`` or 4-8 s, DONE; FETCH of the new messages (UID, FLAGS,
     Message-ID and X-Soak headers, the body text) whose body is checked
     against the SHA-256 the sender put in X-Soak; ``UID STORE +FLAGS
     (\\Seen)`` of them, whose FETCH answers must show \\Seen; a NOOP now
     and then. Every 2-5 minutes (``--session``) it logs out and connects
     again, so that connections come and go as they do in a practice.
   - ``--smtp`` SMTP senders (smtplib over TLS on threads, AUTH PLAIN),
     each sending 10 KB messages to a random watched mailbox with a pause
     of ``--interval`` seconds on average, and reconnecting every 10-30
     messages.

4. Counts every error: a NO or BAD, an SMTP 4xx/5xx or refused recipient,
   any exception or time-out; a message seen twice by one client, a body
   that doesn't match its hash, a message never seen by a client of its
   mailbox. Scans the server's log (its standard error) for "database is
   locked", tracebacks, ERROR and WARNING lines; checks that SIGTERM stops
   it with status 0.
5. Samples the server's VmRSS every 5 s: "start" is taken after the
   warm-up (the run's clock starts once every client has logged in; the
   first ``--warmup`` seconds of it, default 10 % of the run, are warm-up:
   every client through a few cycles), "end" when the load stops (the same
   connections open), "max" over the whole run, and "after" once all
   clients have logged out.

It prints operations per kind, errors, p50/p99 latency per kind, IDLE
wake-up (the time from the sender reading the 250 to the IMAP client
reading ``* N EXISTS``, and from the sender's MAIL FROM to it, for messages
sent while that client was in IDLE), RSS start/end/max, and exits 1 if
anything went wrong.

tests/test_soak.py runs the same code for under a minute in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import random
import re
import shutil
import signal
import smtplib
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import Serve, free_port
from imap_load import HOSTNAME, Client, IMAPError, client_context, machine_line, pct, source_version

from tests.outbound.sink import Certs, sink

PASSWORD = "soak test: correct horse battery staple"
EXISTS = re.compile(rb"\* (\d+) EXISTS\r\n")
FETCH_HEAD = re.compile(rb"\* (\d+) FETCH \(")
UID = re.compile(rb"[( ]UID (\d+)[ )]")
FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")
HEADER_LITERAL = re.compile(rb"BODY\[HEADER\.FIELDS \([^)]*\)\] \{(\d+)\}\r\n")
TEXT_LITERAL = re.compile(rb"BODY\[TEXT\] \{(\d+)\}\r\n")
MESSAGE_ID = re.compile(rb"(?im)^Message-ID:\s*(<[^>\r\n]+>)")
X_SOAK = re.compile(rb"(?im)^X-Soak:\s*([0-9a-f]{64})")
LOCKED = "database is locked"
# A wake-up later than this while the client sat in IDLE counts as missed:
# the server's IDLE poll (10 s with the change bus) would have caught a lost
# notification eventually, but the bus should have delivered it at once. The
# bound is wide because the machine is shared and loaded.
LATE_WAKEUP = 5.0
COMMAND_TIMEOUT = 60.0
START_CAP = 300.0  # seconds for every client to log in before the run's clock starts anyway
# The server writes * N EXISTS to the IDLE connections when the delivery
# commits, and the 250 right after: the IMAP client (asyncio) often reads
# the EXISTS before the sender's thread has read its 250, so the first
# figure is often negative. The second one counts from the start of the
# SMTP transaction (MAIL FROM, message, 250 read) and is always positive.
WAKE_250 = "IDLE wake-up: 250 read -> * N EXISTS read (< 0: EXISTS first)"
WAKE_MAIL = "IDLE wake-up: MAIL FROM sent -> * N EXISTS read"
T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- what is counted ---------------------------------------------------------------------------


@dataclass
class Sent:
    """One message as its sender saw it."""

    mailbox: str
    started: float
    acked: float | None = None  # perf_counter when the 250 was read
    failed: bool = False


@dataclass
class Window:
    """One IDLE: from the continuation to the EXISTS or the time-out."""

    start: float
    end: float


@dataclass
class Watcher:
    """One IMAP client's lasting state, across its reconnections."""

    index: int
    mailbox: str
    last_uid: int = 0
    exists: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    # Message-ID -> (time the client first heard of it, start of the IDLE
    # it heard of it in, or None if it was not in IDLE then)
    learned: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)
    # For this session: sequence number -> (first heard, IDLE start or None)
    heard: dict[int, tuple[float, float | None]] = field(default_factory=dict)
    idle_since: float | None = None
    sessions: int = 0


class Stats:
    """Latencies and counts from all clients (asyncio task and threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}
        # The same, only what finished after the warm-up (the steady state,
        # without the first burst of logins).
        self.steady: dict[str, list[float]] = {}
        self.warm = False
        self.warm_at = math.inf
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []

    def record(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)
            if self.warm:
                self.steady.setdefault(kind, []).append(seconds)

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.samples) < 30:
                self.samples.append(f"{kind}: {detail[:200]}")
        log(f"error: {kind}: {detail[:200]}")


@dataclass
class Options:
    minutes: float = 10.0
    imap: int = 50
    smtp: int = 10
    per_account: int = 2
    interval: float = 1.5  # mean seconds between one sender's messages
    warmup: float | None = None  # seconds; default 10 % of the run, 10-60 s
    drain: float = 60.0
    session: tuple[float, float] = (120.0, 300.0)
    fast_kdf: bool = False
    seed: int = 1
    tracemalloc: int = 0  # frames per allocation traced in the server; 0: off
    memory_log: bool = False  # SIGUSR1 each minute: the server logs RSS, SQLite's and Python's heaps


@dataclass
class Result:
    options: Options
    ops: dict[str, int]
    latencies: dict[str, list[float]]
    steady: dict[str, list[float]]
    errors: dict[str, int]
    error_samples: list[str]
    sent: int
    delivered_ok: int
    lost: int
    duplicates: int
    missed_wakeups: int
    exists_before_250: int
    wakeups: list[float]
    rss_start: int
    rss_end: int
    rss_max: int
    rss_after: int
    rss_samples: list[tuple[float, int]]
    log_locked: int
    log_tracebacks: int
    log_errors: int
    log_samples: list[str]
    server_status: int | None
    server_cpu: float
    seconds: float
    load: tuple[float, float]
    reconnects: int
    notifications: int = 0
    first_logins: float = 0.0  # seconds until every client had logged in once
    source: str = "unknown"  # the commit the server ran from
    log_warnings: int = 0

    @property
    def failures(self) -> list[str]:
        """Everything that makes the run a failure, in words."""
        out = [f"{n} {kind} error(s)" for kind, n in sorted(self.errors.items())]
        for n, what in ((self.lost, "message(s) never seen by a client of their mailbox"),
                        (self.duplicates, "message(s) seen twice by one client"),
                        (self.missed_wakeups, f"IDLE wake-up(s) later than {LATE_WAKEUP:.0f} s"),
                        (self.log_locked, f'"{LOCKED}" in the server log'),
                        (self.log_tracebacks, "traceback(s) in the server log"),
                        (self.log_errors, "ERROR line(s) in the server log")):
            if n:
                out.append(f"{n} {what}")
        if self.server_status != 0:
            out.append(f"server exit status {self.server_status}")
        return out


# -- the messages ------------------------------------------------------------------------------


def make_message(sender: str, rcpt: str, msgid: str, rng: random.Random, size: int = 10_000) -> bytes:
    """About ``size`` bytes of plain text; X-Soak carries the SHA-256 of the
    body as the client will FETCH it (BODY[TEXT], CRLF line ends)."""
    words = ["patient", "notes", "crown", "follow-up", "x-ray", "referral", "molar", "plan", "review", "on",
             "Tuesday", "thanks", "the", "and", "of"]
    lines: list[bytes] = []
    total = 0
    while total < size - 400:
        line = " ".join(rng.choice(words) for _ in range(12)).encode()
        lines.append(line)
        total += len(line) + 2
    body = b"\r\n".join(lines) + b"\r\n"
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: soak\r\nMessage-ID: {msgid}\r\n"
            f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"X-Soak: {hashlib.sha256(body).hexdigest()}\r\n\r\n").encode()
    return head + body


# -- IMAP clients -------------------------------------------------------------------------------


class Stop:
    """The phases of the run, shared by the IMAP tasks and SMTP threads."""

    def __init__(self, senders: int) -> None:
        self.senders = threading.Event()  # set: senders stop
        self.senders_in = [False] * senders  # each sender has logged in once
        self.draining = False  # IMAP clients collect the last messages
        self.imap = False  # IMAP clients log out


def note(w: Watcher, r: bytes) -> int | None:
    """Take an untagged response into account; the EXISTS count if it is one."""
    m = EXISTS.match(r)
    if m is None:
        return None
    n = int(m[1])
    now = time.perf_counter()
    for seq in range(w.exists + 1, n + 1):
        w.heard.setdefault(seq, (now, w.idle_since))
    w.exists = max(w.exists, n)
    return n


async def timed(stats: Stats, kind: str, aw: Awaitable[T]) -> T:
    t = time.perf_counter()
    out = await aw
    stats.record(kind, time.perf_counter() - t)
    return out


async def command(cl: Client, w: Watcher, stats: Stats, kind: str, text: bytes) -> list[bytes]:
    lines, _ = await timed(stats, kind, cl.command(text, timeout=COMMAND_TIMEOUT))
    for r in lines:
        note(w, r)
    return lines


async def idle(cl: Client, w: Watcher, stats: Stats, window: float) -> None:
    """IDLE until the mailbox grows or ``window`` seconds pass, then DONE."""
    tag = cl.tag()
    t0 = time.perf_counter()
    cl.writer.write(tag + b" IDLE\r\n")
    for _ in range(10_000):
        r = await asyncio.wait_for(cl.response(), COMMAND_TIMEOUT)
        if r.startswith(b"+"):
            break
        if r.startswith(tag + b" "):
            raise IMAPError(r[:200])
        note(w, r)
    start = time.perf_counter()
    stats.record("idle (to the + continuation)", start - t0)
    w.idle_since = start
    before = w.exists
    deadline = start + window
    try:
        while (left := deadline - time.perf_counter()) > 0:
            try:
                # Only untagged lines without literals come during IDLE
                # (EXISTS, FETCH FLAGS), so a time-out between lines loses
                # nothing: readuntil keeps what it has buffered.
                r = await asyncio.wait_for(cl.response(), left)
            except TimeoutError:
                break
            n = note(w, r)
            if n is not None and n > before:
                break
    finally:
        w.idle_since = None
    end = time.perf_counter()
    w.windows.append(Window(start, end))
    cl.writer.write(b"DONE\r\n")
    for _ in range(10_000):
        r = await asyncio.wait_for(cl.response(), COMMAND_TIMEOUT)
        if r.startswith(tag + b" "):
            if r[len(tag) + 1:len(tag) + 3] != b"OK":
                raise IMAPError(r[:200])
            break
        note(w, r)
    stats.record("idle DONE", time.perf_counter() - end)


def literal(r: bytes, pattern: re.Pattern[bytes], pos: int = 0) -> tuple[bytes, int] | None:
    m = pattern.search(r, pos)
    if m is None:
        return None
    n = int(m[1])
    return r[m.end():m.end() + n], m.end() + n


async def fetch_new(cl: Client, w: Watcher, stats: Stats, sent: dict[str, Sent]) -> None:
    """FETCH the messages after ``last_uid``, check them, STORE \\Seen."""
    if w.exists <= 0:
        return
    lines = await command(cl, w, stats, "fetch", b"UID FETCH %d:* (UID FLAGS BODY.PEEK[HEADER.FIELDS "
                          b"(MESSAGE-ID X-SOAK)] BODY.PEEK[TEXT])" % (w.last_uid + 1))
    new: list[int] = []
    for r in lines:
        head = FETCH_HEAD.match(r)
        if head is None or b"BODY[TEXT]" not in r:
            continue  # a flag change from the other client
        got_head = literal(r, HEADER_LITERAL)
        got_text = literal(r, TEXT_LITERAL, got_head[1] if got_head else 0)
        if got_head is None or got_text is None:
            stats.error("imap fetch", "FETCH answer without header or text")
            continue
        # UID sits outside the literals: before the first or after the last.
        uid = UID.search(r[:r.index(b"{")]) or UID.search(r[got_text[1]:])
        if uid is None:
            stats.error("imap fetch", "FETCH answer without UID")
            continue
        if int(uid[1]) <= w.last_uid:
            continue  # n:* gives the last message again when n is past it
        mid, digest = MESSAGE_ID.search(got_head[0]), X_SOAK.search(got_head[0])
        if mid is None or digest is None:
            stats.error("imap fetch", f"message without Message-ID or X-Soak (uid {int(uid[1])})")
            continue
        msgid = mid[1].decode()
        if hashlib.sha256(got_text[0]).hexdigest().encode() != digest[1]:
            stats.error("imap fetch", f"body does not match its hash (uid {int(uid[1])})")
        if msgid not in sent:
            stats.error("imap fetch", f"a message nobody sent (uid {int(uid[1])})")
        w.seen[msgid] += 1
        if w.seen[msgid] > 1:
            stats.error("imap fetch", f"message seen twice by client {w.index} (uid {int(uid[1])})")
        seq = int(head[1])
        heard = w.heard.get(seq)
        if heard is not None:
            w.learned.setdefault(msgid, heard)
        else:  # known from a FETCH before any EXISTS said so: rare, but not wrong
            w.learned.setdefault(msgid, (time.perf_counter(), None))
        new.append(int(uid[1]))
    if not new:
        return
    w.last_uid = max(w.last_uid, *new)
    uid_set = ",".join(map(str, new)).encode()
    lines = await command(cl, w, stats, "store", b"UID STORE " + uid_set + b" +FLAGS (\\Seen)")
    flagged = set()
    for r in lines:
        uid, flags = UID.search(r), FLAGS.search(r)
        if FETCH_HEAD.match(r) and uid and flags and b"\\Seen" in flags[1]:
            flagged.add(int(uid[1]))
    if not set(new) <= flagged:
        stats.error("imap store", f"STORE answered without \\Seen for {len(set(new) - flagged)} message(s)")


async def watcher(port: int, ctx: ssl.SSLContext, w: Watcher, stats: Stats, sent: dict[str, Sent], stop: Stop,
                  opts: Options, rng: random.Random) -> None:
    """One IMAP client: sessions of IDLE / FETCH / STORE / NOOP until told to stop."""
    source = f"127.0.0.{2 + w.index % 8}"
    while not stop.imap:
        cl: Client | None = None
        step = "connect"
        try:
            cl = await timed(stats, "imap connect (TCP + TLS + greeting)", Client.connect(port, ctx, source))
            step = "login"
            await timed(stats, "login", cl.login(w.mailbox, PASSWORD))
            w.heard.clear()
            w.exists = 0
            step = "select"
            await command(cl, w, stats, "select", b"SELECT INBOX")
            w.sessions += 1
            step = "fetch"
            await fetch_new(cl, w, stats, sent)
            session_end = time.perf_counter() + rng.uniform(*opts.session)
            while not stop.imap and time.perf_counter() < session_end:
                if stop.draining:
                    step = "noop"
                    await command(cl, w, stats, "noop", b"NOOP")
                    step = "fetch"
                    await fetch_new(cl, w, stats, sent)
                    await asyncio.sleep(0.5)
                    continue
                step = "idle"
                await idle(cl, w, stats, rng.uniform(4.0, 8.0))
                step = "fetch"
                await fetch_new(cl, w, stats, sent)
                if rng.random() < 0.1:
                    step = "noop"
                    await command(cl, w, stats, "noop", b"NOOP")
                    await fetch_new(cl, w, stats, sent)
            step = "logout"
            await timed(stats, "logout", cl.command(b"LOGOUT", timeout=COMMAND_TIMEOUT, keep=False))
        except (IMAPError, OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError, ValueError) as e:
            stats.error(f"imap {step}", f"client {w.index}: {type(e).__name__}: {e!s}")
            await asyncio.sleep(1.0)
        except Exception as e:  # noqa: BLE001 (anything else is counted too, and the client goes on)
            stats.error(f"imap {step}", f"client {w.index}: unexpected {type(e).__name__}: {e!s}")
            await asyncio.sleep(1.0)
        finally:
            if cl is not None:
                cl.closed = True
                cl.writer.close()
                try:
                    await asyncio.wait_for(cl.writer.wait_closed(), 5)
                except (OSError, TimeoutError, ssl.SSLError):
                    pass


def complete(w: Watcher, sent: dict[str, Sent]) -> bool:
    return all(w.seen[m] for m, s in list(sent.items()) if s.mailbox == w.mailbox and s.acked and not s.failed)


# -- SMTP senders -------------------------------------------------------------------------------


def smtp_sender(j: int, port: int, ctx: ssl.SSLContext, me: str, mailboxes: list[str], stats: Stats,
                sent: dict[str, Sent], stop: Stop, opts: Options) -> None:
    """One sender: connections of 10-30 messages, a pause between messages."""
    rng = random.Random(opts.seed * 1000 + j)
    k = 0
    while not stop.senders.is_set():
        step = "connect"
        rec: Sent | None = None
        try:
            t = time.perf_counter()
            with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=COMMAND_TIMEOUT) as s:
                stats.record("smtp connect (TCP + TLS + EHLO)", time.perf_counter() - t)
                step = "login"
                t = time.perf_counter()
                s.login(me, PASSWORD)
                stats.record("smtp AUTH", time.perf_counter() - t)
                stop.senders_in[j - 1] = True
                for _ in range(rng.randint(10, 30)):
                    if stop.senders.wait(rng.uniform(0.5, 1.5) * opts.interval):
                        break
                    k += 1
                    rcpt = rng.choice(mailboxes)
                    msgid = f"<soak-{j}-{k}-{os.getpid()}@{HOSTNAME}>"
                    raw = make_message(me, rcpt, msgid, rng)
                    step = "send"
                    rec = Sent(rcpt, time.perf_counter())
                    sent[msgid] = rec
                    refused = s.sendmail(me, [rcpt], raw)
                    rec.acked = time.perf_counter()
                    stats.record("smtp send (MAIL to 250 after DATA)", rec.acked - rec.started)
                    if refused:
                        rec.failed = True
                        stats.error("smtp send", f"refused: {refused}")
                    rec = None
                step = "quit"
        except Exception as e:  # noqa: BLE001 (SMTPException, OSError, or anything: counted, and the sender goes on)
            if rec is not None:
                rec.failed = True
            stats.error(f"smtp {step}", f"sender {j}: {type(e).__name__}: {e!s}")
            stop.senders.wait(1.0)


# -- the run ---------------------------------------------------------------------------------


def make_home(home: Path, mailboxes: list[str], senders: list[str], fast_kdf: bool) -> dict[str, str]:
    """The home and its accounts; the environment the server needs for it."""
    from postvault.conf.load import load_config
    from postvault.home import init_home, open_store

    extra = {"POSTVAULT_STORE_KDF_ITERATIONS": "1"} if fast_kdf else {}
    saved = {k: v for k, v in os.environ.items() if k.startswith("POSTVAULT_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(extra)
    try:
        init_home(home, HOSTNAME)
        store = open_store(load_config(home))
    finally:
        for k in extra:
            del os.environ[k]
        os.environ.update(saved)
    try:
        with ThreadPoolExecutor(4) as pool:  # Argon2id and bcrypt release the GIL
            list(pool.map(lambda e: store.create_account(e, "member", "Soak " + e.split("@")[0], PASSWORD),
                          mailboxes + senders))
    finally:
        store.close()
    return {**extra, "POSTVAULT_LOG_FILE": "", "POSTVAULT_LOG_LEVEL": "info",
            # The bench's own connections: 50 IMAP clients spread over 8
            # addresses, SMTP from 127.0.0.1; the default limits allow that.
            }


def scan_log(path: Path) -> tuple[int, int, int, int, list[str]]:
    """Lines with "database is locked", tracebacks, ERROR/CRITICAL lines,
    WARNING lines (the log is content-free by design, so samples can be
    printed)."""
    locked = tracebacks = errors = warnings = 0
    samples: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            bad = False
            if LOCKED in line:
                locked += 1
                bad = True
            if line.startswith("Traceback") or "Traceback (most recent call last)" in line:
                tracebacks += 1
                bad = True
            if re.search(r" (ERROR|CRITICAL) ", line):
                errors += 1
                bad = True
            if " WARNING " in line:
                warnings += 1
                bad = True
            if bad and len(samples) < 20:
                samples.append(line.rstrip()[:300])
    return locked, tracebacks, errors, warnings, samples


def run(opts: Options, work: Path) -> Result:
    """The whole soak in ``work`` (a fresh folder): home, server, load, checks."""
    load0 = os.getloadavg()[0]
    n_boxes = math.ceil(opts.imap / opts.per_account)
    mailboxes = [f"office{k}@dental{k}.soak.test" for k in range(1, n_boxes + 1)]
    senders = [f"sender{j}@clinic{j}.soak.test" for j in range(1, opts.smtp + 1)]
    home = work / "home"
    t = time.perf_counter()
    extra = make_home(home, mailboxes, senders, opts.fast_kdf)
    log(f"{len(mailboxes) + len(senders)} accounts made in {time.perf_counter() - t:.1f} s")
    imaps, subs = free_port(), free_port()
    source = source_version()  # now: the tree may change while the run goes on
    certs = home / "certs"
    # New-mail notifications go to a local sink (STARTTLS, the home's own
    # certificate), so the run stays on loopback: with no relay the server
    # would look the recipients' domains up in the DNS.
    with sink(Certs(certs / "ca.pem", certs / "server.pem", certs / "server.key")) as (notices, relay):
        extra.update(POSTVAULT_NOTIFY_RELAY=f"127.0.0.1:{relay}", POSTVAULT_NOTIFY_RELAY_CA=str(certs / "ca.pem"))
        if opts.tracemalloc:
            # The server only: the snapshots it writes on SIGUSR1 (each
            # minute and after the logouts) land in the home folder.
            extra["PYTHONTRACEMALLOC"] = str(opts.tracemalloc)
        server = Serve(home, {"imaps": f"127.0.0.1:{imaps}", "submissions": f"127.0.0.1:{subs}"},
                       work / "serve.log", extra)
        log(f"postvault serve ready (pid {server.pid}), imaps {imaps}, submissions {subs}")
        status: int | None = None
        try:
            result = asyncio.run(_load(opts, server, imaps, subs, mailboxes, senders))
        finally:
            status = server.stop()
        result.notifications = len(notices.received)
    result.source = source
    locked, tracebacks, errors, warnings, samples = scan_log(server.log_path)
    result.log_locked, result.log_tracebacks, result.log_errors = locked, tracebacks, errors
    result.log_warnings, result.log_samples = warnings, samples
    result.server_status = status
    result.load = (load0, os.getloadavg()[0])
    return result


async def _load(opts: Options, server: Serve, imaps: int, subs: int, mailboxes: list[str],
                senders: list[str]) -> Result:
    ctx = client_context(server.home)
    stats, stop = Stats(), Stop(len(senders))
    sent: dict[str, Sent] = {}  # Message-ID -> what its sender saw
    rng = random.Random(opts.seed)
    watchers = [Watcher(i, mailboxes[i % len(mailboxes)]) for i in range(opts.imap)]
    seconds = opts.minutes * 60
    warmup = opts.warmup if opts.warmup is not None else min(60.0, max(10.0, seconds / 10))
    rss: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    cpu0 = server.cpu_seconds()

    async def sample() -> None:
        while not stop.imap:
            rss.append((time.perf_counter() - t0, server.rss_kib()))
            await asyncio.sleep(5.0)

    sampler = asyncio.create_task(sample())
    # The clients start over the first few seconds, as a practice's do.
    tasks = []
    for w in watchers:
        tasks.append(asyncio.create_task(watcher(imaps, ctx, w, stats, sent, stop, opts,
                                                 random.Random(rng.random()))))
        await asyncio.sleep(0.05)
    threads = [threading.Thread(target=smtp_sender, args=(j, subs, ctx, me, mailboxes, stats, sent, stop, opts),
                                daemon=True) for j, me in enumerate(senders, 1)]
    for th in threads:
        th.start()
    log(f"{opts.imap} IMAP clients on {len(mailboxes)} mailboxes, {opts.smtp} SMTP senders; "
        f"warm-up {warmup:.0f} s, load {seconds:.0f} s once every client has logged in")
    # The first logins come all at once and cost bcrypt and Argon2id each:
    # on a loaded machine they take tens of seconds. The clock of the run
    # starts when every client is in (or START_CAP has passed), so that the
    # run is as long as asked whatever the machine's load.
    while time.perf_counter() - t0 < START_CAP and not (
            all(w.sessions for w in watchers) and all(stop.senders_in)):
        await asyncio.sleep(0.5)
    t_in = time.perf_counter()
    log(f"every client logged in after {t_in - t0:.0f} s")
    await asyncio.sleep(warmup)
    rss_start = server.rss_kib()
    snapshot(opts, server)
    stats.warm, stats.warm_at = True, time.perf_counter()
    log(f"warm-up done: server VmRSS {rss_start / 1024:.1f} MiB")
    next_report = time.perf_counter() + 60
    while (left := t_in + seconds - time.perf_counter()) > 0:
        await asyncio.sleep(min(left, 5.0))
        if time.perf_counter() >= next_report:
            next_report += 60
            log(f"{time.perf_counter() - t0:.0f} s: {len(sent)} sent, errors {sum(stats.errors.values())}, "
                f"VmRSS {server.rss_kib() / 1024:.1f} MiB")
            snapshot(opts, server)
    rss_end = server.rss_kib()
    rss.append((time.perf_counter() - t0, rss_end))
    # Senders first, then the IMAP clients collect what is left.
    stop.senders.set()
    await asyncio.gather(*(asyncio.to_thread(th.join, COMMAND_TIMEOUT + 10) for th in threads))
    stop.draining = True
    drain_end = time.perf_counter() + opts.drain
    while time.perf_counter() < drain_end and not all(complete(w, sent) for w in watchers):
        await asyncio.sleep(0.5)
    stop.imap = True
    await asyncio.wait_for(asyncio.gather(*tasks, sampler), COMMAND_TIMEOUT * 2)
    await asyncio.sleep(2.0)
    rss_after = server.rss_kib()
    snapshot(opts, server)
    cpu = server.cpu_seconds() - cpu0
    elapsed = time.perf_counter() - t0
    result = _judge(opts, stats, sent, watchers, rss, rss_start, rss_end, rss_after, cpu, elapsed)
    result.first_logins = t_in - t0
    return result


def snapshot(opts: Options, server: Serve) -> None:
    """With --memory-log: the server logs where its memory is, and with
    --tracemalloc writes a snapshot too (postvault/serve.py, SIGUSR1)."""
    if opts.memory_log or opts.tracemalloc:
        os.kill(server.pid, signal.SIGUSR1)


def _judge(opts: Options, stats: Stats, sent: dict[str, Sent], watchers: list[Watcher],
           rss: list[tuple[float, int]], rss_start: int, rss_end: int, rss_after: int, cpu: float,
           elapsed: float) -> Result:
    ok = {m: s for m, s in sent.items() if s.acked is not None and not s.failed}
    lost = duplicates = missed = early = 0
    wakeups: list[float] = []
    from_mail: list[float] = []
    by_box: dict[str, list[Watcher]] = {}
    for w in watchers:
        by_box.setdefault(w.mailbox, []).append(w)
        duplicates += sum(1 for n in w.seen.values() if n > 1)
    for msgid, s in ok.items():
        assert s.acked is not None
        for w in by_box.get(s.mailbox, []):
            if not w.seen[msgid]:
                lost += 1
                continue
            heard, idle_start = w.learned[msgid]
            # A wake-up sample: the client was in IDLE before the sender
            # began, and heard of the message in that IDLE.
            if idle_start is not None and idle_start <= s.started:
                if heard < s.acked:
                    early += 1  # the EXISTS came before the sender had read its 250
                wakeups.append(heard - s.acked)
                from_mail.append(heard - s.started)
                if s.started >= stats.warm_at:
                    stats.steady.setdefault(WAKE_250, []).append(heard - s.acked)
                    stats.steady.setdefault(WAKE_MAIL, []).append(heard - s.started)
            # Was the client in IDLE when the 250 came, and did it stay
            # there for LATE_WAKEUP seconds without hearing of the message?
            for win in w.windows:
                if win.start <= s.acked <= win.end:
                    if min(heard, win.end) - s.acked > LATE_WAKEUP:
                        missed += 1
                    break
    if lost:
        stats.error("delivery", f"{lost} (message, client) pairs never seen")
    ops = {k: len(v) for k, v in stats.latencies.items()}
    lat = dict(stats.latencies)
    if wakeups:
        lat[WAKE_250] = wakeups
        lat[WAKE_MAIL] = from_mail
        ops[WAKE_250] = ops[WAKE_MAIL] = len(wakeups)
    return Result(
        options=opts, ops=ops, latencies=lat, steady=dict(stats.steady), errors=dict(stats.errors), error_samples=list(stats.samples),
        sent=len(sent), delivered_ok=len(ok), lost=lost, duplicates=duplicates, missed_wakeups=missed,
        exists_before_250=early, wakeups=wakeups, rss_start=rss_start, rss_end=rss_end,
        rss_max=max([r for _, r in rss] + [rss_start, rss_end]), rss_after=rss_after, rss_samples=rss,
        log_locked=0, log_tracebacks=0, log_errors=0, log_samples=[], server_status=None, server_cpu=cpu,
        seconds=elapsed, load=(0.0, 0.0), reconnects=sum(max(0, w.sessions - 1) for w in watchers))


# -- report ----------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return "—" if math.isnan(x) else (f"{x * 1000:.0f}" if abs(x) >= 0.0995 else f"{x * 1000:.1f}")


def report(r: Result, out: Callable[[str], None] = print) -> None:
    o = r.options
    out(f"Machine: {machine_line()}. Server code: {r.source}.")
    out(f"Load average {r.load[0]:.1f} at the start, {r.load[1]:.1f} at the end.")
    out("")
    out(f"{o.imap} IMAP clients ({o.per_account} per mailbox), {o.smtp} SMTP senders (10 KB messages, "
        f"one every {o.interval:.1f} s on average each), {o.minutes:g} min of load, {r.seconds:.0f} s in all "
        f"with the first logins, warm-up and drain; {r.reconnects} IMAP reconnections; server CPU {r.server_cpu:.0f} s.")
    out("")
    out("| operation | n | p50 (ms) | p99 (ms) | max (ms) | after warm-up: n | p50 (ms) | p99 (ms) |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in sorted(r.latencies, key=_order):
        v, w = r.latencies[kind], r.steady.get(kind, [])
        out(f"| {kind} | {len(v)} | {ms(pct(v, 50))} | {ms(pct(v, 99))} | {ms(max(v))} | {len(w)} "
            f"| {ms(pct(w, 50))} | {ms(pct(w, 99))} |")
    out("")
    out(f"Messages: {r.sent} sent, {r.delivered_ok} acknowledged with 250; (message, client) pairs never seen: "
        f"{r.lost}; seen twice: {r.duplicates}; IDLE wake-ups later than {LATE_WAKEUP:.0f} s: {r.missed_wakeups}; "
        f"wake-ups measured: {len(r.wakeups)}, of which the EXISTS was read before the sender read its 250: "
        f"{r.exists_before_250}.")
    out(f"Every client had logged in after {r.first_logins:.0f} s; the {o.minutes:g} min of load count from "
        "then.")
    out(f"Server VmRSS: start (after {_warmup(o):.0f} s warm-up) {r.rss_start / 1024:.1f} MiB, end "
        f"{r.rss_end / 1024:.1f} MiB, max {r.rss_max / 1024:.1f} MiB, after all clients logged out "
        f"{r.rss_after / 1024:.1f} MiB ({len(r.rss_samples)} samples).")
    out(f"Server log: {r.log_locked} \"{LOCKED}\", {r.log_tracebacks} tracebacks, {r.log_errors} ERROR lines, "
        f"{r.log_warnings} WARNING lines; exit status {r.server_status}. New-mail notifications relayed to the "
        f"local sink: {r.notifications}.")
    errs = ", ".join(f"{k}: {n}" for k, n in sorted(r.errors.items())) or "none"
    out(f"Errors: {errs}.")
    for s in r.error_samples[:10]:
        out(f"  {s}")
    for s in r.log_samples[:10]:
        out(f"  log: {s}")
    out("")
    out("Result: " + ("PASS" if not r.failures else "FAIL: " + "; ".join(r.failures)))


def _warmup(o: Options) -> float:
    return o.warmup if o.warmup is not None else min(60.0, max(10.0, o.minutes * 6))


def _order(kind: str) -> tuple[int, str]:
    first = ["imap connect", "login", "select", "idle (", "IDLE wake-up", "idle DONE", "fetch", "store", "noop",
             "logout", "smtp connect", "smtp AUTH", "smtp send"]
    return next((i for i, p in enumerate(first) if kind.startswith(p)), len(first)), kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes of load (default 10)")
    ap.add_argument("--imap", type=int, default=50, help="IMAP clients (default 50)")
    ap.add_argument("--smtp", type=int, default=10, help="SMTP senders (default 10)")
    ap.add_argument("--per-account", type=int, default=2, help="IMAP clients per mailbox (default 2)")
    ap.add_argument("--interval", type=float, default=1.5, help="mean seconds between a sender's messages")
    ap.add_argument("--warmup", type=float, help="seconds before the start RSS (default 10 %% of the run)")
    ap.add_argument("--fast-kdf", action="store_true", help="one Argon2id pass for the accounts (quicker set-up)")
    ap.add_argument("--keep", help="work in this folder and keep it (the server log is serve.log)")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="trace the server's allocations (FRAMES per traceback) and have it write a snapshot "
                         "into the home folder after the warm-up, each minute and after the logouts "
                         "(compare with bench/tracemalloc_diff.py; use with --keep)")
    ap.add_argument("--memory-log", action="store_true",
                    help="have the server log its VmRSS and SQLite's heap at the same moments (use with --keep)")
    args = ap.parse_args()
    if not (0 < args.minutes <= 120 and 1 <= args.imap <= 400 and 0 <= args.smtp <= 100 and args.per_account >= 1):
        ap.error("out of range: 0 < --minutes <= 120, 1 <= --imap <= 400, 0 <= --smtp <= 100")
    opts = Options(minutes=args.minutes, imap=args.imap, smtp=args.smtp, per_account=args.per_account,
                   interval=args.interval, warmup=args.warmup, fast_kdf=args.fast_kdf,
                   tracemalloc=args.tracemalloc, memory_log=args.memory_log)
    if args.keep:
        work = Path(args.keep).absolute()
        work.mkdir(parents=True, exist_ok=False)
        result = run(opts, work)
    else:
        tmp = tempfile.mkdtemp(prefix="postvault-soak-")
        try:
            result = run(opts, Path(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report(result)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
