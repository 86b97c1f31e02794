"""Crash-consistency harness: the real ``postvault serve`` as a subprocess,
under concurrent SMTP submission and IMAP APPEND / MOVE / EXPUNGE, killed
with SIGKILL at random moments and started again on the same home.

Every client action is written down from the client's side only, the way a
mail program would know it:

- SMTP threads (smtplib over implicit TLS) send messages from one member to
  another, each with its own Message-ID (``<smtp-N@crash.test>``), which is
  also written into the body. A message is *acked* once the 250 after DATA
  is read, *refused* on any other reply to DATA, and otherwise *in flight*
  (the server died before it answered: the client cannot know).
- IMAP appenders (imaplib over TLS) APPEND messages (``<app-N@crash.test>``)
  to their own INBOX; acked on OK with ``[APPENDUID v uid]``, which is kept.
- IMAP movers MOVE some messages from INBOX to Trash and mark and UID
  EXPUNGE some in Trash; the Message-IDs they touch are recorded before the
  command is sent (so a killed MOVE or EXPUNGE is allowed to have happened)
  and, once acknowledged, as done.
- Every UID a client is told (APPENDUID, COPYUID, FETCH) is kept per
  (account, folder), with the Message-ID it belongs to.

After each restart :meth:`Harness.check_uids` reads every folder's
UIDVALIDITY and UIDNEXT (from the database file, before any client runs):
UIDVALIDITY never changes and UIDNEXT is above every UID ever seen (UIDs
never go backwards, never reused). :meth:`Harness.final_check` reads every
folder over IMAP, opens every message in full (FETCH BODY[], so each one is
decrypted) and checks: each acked message is there exactly once (or, if a
client expunged it, at most once; none if the EXPUNGE was acked), no refused
and no never-sent message is there, a delivered message is in both the
recipient's folders and the sender's Sent or in neither, and UIDs match what
clients were told. The sent-but-unanswered messages found stored are
counted as lost in flight (the 250 or OK the server had no time to send).
"""

from __future__ import annotations

import imaplib
import itertools
import os
import random
import re
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

from postvault.certs.context import client_context
from postvault.conf.load import load_config
from postvault.home import init_home
from postvault.store import passwords
from postvault.store.api import Store
from postvault.store.types import KdfSettings
from tests.imapd.conftest import start_server
from tests.support import cheap_home_env, free_port

PASSWORD = "correct horse battery staple"
HOST = "mail.example.test"
SENDER = "office@crash.test"  # SMTP: sends to RECIPIENT; its Sent is checked
RECIPIENT = "front@crash.test"  # its INBOX is moved and expunged in by a mover
APPENDER = "desk@crash.test"  # APPENDs to its own INBOX; moved and expunged too
FOLDERS = {SENDER: ("Sent",), RECIPIENT: ("INBOX", "Trash"), APPENDER: ("INBOX", "Trash")}
# The server's knobs for the run: a cheap KDF (one Argon2id pass, as the
# other server tests), and audit checkpoints often, so that kills also land
# in the middle of writing certs/audit-head.json.
SERVER_ENV = {"POSTVAULT_AUDIT_CHECKPOINT_EVENTS": "15", "POSTVAULT_AUDIT_CHECKPOINT_SECONDS": "1"}
# New-mail notifications go to a loopback port where nothing listens (they
# wait in the queue): never a DNS lookup or a connection off this machine.
NETWORK_ERRORS = (OSError, EOFError, smtplib.SMTPException, imaplib.IMAP4.abort, ssl.SSLError)
_MID = re.compile(rb"Message-ID:\s*<([^>]+)>", re.IGNORECASE)
_UID = re.compile(rb"UID (\d+)")


def make_message(frm: str, to: str, tag: str) -> bytes:
    """A small message whose Message-ID and body both carry ``tag``."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = frm
    msg["To"] = to
    msg["Subject"] = "Crash test"
    msg["Date"] = "Tue, 02 Jan 2024 09:30:00 -0500"
    msg["Message-ID"] = f"<{tag}@crash.test>"
    msg.set_content(f"tag {tag}\n" + "filler line\n" * random.randint(1, 200))
    return msg.as_bytes()


@dataclass
class Ledger:
    """What the clients know, guarded by one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempted: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    append_uid: dict[str, tuple[int, int]] = field(default_factory=dict)  # tag -> (uidvalidity, uid)
    moving: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    expunging: set[str] = field(default_factory=set)
    expunged: set[str] = field(default_factory=set)
    # (account, folder) -> {uid: tag}, and -> uidvalidity
    uids: dict[tuple[str, str], dict[int, str]] = field(default_factory=dict)
    validity: dict[tuple[str, str], int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    mover_rounds: int = 0  # completed MOVE-then-EXPUNGE rounds, all cycles

    def saw(self, account: str, folder: str, uid: int, tag: str) -> None:
        """A client was told ``uid`` holds ``tag``: a UID never changes hands."""
        with self.lock:
            known = self.uids.setdefault((account, folder), {})
            if known.setdefault(uid, tag) != tag:
                self.problems.append(f"UID {uid} of {account} {folder} held {known[uid]}, now {tag}")

    def saw_uidnext(self, account: str, folder: str, uidnext: int, when: str) -> None:
        """UIDNEXT must be above every UID handed out in this folder so far."""
        with self.lock:
            seen = self.uids.get((account, folder), {})
            if seen and max(seen) >= uidnext:
                self.problems.append(f"{account} {folder}: UIDNEXT {uidnext} {when}, but UID {max(seen)} "
                                     "was handed out before (UIDs went backwards)")

    def saw_validity(self, account: str, folder: str, validity: int) -> None:
        with self.lock:
            if self.validity.setdefault((account, folder), validity) != validity:
                self.problems.append(f"UIDVALIDITY of {account} {folder} changed from "
                                     f"{self.validity[(account, folder)]} to {validity}")


class Harness:
    """One throwaway home, its accounts, and the kill-and-restart loop."""

    def __init__(self, root: Path, seed: int | None = None) -> None:
        self.root = root
        self.home = root / "home"
        self.ledger = Ledger()
        self.counter = itertools.count(1)
        self.random = random.Random(seed)
        self.proc: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}
        self.logs: list[Path] = []
        self.kills = 0
        self.timings: Counter[str] = Counter()  # seconds spent per phase, for the report
        # More POSTVAULT_* for the server, over SERVER_ENV.
        self.server_env: dict[str, str] = {"POSTVAULT_NOTIFY_RELAY": f"127.0.0.1:{free_port()}"}
        with cheap_home_env():
            init_home(self.home, HOST)
            config = load_config(self.home)
            # Each account's Argon2id cost is stored with it and used at
            # every login; a tiny one here (below what the config accepts)
            # so that the many logins after each restart cost little. The
            # KDF is not what this test is about.
            store = Store.open(config.store.url, config.store.blobs or "database", KdfSettings(1024, 1, 1))
            try:
                store.create_account(SENDER, "member", "Crash Dental", PASSWORD)
                store.create_account(RECIPIENT, "member", "Crash Clinic", PASSWORD)
                store.create_account(APPENDER, "member", "Crash Desk", PASSWORD)
                # No new-mail notices: with thousands of deliveries they
                # would only pile up in the outbound queue (nothing listens
                # at the relay) and the worker's retries would take the CPU
                # the kills and the final check need.
                for account in (SENDER, RECIPIENT, APPENDER):
                    store.set_notification_settings(account, mode="off", actor="test")
            finally:
                store.close()
            # Likewise the bcrypt check every login does first: its cost is
            # stored in each hash, so the cheapest bcrypt allows (4).
            cheap = passwords.hash_password(PASSWORD, rounds=4)
            with sqlite3.connect(self.home / "data" / "postvault.db") as db:
                db.execute("UPDATE accounts SET password_hash = ?", (cheap,))
        self.ctx = client_context(self.home / "certs" / "ca.pem")

    # -- the server ------------------------------------------------------

    def start(self) -> None:
        began = time.monotonic()
        self.proc, self.ports, log = start_server(self.home, {**SERVER_ENV, **self.server_env})
        self.logs.append(log)
        self.timings["start"] += time.monotonic() - began

    def wait_for_sweep(self, timeout: float = 60) -> None:
        """Until this start's leftover sweep (sweep_service) has logged."""
        deadline = time.monotonic() + timeout
        while "leftover sweep done" not in self.logs[-1].read_text():
            assert time.monotonic() < deadline, "the leftover sweep did not finish"
            time.sleep(0.1)

    def swept(self) -> int:
        """Crash leftovers (blobs and temporary files) the restarts removed."""
        total = 0
        for log in self.logs:
            text = log.read_text()
            for m in re.finditer(r"leftover sweep done: (\d+) unreferenced blobs and (\d+) temporary", text):
                total += int(m[1]) + int(m[2])
        return total

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.kills += 1
        self.proc = None

    def stop(self) -> int:
        """SIGTERM (a clean drain); the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.proc = None
        return code

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
        env.update(self.server_env)  # the same store as the server's
        return subprocess.run([sys.executable, "-m", "postvault.cli.main", *args, "--home", str(self.home)],
                              env=env, capture_output=True, text=True, timeout=300)

    # -- clients -----------------------------------------------------------

    def imap(self, account: str) -> imaplib.IMAP4_SSL:
        m = imaplib.IMAP4_SSL("127.0.0.1", self.ports["imaps"], ssl_context=self.ctx, timeout=20)
        m.login(account, PASSWORD)
        return m

    def _smtp_loop(self, stop: threading.Event) -> None:
        led = self.ledger
        while not stop.is_set():
            try:
                with smtplib.SMTP_SSL("127.0.0.1", self.ports["submissions"], context=self.ctx, timeout=20) as s:
                    s.login(SENDER, PASSWORD)
                    while not stop.is_set():
                        tag = f"smtp-{next(self.counter)}"
                        with led.lock:
                            led.attempted.add(tag)
                        try:
                            s.sendmail(SENDER, [RECIPIENT], make_message(SENDER, RECIPIENT, tag))
                        except (smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused,
                                smtplib.SMTPSenderRefused) as exc:
                            # A real answer other than 250: nothing may be stored.
                            # (421 is the server going away, not a refusal.)
                            code = getattr(exc, "smtp_code", 0)
                            if code != 421:
                                with led.lock:
                                    led.refused.add(tag)
                            raise
                        with led.lock:
                            led.acked.add(tag)
            except NETWORK_ERRORS:
                return  # the server is gone: this cycle is over for this client

    def _append_loop(self, stop: threading.Event) -> None:
        led = self.ledger
        try:
            m = self.imap(APPENDER)
            while not stop.is_set():
                tag = f"app-{next(self.counter)}"
                with led.lock:
                    led.attempted.add(tag)
                typ, data = m.append("INBOX", None, None, make_message(APPENDER, APPENDER, tag))
                text = b" ".join(d for d in data if isinstance(d, bytes))
                found = re.search(rb"\[APPENDUID (\d+) (\d+)\]", text)
                if typ != "OK" or not found:
                    with led.lock:
                        led.refused.add(tag)
                        led.problems.append(f"APPEND of {tag} answered {typ} {text!r}")
                    return
                validity, uid = int(found[1]), int(found[2])
                with led.lock:
                    led.acked.add(tag)
                    led.append_uid[tag] = (validity, uid)
                led.saw_validity(APPENDER, "INBOX", validity)
                led.saw(APPENDER, "INBOX", uid, tag)
        except NETWORK_ERRORS:
            return

    def listing(self, m: imaplib.IMAP4_SSL, account: str, folder: str, last: int | None = None) -> dict[int, str]:
        """{uid: tag} of a folder (selected read-write), recorded in the
        ledger; only its ``last`` messages if given (the movers: a listing
        of the whole INBOX each round would grow with every cycle)."""
        typ, data = m.select(folder)
        if typ != "OK":
            raise OSError(f"SELECT {folder} failed: {data!r}")
        validity = m.response("UIDVALIDITY")[1]
        if validity and validity[0]:
            self.ledger.saw_validity(account, folder, int(validity[0]))
        exists = int(data[0] or 0)
        if not exists:
            return {}
        first = 1 if last is None else max(1, exists - last + 1)
        typ, data = m.fetch(f"{first}:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        out: dict[int, str] = {}
        for item in data or ():
            if isinstance(item, tuple):
                uid, mid = _UID.search(item[0]), _MID.search(item[1])
                if uid and mid:
                    out[int(uid[1])] = mid[1].decode().split("@")[0]
        for uid, tag in out.items():
            self.ledger.saw(account, folder, uid, tag)
        return out

    def _mover_loop(self, account: str, stop: threading.Event) -> None:
        led = self.ledger
        try:
            m = self.imap(account)
            while not stop.is_set():
                inbox = self.listing(m, account, "INBOX", last=40)
                pick = self.random.sample(sorted(inbox), min(len(inbox), self.random.randint(1, 4)))
                if pick:
                    tags = {inbox[u] for u in pick}
                    with led.lock:
                        led.moving |= tags
                    typ, data = m.uid("MOVE", ",".join(map(str, pick)), "Trash")
                    if typ != "OK":
                        with led.lock:
                            led.problems.append(f"MOVE answered {typ} {data!r}")
                        return
                    with led.lock:
                        led.moved |= tags
                    copyuid = m.response("COPYUID")[1]
                    self._record_copyuid(account, pick, inbox, copyuid)
                trash = self.listing(m, account, "Trash", last=40)
                pick = self.random.sample(sorted(trash), min(len(trash), self.random.randint(1, 2)))
                if pick:
                    uids = ",".join(map(str, pick))
                    tags = {trash[u] for u in pick}
                    with led.lock:
                        led.expunging |= tags
                    m.uid("STORE", uids, "+FLAGS.SILENT", "(\\Deleted)")
                    typ, data = m.uid("EXPUNGE", uids)
                    if typ != "OK":
                        with led.lock:
                            led.problems.append(f"UID EXPUNGE answered {typ} {data!r}")
                        return
                    with led.lock:
                        led.expunged |= tags
                with led.lock:
                    led.mover_rounds += 1
                stop.wait(0.05)
        except NETWORK_ERRORS:
            return

    def _record_copyuid(self, account: str, pick: list[int], inbox: dict[int, str],
                        copyuid: list[bytes | None]) -> None:
        for item in copyuid or ():
            if not item:
                continue
            parts = item.split()
            if len(parts) != 3:
                continue
            self.ledger.saw_validity(account, "Trash", int(parts[0]))
            src, dst = _uid_set(parts[1]), _uid_set(parts[2])
            for s, d in zip(src, dst):
                if s in inbox:
                    self.ledger.saw(account, "Trash", d, inbox[s])

    # -- one cycle ----------------------------------------------------------

    def cycle(self, kill_after: float, *, early: bool = False) -> None:
        """Start, load, SIGKILL, wait for the clients to notice.

        The kill comes ``kill_after`` seconds after the load is flowing (an
        SMTP message and an APPEND acknowledged in this cycle, and two
        mover rounds done: a loaded machine takes a while for the logins),
        or, if
        ``early``, that long after the server said it was ready (startup,
        logins)."""
        self.start()
        self.check_uids()
        stop = threading.Event()
        workers: list[Callable[[], None]] = [
            lambda: self._smtp_loop(stop), lambda: self._smtp_loop(stop), lambda: self._smtp_loop(stop),
            lambda: self._append_loop(stop), lambda: self._append_loop(stop),
            lambda: self._mover_loop(RECIPIENT, stop), lambda: self._mover_loop(APPENDER, stop),
        ]
        threads = [threading.Thread(target=self._guarded, args=(w,), daemon=True) for w in workers]
        before = next(self.counter)
        rounds = self.ledger.mover_rounds
        for t in threads:
            t.start()
        began = time.monotonic()
        deadline = began + 60
        while not early and time.monotonic() < deadline:
            with self.ledger.lock:
                fresh = [t for t in self.ledger.acked if int(t.split("-")[1]) > before]
                moving = self.ledger.mover_rounds >= rounds + 2
            if moving and any(t.startswith("smtp-") for t in fresh) and any(t.startswith("app-") for t in fresh):
                break
            time.sleep(0.02)
        self.timings["logins"] += time.monotonic() - began
        time.sleep(kill_after)
        self.timings["load"] += kill_after
        began = time.monotonic()
        self.kill()
        stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a client thread did not notice the server was killed"
        self.timings["kill"] += time.monotonic() - began

    def _guarded(self, work: Callable[[], None]) -> None:
        """A client's loop; anything but the server going away (which each
        loop handles) is a problem the test reports, not a lost thread."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            with self.ledger.lock:
                self.ledger.problems.append(f"a client failed: {exc!r}")

    # -- checks -----------------------------------------------------------

    def check_uids(self) -> None:
        """After a restart, every folder's UIDVALIDITY is the one clients
        were told and its UIDNEXT is above every UID a client was ever told
        (read from the database file, as no client runs: no login, so it is
        cheap enough for every cycle)."""
        with sqlite3.connect(f"file:{self.home / 'data' / 'postvault.db'}?mode=ro", uri=True, timeout=30) as db:
            rows = db.execute("SELECT a.email, b.name, b.uidvalidity, b.uidnext FROM mailboxes b "
                              "JOIN accounts a ON a.id = b.account_id").fetchall()
        for account, folder, validity, nxt in rows:
            if folder in FOLDERS.get(account, ()):
                self.ledger.saw_validity(account, folder, int(validity))
                self.ledger.saw_uidnext(account, folder, int(nxt), "after a restart")

    def contents(self) -> dict[tuple[str, str], dict[int, str]]:
        """Every folder's {uid: tag}, each message opened in full (FETCH
        BODY[] decrypts it; its body must name its own tag)."""
        out: dict[tuple[str, str], dict[int, str]] = {}
        for account, folders in FOLDERS.items():
            m = self.imap(account)
            try:
                for folder in folders:
                    listing = self.listing(m, account, folder)
                    out[(account, folder)] = listing
                    typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
                    assert typ == "OK", data
                    opened = 0
                    for item in data or ():
                        if not isinstance(item, tuple):
                            continue
                        uid = int(_UID.search(item[0])[1])  # type: ignore[index]
                        tag = listing.get(uid)
                        if tag is None or f"tag {tag}".encode() not in item[1]:
                            self.ledger.problems.append(f"{account} {folder} UID {uid} does not open as {tag}")
                        opened += 1
                    if opened != len(listing):
                        self.ledger.problems.append(f"{account} {folder}: {len(listing)} listed, {opened} opened")
            finally:
                m.logout()
        return out

    def final_check(self) -> dict[str, int]:
        """The consistency rules over the whole run; returns the numbers."""
        led = self.ledger
        boxes = self.contents()
        problems = led.problems
        held: dict[str, Counter[str]] = {a: Counter() for a in FOLDERS}
        for (account, _folder), listing in boxes.items():
            held[account].update(listing.values())
        found = set().union(*(set(c) for c in held.values()))

        for tag in sorted(found - led.attempted):
            problems.append(f"{tag} is stored but no client ever sent it")
        for tag in sorted(found & led.refused):
            problems.append(f"{tag} is stored although the server refused it")
        for account, counts in held.items():
            for tag, n in counts.items():
                if n > 1:
                    problems.append(f"{tag} is stored {n} times for {account}")
        for tag in sorted(led.acked):
            if tag.startswith("smtp-"):
                if held[SENDER][tag] != 1:
                    problems.append(f"acked {tag} is in the sender's Sent {held[SENDER][tag]} times")
                self._expect_one(tag, held[RECIPIENT][tag], problems)
            else:
                self._expect_one(tag, held[APPENDER][tag], problems)
        # Delivery is all or nothing: INBOX copy and Sent copy together.
        for tag in sorted(t for t in found if t.startswith("smtp-")):
            if held[SENDER][tag] and not held[RECIPIENT][tag] and tag not in led.expunging:
                problems.append(f"{tag} is in the sender's Sent but not with the recipient")
            if held[RECIPIENT][tag] and not held[SENDER][tag]:
                problems.append(f"{tag} is with the recipient but not in the sender's Sent")
        # An acked APPEND that was never moved sits at the UID it was given.
        inbox = {tag: uid for uid, tag in boxes[(APPENDER, "INBOX")].items()}
        for tag, (validity, uid) in led.append_uid.items():
            if tag in inbox and tag not in led.moving and inbox[tag] != uid:
                problems.append(f"{tag} was appended as UID {uid}, is now UID {inbox[tag]}")
            if validity != led.validity[(APPENDER, "INBOX")]:
                problems.append(f"{tag} was appended under UIDVALIDITY {validity}")
        in_flight = led.attempted - led.acked - led.refused
        return {
            "kills": self.kills,
            "attempted": len(led.attempted),
            "acked": len(led.acked),
            "acked_smtp": sum(t.startswith("smtp-") for t in led.acked),
            "acked_append": sum(t.startswith("app-") for t in led.acked),
            "refused": len(led.refused),
            "in_flight": len(in_flight),
            "lost_in_flight_stored": len(found & in_flight),
            "moved": len(led.moved),
            "expunged": len(led.expunged),
            "stored_now": sum(len(v) for v in boxes.values()),
            "leftovers_swept": self.swept(),
        }

    def _expect_one(self, tag: str, n: int, problems: list[str]) -> None:
        led = self.ledger
        if tag in led.expunged:
            if n:
                problems.append(f"{tag} is still stored after its EXPUNGE was acknowledged")
        elif tag in led.expunging:
            if n > 1:
                problems.append(f"{tag} is stored {n} times")
        elif n != 1:
            problems.append(f"acked {tag} is stored {n} times")


def _uid_set(text: bytes) -> list[int]:
    out: list[int] = []
    for part in text.split(b","):
        lo, _, hi = part.partition(b":")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
