"""Postvault side by side with Dovecot (IMAP) and Postfix (submission).

Run as ``python bench/compare.py`` (``--quick`` for a smoke run of a few
minutes; ``--runs N`` for N runs, default 3). Markdown for the last section
of docs/benchmarks.md goes to standard output, progress to standard error.

The peers are Debian's packages, used only if installed::

    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-imapd postfix libsasl2-modules sasl2-bin

(CI does not install them: benchmarks are not tests.) A peer that is not
installed is skipped and the report says so; Postfix needs Dovecot too,
for SASL. The script must run as root (both peers start as root and drop
privileges, as they do when installed).

What runs, all on 127.0.0.1, in one temporary folder removed at the end
(servers stopped in ``finally``, at exit, and on SIGTERM/SIGINT):

- **Postvault**: ``postvault serve`` from this checkout on a fresh home
  (``init_home``: shipped config and KDF cost), with the ``imaps`` and
  ``submissions`` listeners on free ports.
- **Dovecot**: ``dovecot -F -c DIR/dovecot.conf``, a throwaway config: its
  own base_dir and state_dir, ``ssl = required`` with Postvault's dev
  certificate (the home's certs/server.pem and server.key), an imaps
  listener only, passdb passwd-file with BLF-CRYPT hashes of cost 12 (the
  bcrypt cost Postvault uses) made by ``doveadm pw``, the auth cache on,
  maildir in the temporary folder (mail owned by nobody), otherwise
  Debian's defaults (a login process per connection, fsync on save).
- **Postfix**: ``postfix -c DIR start`` with its own config_directory,
  queue_directory and data_directory; only a submissions service (implicit
  TLS, ``smtpd_tls_wrappermode=yes``, same certificate) with SASL through
  Dovecot's auth socket in the queue's private/ folder. Accepted mail is
  queued (fsync) before 250, as always with Postfix, then delivered by its
  ``virtual`` agent to a maildir: a whole server's work, as Postvault's
  (which stores in INBOX and Sent before 250). Between rounds the script
  waits until Postfix's queue is empty, and that delivery's CPU time is
  counted in Postfix's CPU per message.

The load is the same client code for every server, in the same run, with
the servers' rounds alternating (their order flips every run) so that load
from elsewhere on the machine falls on all alike:

- IMAP, the asyncio client of ``bench/imap_load.py`` over verified TLS, on a
  mailbox of ``--messages`` realistic messages (``bench/imap_populate.py``;
  Postvault's filed by ``BulkFiler`` as ``Store.deliver`` would, Dovecot's
  the same generated messages, flags and dates written as maildir files),
  C = 1 and C = 10 clients: connect, LOGIN (warm: each server has seen the
  account once), SELECT, FETCH of headers (50-message windows, the
  header fields a mail client lists), FETCH of whole bodies
  (``BODY.PEEK[]``, random messages), STORE +/-FLAGS, SEARCH on flags and
  dates, a mixed load (each client a fixed random sequence: 25 % header
  windows, 30 % bodies, 20 % STORE, 10 % SEARCH, 10 % NOOP, 5 % SELECT),
  IDLE wake-up (``imap_load.idle_wakeup``: all C clients IDLE while one more
  connection APPENDs; APPEND sent to each ``* N EXISTS``); then, at C = 1,
  SEARCH FROM (a header search) and cold LOGIN (an account the server has
  never seen: bcrypt, plus Argon2id for Postvault).
- SMTP, ``bench/smtp_load.py``'s ``run_round`` (smtplib over implicit TLS,
  AUTH PLAIN before the clock starts): 10 KB, 1 MB and 10 MB messages at
  C = 1 and C = 10.

Server CPU is user + system time of the server's whole process tree
(``/proc``: live processes plus what the master has reaped), per command or
message: on a shared machine it is steadier than rates. Ratios are
Postvault / peer: for rates above 100 % is Postvault faster; the run-by-run
ratios pair each Postvault round with the peer's round of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import math
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

HOSTNAME = "mail.bench.test"
SEED = 1
BCRYPT_COST = 12  # postvault.store.passwords.ROUNDS
GOALS = {  # issue 9 item 3
    "smtp_10k_msgs": 1.00, "smtp_10m_mbs": 0.50, "imap_mixed": 0.60, "imap_bodies": 0.25,
    "idle_p99_ms": 250.0, "cold_p50_ms": 400.0, "warm_p50_ms": 30.0,
}
HEADER_FIELDS = b"(From To Cc Subject Date Message-ID References In-Reply-To Content-Type)"
SMTP_SIZES = ("10 KB", "1 MB", "10 MB")
SMTP_N = {False: {("10 KB", 1): 100, ("10 KB", 10): 300, ("1 MB", 1): 20, ("1 MB", 10): 40, ("10 MB", 1): 8,
                  ("10 MB", 10): 20},
          True: {("10 KB", 1): 15, ("10 KB", 10): 40, ("1 MB", 1): 5, ("1 MB", 10): 10, ("10 MB", 1): 3,
                 ("10 MB", 10): 10}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port}")


def run(cmd: Sequence[str], timeout: float = 60) -> str:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {(out.stderr or out.stdout)[-800:]}")
    return out.stdout


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid``, its live descendants, and the
    children it has reaped (a master that forks per connection)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        own = (int(fields[11]) + int(fields[12])) / tick
        if int(entry) == pid:
            own += (int(fields[13]) + int(fields[14])) / tick
        stats[int(entry)] = (int(fields[1]), own)
    total, todo, seen = 0.0, [pid], set()
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    while todo:
        p = todo.pop()
        if p in seen or p not in stats:
            continue
        seen.add(p)
        total += stats[p][1]
        todo += children.get(p, [])
    return total


# -- the servers ---------------------------------------------------------------------------------------


@dataclass
class Target:
    """One server under test, as the load code sees it: ``home`` only for
    the CA (imap_load.client_context reads home/certs/ca.pem)."""

    name: str
    home: Path
    imap_port: int = 0
    smtp_port: int = 0
    pid: int = 0
    drain: Callable[[], None] | None = None  # wait until accepted mail is delivered

    def cpu_seconds(self) -> float:
        return tree_cpu(self.pid)


class Lab:
    """Every server process of the run, and their teardown."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.home = work / "postvault-home"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.postfix_conf: Path | None = None
        self.postfix_pid = 0
        self.versions: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self._stopped = False

    # Postvault ---------------------------------------------------------------------------------------

    def postvault(self, concurrency: int, smtp_processes: int = 1) -> Target:
        t = Target("Postvault", self.home, free_port(), free_port())
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
        env.update(POSTVAULT_LISTEN_IMAPS=f"127.0.0.1:{t.imap_port}", POSTVAULT_LISTEN_IMAP="",
                   POSTVAULT_LISTEN_HTTPS="", POSTVAULT_LISTEN_SUBMISSION="",
                   POSTVAULT_LISTEN_SUBMISSIONS=f"127.0.0.1:{t.smtp_port}",
                   POSTVAULT_SMTP_MAX_CONNECTIONS_PER_IP=str(max(50, concurrency + 5)), PYTHONUNBUFFERED="1",
                   POSTVAULT_SMTP_PROCESSES=str(smtp_processes),
                   PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-m", "postvault.cli.main", "serve", "--home", str(self.home)],
                                env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                                stderr=(self.work / "postvault.log").open("wb"))
        self.procs.append(proc)
        from smtp_load import wait_ready

        wait_ready(proc, b"postvault ready")
        assert proc.stdout is not None
        out = proc.stdout
        # Keep reading its standard output, so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in iter(lambda: out.read(4096), b"")], daemon=True).start()
        t.pid = proc.pid
        return t

    # Dovecot ----------------------------------------------------------------------------------------------

    def dovecot(self, users: dict[str, str]) -> Target | None:
        """Dovecot on a free port; ``users``: address -> password."""
        if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
            self.skipped["Dovecot"] = "not installed (apt-get install dovecot-imapd)"
            return None
        self.versions["Dovecot"] = run(["dovecot", "--version"]).split()[0]
        d = self.work / "dovecot"
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        hashes = {pw: run(["doveadm", "pw", "-s", "BLF-CRYPT", "-r", str(BCRYPT_COST), "-p", pw]).strip()
                  for pw in set(users.values())}
        (d / "users").write_text("".join(f"{u}:{hashes[pw]}\n" for u, pw in users.items()))
        shutil.chown(d / "users", "root", "dovecot")  # read by the auth process, which runs as dovecot
        os.chmod(d / "users", 0o640)
        spool = self.work / "postfix" / "spool"
        (spool / "private").mkdir(parents=True, exist_ok=True)
        port = free_port()
        home = self.home
        conf = f"""# Throwaway Dovecot for bench/compare.py
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
instance_name = dovecot-bench-{os.getpid()}
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{home}/certs/server.pem
ssl_key = <{home}/certs/server.key
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_cache_size = 10M
auth_cache_ttl = 1 hour
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:{d}/mail/%u/Maildir
passdb {{
  driver = passwd-file
  args = scheme=BLF-CRYPT {d}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/mail/%u
}}
protocol imap {{
  mail_max_userip_connections = 500
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service auth {{
  unix_listener {spool}/private/auth {{
    mode = 0666
  }}
}}
"""
        (d / "dovecot.conf").write_text(conf)
        run(["dovecot", "-c", str(d / "dovecot.conf"), "-n"])  # config check
        shutil.chown(d / "mail", "nobody", "nogroup")
        proc = subprocess.Popen(["dovecot", "-F", "-c", str(d / "dovecot.conf")], stdout=subprocess.DEVNULL,
                                stderr=(d / "stderr.log").open("wb"))
        self.procs.append(proc)
        wait_port(port, proc, "dovecot")
        return Target("Dovecot", self.home, imap_port=port, pid=proc.pid)

    def dovecot_maildir(self, user: str) -> Path:
        return self.work / "dovecot" / "mail" / user / "Maildir"

    # Postfix ------------------------------------------------------------------------------------------------

    def postfix(self, have_dovecot: bool) -> Target | None:
        if shutil.which("postfix") is None or not Path("/usr/lib/postfix/sbin/master").exists():
            self.skipped["Postfix"] = "not installed (apt-get install postfix libsasl2-modules sasl2-bin)"
            return None
        if not have_dovecot:
            self.skipped["Postfix"] = "needs Dovecot's auth service for SASL, and Dovecot is not running"
            return None
        self.versions["Postfix"] = run(["postconf", "-d", "-h", "mail_version"]).strip()
        p = self.work / "postfix"
        conf, spool, data, mail = p / "conf", p / "spool", p / "data", p / "mail"
        for x in (conf, spool / "private", data, mail):
            x.mkdir(parents=True, exist_ok=True)
        shutil.chown(spool / "private", "postfix")
        os.chmod(spool / "private", 0o700)
        shutil.chown(data, "postfix")
        shutil.chown(mail, "nobody", "nogroup")
        port = free_port()
        home = self.home
        (conf / "main.cf").write_text(f"""# Throwaway Postfix for bench/compare.py
compatibility_level = 3.6
config_directory = {conf}
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file_prefixes = {self.work}
maillog_file = {p}/postfix.log
myhostname = {HOSTNAME}
mydomain = bench.test
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtputf8_enable = no
biff = no
alias_maps =
alias_database =
local_recipient_maps =
message_size_limit = 0
mailbox_size_limit = 0
virtual_mailbox_limit = 0
virtual_mailbox_domains = bench.test
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:maildir/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_tls_cert_file = {home}/certs/server.pem
smtpd_tls_key_file = {home}/certs/server.key
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
smtpd_client_connection_count_limit = 0
""")
        services = [
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"), ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"), ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"), ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"), ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"), ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"), ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"), ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"), ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("local", "unix", "-", "n", "n", "-", "-", "local"), ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"), ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        (conf / "master.cf").write_text(
            f"127.0.0.1:{port} inet n - n - - smtpd\n  -o smtpd_tls_wrappermode=yes\n"
            "  -o smtpd_tls_security_level=encrypt\n  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
            + "".join(" ".join(s) + "\n" for s in services))
        self.postfix_conf = conf
        out = subprocess.run(["postfix", "-c", str(conf), "start"], capture_output=True, text=True, timeout=120,
                             check=False)
        pidfile = spool / "pid" / "master.pid"
        if out.returncode or not pidfile.exists():
            log_text = (p / "postfix.log").read_text()[-1500:] if (p / "postfix.log").exists() else ""
            raise RuntimeError(f"postfix did not start ({out.returncode}): {out.stderr[-500:]} {log_text}")
        self.postfix_pid = int(pidfile.read_text().split()[0])
        wait_port(port, None, "postfix")
        queue = [spool / q for q in ("maildrop", "incoming", "active", "deferred", "hold")]

        def drain(seconds: float = 300) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if not any(files for q in queue for _, _, files in os.walk(q)):
                    return
                time.sleep(0.05)
            raise RuntimeError("Postfix's queue did not drain")

        return Target("Postfix", self.home, smtp_port=port, pid=self.postfix_pid, drain=drain)

    # teardown -----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.postfix_conf is not None:
            try:
                subprocess.run(["postfix", "-c", str(self.postfix_conf), "stop"], capture_output=True, timeout=60,
                               check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for _ in range(100):
                if not Path(f"/proc/{self.postfix_pid}").exists():
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(self.postfix_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# -- mailboxes --------------------------------------------------------------------------------------------


def make_postvault_home(lab: Lab, messages: int, cold: list[str], workers: int) -> tuple[float, float]:
    """The Postvault home: accounts and the reader's INBOX. Returns (t0,
    step) of the messages' dates, for writing the same mailbox elsewhere."""
    import imap_load as il
    import smtp_load as sl
    from imap_populate import BulkFiler

    from postvault.home import init_home, open_store

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("POSTVAULT_")}
    try:
        config = init_home(lab.home, HOSTNAME)
    finally:
        os.environ.update(saved)
    os.chmod(lab.work, 0o755)  # Dovecot and Postfix drop privileges; they need to reach their folders
    store = open_store(config)
    accounts = [(a, il.PASSWORD) for a in (il.READER, *il.SENDERS, *cold)]
    accounts += [(sl.SENDER, sl.PASSWORD), (sl.RECIPIENT, sl.PASSWORD)]
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:  # bcrypt and Argon2id release the GIL
        list(pool.map(lambda a: store.create_account(a[0], "member", "Bench " + a[0].split("@")[0], a[1]),
                      accounts))
    log(f"Postvault: {len(accounts)} accounts in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    filer = BulkFiler(store, il.READER, il.SENDERS, HOSTNAME, seed=SEED)
    days = 3 * 365.0
    t0 = (datetime.now(UTC) - timedelta(days=days)).timestamp()
    filer.file(messages, days=days, workers=workers)
    store.close()
    log(f"Postvault: {messages:,} messages filed in {time.perf_counter() - t:.1f} s")
    return t0, days * 86400 / max(messages, 1)


def write_maildir(maildir: Path, messages: int, t0: float, step: float) -> None:
    """The same messages, flags and dates as BulkFiler's, as maildir files
    (the file's mtime is the INTERNALDATE; names sort by date, so UIDs go
    in the same order as Postvault's)."""
    import imap_load as il
    from imap_populate import _date, flags_for, make_message

    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    letters = {"\\Flagged": "F", "\\Answered": "R", "\\Seen": "S"}
    for i in range(messages):
        when = _date(t0, step, i)
        raw = make_message(SEED, i, il.SENDERS[i % len(il.SENDERS)], il.READER, when, hostname=HOSTNAME)
        flags = "".join(sorted(letters[f] for f in flags_for(rng, i, messages)))
        ts = int(when.timestamp())
        path = maildir / "cur" / f"{ts}.M{i:06d}P1.bench,S={len(raw)}:2,{flags}"
        path.write_bytes(raw)
        os.utime(path, (ts, ts))
    for dirpath, dirnames, filenames in os.walk(maildir.parent.parent):
        for n in dirnames + filenames:
            shutil.chown(os.path.join(dirpath, n), "nobody", "nogroup")
        shutil.chown(dirpath, "nobody", "nogroup")


# -- IMAP load ----------------------------------------------------------------------------------------------

Results = dict[tuple[str, int], list["Phase"]]  # noqa: F821 (imap_load.Phase)


@dataclass
class ImapCfg:
    messages: int
    runs: int
    reps: int  # C = 1: connections and SELECTs per run
    headers: int  # header windows per client
    bodies: int
    stores: int
    searches: int
    mixed: int
    appends: int
    cold: int  # cold logins per run
    cap: float
    foreign: int = 0  # imap_load.idle_wakeup: no Store.deliver from this process
    concurrency: tuple[int, ...] = (1, 10)


def header_window(lo: int) -> bytes:
    return b"UID FETCH %d:%d (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS %s])" % (lo, lo + 49, HEADER_FIELDS)


def flag_searches() -> list[bytes]:
    since = (datetime.now(UTC) - timedelta(days=30)).strftime("%d-%b-%Y").encode()
    return [b"UID SEARCH UNSEEN", b"UID SEARCH FLAGGED", b"UID SEARCH SINCE " + since]


def mixed_script(rng: random.Random, n: int, length: int) -> list[bytes]:
    """One client's mixed load: a fixed sequence, the same for every server."""
    searches = flag_searches()
    out = []
    for _ in range(length):
        x = rng.random()
        if x < 0.25:
            out.append(header_window(rng.randint(1, max(1, n - 49))))
        elif x < 0.55:
            out.append(b"UID FETCH %d BODY.PEEK[]" % rng.randint(1, n))
        elif x < 0.75:
            out.append(b"UID STORE %d %sFLAGS (\\Flagged)" % (rng.randint(1, n), rng.choice((b"+", b"-"))))
        elif x < 0.85:
            out.append(rng.choice(searches))
        elif x < 0.95:
            out.append(b"NOOP")
        else:
            out.append(b"SELECT INBOX")
    return out


OPS = {  # row names, in report order
    "connect": "connect + TLS + greeting",
    "login": "LOGIN (warm: account seen before)",
    "select": "SELECT INBOX",
    "headers": "UID FETCH 50 messages' header fields",
    "bodies": "UID FETCH BODY.PEEK[] (random message)",
    "store": "UID STORE ±FLAGS (\\Flagged)",
    "search": "UID SEARCH UNSEEN / FLAGGED / SINCE",
    "mixed": "mixed load (see above)",
    "append": "APPEND (small message, other connection)",
    "idle": "IDLE wake-up: APPEND sent → * N EXISTS (each of C idlers)",
    "search_from": "UID SEARCH FROM (header search)",
    "cold": "LOGIN, cold (account never seen)",
}


async def imap_run(server: Target, cfg: ImapCfg, c: int, results: Results, seed: int, cold: list[str],
                   append_no: list[int]) -> None:
    """One run of every IMAP operation with ``c`` clients."""
    import imap_load as il

    class Srv:  # what imap_load's helpers read: port, home, cpu_seconds()
        port = server.imap_port
        home = server.home

        @staticmethod
        def cpu_seconds() -> float:
            return server.cpu_seconds()

    srv = Srv()
    rng = random.Random(seed)
    n = cfg.messages
    ctx = il.client_context(server.home)
    reps = cfg.reps if c == 1 else 1
    conns: list[list[il.Client]] = [[] for _ in range(c)]

    async def phase(key: str, jobs: Callable[[il.Phase], list[Awaitable[object]]]) -> None:
        await il.phase(results, OPS[key], c, srv, jobs)  # type: ignore[arg-type]

    async def connect(ph: il.Phase, i: int) -> None:
        for _ in range(reps):
            t = time.perf_counter()
            conns[i].append(await il.Client.connect(server.imap_port, ctx, f"127.0.0.{2 + i % 8}"))
            ph.latencies.append(time.perf_counter() - t)

    async def script(cl: il.Client, ph: il.Phase, commands: list[bytes]) -> None:
        deadline = time.perf_counter() + cfg.cap
        for cmd in commands:
            await il.timed(ph.latencies, cl.command(cmd, keep=False, timeout=300))
            if time.perf_counter() > deadline:
                break

    await phase("connect", lambda ph: [connect(ph, i) for i in range(c)])
    clients = [mine[-1] for mine in conns]
    try:
        warm = await il.Client.connect(server.imap_port, ctx)
        await warm.login(il.READER, il.PASSWORD)
        await warm.logout()

        async def login(ph: il.Phase, mine: list[il.Client]) -> None:
            for cl in mine:
                await il.timed(ph.latencies, cl.login(il.READER, il.PASSWORD))

        await phase("login", lambda ph: [login(ph, mine) for mine in conns])
        await asyncio.gather(*(cl.logout() for mine in conns for cl in mine[:-1]))
        await phase("select", lambda ph: [script(cl, ph, [b"SELECT INBOX"] * reps) for cl in clients])
        per = {k: [[] for _ in clients] for k in ("headers", "bodies", "store", "search", "mixed")}
        searches = flag_searches()
        for i in range(c):
            per["headers"][i] = [header_window(rng.randint(1, max(1, n - 49))) for _ in range(cfg.headers)]
            per["bodies"][i] = [b"UID FETCH %d BODY.PEEK[]" % rng.randint(1, n) for _ in range(cfg.bodies)]
            uids = [rng.randint(1, n) for _ in range(cfg.stores // 2)]
            per["store"][i] = [b"UID STORE %d %sFLAGS (\\Flagged)" % (u, s) for u in uids for s in (b"+", b"-")]
            per["search"][i] = [searches[k % len(searches)] for k in range(cfg.searches)]
            per["mixed"][i] = mixed_script(rng, n, cfg.mixed)
        for key in ("headers", "bodies", "store", "search", "mixed"):
            await phase(key, lambda ph, key=key: [script(cl, ph, per[key][i]) for i, cl in enumerate(clients)])
            await asyncio.gather(*(cl.command(b"NOOP", keep=False) for cl in clients))  # catch up on flags
        await il.idle_wakeup(srv, cfg, c, results, clients, ctx, append_no)  # type: ignore[arg-type]
        for old, new in (("IDLE wake-up: APPEND sent → * N EXISTS (each of C idlers)", OPS["idle"]),
                         ("APPEND (small message, other connection)", OPS["append"])):
            if old != new:
                results.setdefault((new, c), []).append(results[(old, c)].pop())
    finally:
        await asyncio.gather(*(cl.logout() for mine in conns for cl in mine))
    if c == 1:
        cl = await il.Client.connect(server.imap_port, ctx)
        try:
            await cl.login(il.READER, il.PASSWORD)
            await cl.command(b"SELECT INBOX", keep=False)
            # Once per run: Postvault decrypts every message's header block for it.
            await phase("search_from", lambda ph: [il.timed(ph.latencies, cl.command(
                b'UID SEARCH FROM "ortho2"', keep=False, timeout=1800))])
        finally:
            await cl.logout()
        ph = il.Phase()
        for email in cold:
            cl = await il.Client.connect(server.imap_port, ctx)
            try:
                await il.timed(ph.latencies, cl.login(email, il.PASSWORD))
            finally:
                await cl.logout()
        results.setdefault((OPS["cold"], 1), []).append(ph)


async def imap_warmup(server: Target, n: int) -> None:
    """Untimed: the server reads the whole mailbox once (Dovecot builds its
    index and header cache; Postvault's pages and caches fill)."""
    import imap_load as il

    cl = await il.Client.connect(server.imap_port, il.client_context(server.home))
    try:
        await cl.login(il.READER, il.PASSWORD)
        await cl.command(b"SELECT INBOX", keep=False, timeout=600)
        for lo in range(1, n + 1, 500):
            await cl.command(b"UID FETCH %d:%d (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS %s])"
                             % (lo, lo + 499, HEADER_FIELDS), keep=False, timeout=600)
    finally:
        await cl.logout()


# -- SMTP load ----------------------------------------------------------------------------------------------


@dataclass
class SmtpRound:
    msgs: float
    mbs: float
    latencies: list[float]
    cpu: float  # server CPU seconds per message, delivery included


def smtp_round(server: Target, ctx: ssl.SSLContext, c: int, messages: list[bytes]) -> SmtpRound:
    import smtp_load as sl

    cpu0: list[float] = []
    r = sl.run_round(server.smtp_port, ctx, c, messages, lambda: cpu0.append(server.cpu_seconds()))
    if server.drain is not None:
        server.drain()
    cpu = server.cpu_seconds() - cpu0[0]
    return SmtpRound(r.count / r.seconds, r.size / sl.MB / r.seconds, r.latencies, cpu / r.count)


# -- report ------------------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    if math.isnan(x):
        return "—"
    if x == float("inf"):
        return "lost"
    return f"{x:.0f}" if abs(x) >= 99.5 else f"{x:.1f}" if abs(x) >= 9.95 else f"{x:.2f}"


def mmm(values: Sequence[float]) -> str:
    v = sorted(values)
    if not v:
        return "—"
    if len(v) == 1:
        return fmt(v[0])
    return f"{fmt(v[0])} / {fmt(statistics.median(v))} / {fmt(v[-1])}"


def pct_mmm(values: Sequence[float]) -> str:
    v = sorted(values)
    if not v:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.0%}"
    return f"{v[0]:.0%} / {statistics.median(v):.0%} / {v[-1]:.0%}"


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def pc(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.0%}"


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_line(lab: Lab) -> str:
    import imap_load as il

    ossl = "unknown"
    try:
        ossl = run(["openssl", "version"]).split()[1]
    except (OSError, RuntimeError, IndexError):
        pass
    peers = ", ".join(f"{k} {v}" for k, v in lab.versions.items()) or "no peers"
    return (f"Machine: {il.machine_line()}; {peers}; system OpenSSL {ossl} (the peers'), Python's "
            f"{ssl.OPENSSL_VERSION.split()[1]}. Clients and servers on the same machine over loopback.")


@dataclass
class Report:
    imap: dict[str, Results] = field(default_factory=dict)
    smtp: dict[str, dict[tuple[str, int], list[SmtpRound]]] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)
    minutes: float = 0.0
    load_samples: list[float] = field(default_factory=list)  # 1-minute load average, every 30 s


def print_report(rep: Report, lab: Lab, icfg: ImapCfg | None, runs: int, argv: str) -> None:
    import imap_load as il

    print(f"Command: `python bench/compare.py{argv}`. {machine_line(lab)}")
    samples = getattr(rep, "load_samples", None)
    during = f", {mmm(samples)} (min / median / max) sampled every 30 s during the run" if samples else ""
    print(f"Server code: {il.source_version()}. Whole run {rep.minutes:.1f} minutes; load average "
          f"{rep.load[0]:.1f} at the start, {rep.load[1]:.1f} at the end{during} (the machine is shared: compare "
          "the ratios, measured in the same run with the servers' rounds interleaved, rather than absolute "
          "figures).\n")
    for name, why in lab.skipped.items():
        print(f"- **{name} skipped**: {why}.")
    if lab.skipped:
        print()
    goals: list[tuple[str, str, str, str, str, str]] = []

    def ratio_runs(a: list[float], b: list[float]) -> list[float]:
        return [x / y for x, y in zip(a, b) if y]

    if rep.smtp:
        peer = next((k for k in rep.smtp if k != "Postvault"), None)
        print(f"### SMTP submission (implicit TLS, AUTH PLAIN before the clock; {runs} run(s))\n")
        print("| size | C | server | messages per run | msg/s | MB/s | p50 ms | p99 ms | server CPU ms per message |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key in rep.smtp.get("Postvault", {}):
            for name, by in rep.smtp.items():
                rs = by.get(key, [])
                if not rs:
                    continue
                n = len(rs[0].latencies)
                print(f"| {key[0]} | {key[1]} | {name} | {n} | {mmm([r.msgs for r in rs])} | "
                      f"{mmm([r.mbs for r in rs])} | {mmm([il.pct(r.latencies, 50) * 1000 for r in rs])} | "
                      f"{mmm([il.pct(r.latencies, 99) * 1000 for r in rs])} | {mmm([r.cpu * 1000 for r in rs])} |")
        print("\nEach cell: min / median / max over the runs (p50 and p99 within each run). Server CPU: the "
              "server's whole process tree from the end of the logins to the end of delivery (Postfix: until "
              "its queue is empty), divided by the messages.\n")
        if peer:
            print(f"| size | C | Postvault / {peer}, msg/s | MB/s | server CPU per message |")
            print("| --- | --- | --- | --- | --- |")
            for key, pv in rep.smtp["Postvault"].items():
                other = rep.smtp[peer].get(key, [])
                if not other:
                    continue
                print(f"| {key[0]} | {key[1]} | {pct_mmm(ratio_runs([r.msgs for r in pv], [r.msgs for r in other]))} "
                      f"| {pct_mmm(ratio_runs([r.mbs for r in pv], [r.mbs for r in other]))} "
                      f"| {pct_mmm(ratio_runs([r.cpu for r in pv], [r.cpu for r in other]))} |")
            print("\nRatios run by run, min / median / max; rates: above 100 % Postvault is faster; CPU: above "
                  "100 % Postvault spends more per message.\n")
            for key, metric, goal, label in ((("10 KB", 10), "msgs", GOALS["smtp_10k_msgs"],
                                              f"SMTP 10 KB, C = 10: msg/s ≥ {GOALS['smtp_10k_msgs']:.0%} of {peer}'s"),
                                             (("10 MB", 10), "mbs", GOALS["smtp_10m_mbs"],
                                              f"SMTP 10 MB, C = 10: MB/s ≥ {GOALS['smtp_10m_mbs']:.0%} of {peer}'s")):
                pv, other = rep.smtp["Postvault"].get(key, []), rep.smtp[peer].get(key, [])
                if pv and other:
                    a, b = med([getattr(r, metric) for r in pv]), med([getattr(r, metric) for r in other])
                    cpu = div(med([r.cpu for r in pv]), med([r.cpu for r in other]))
                    goals.append((label, fmt(a), fmt(b), pc(div(a, b)), "yes" if div(a, b) >= goal else "**no**",
                                  pc(cpu)))
    if rep.imap:
        assert icfg is not None
        peer = next((k for k in rep.imap if k != "Postvault"), None)
        print(f"### IMAP ({icfg.messages:,}-message INBOX, {runs} run(s))\n")
        print("| operation | C | server | n | commands/s | p50 ms | p99 ms | server CPU ms per command |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        no_rate = ("append", "idle", "cold")
        for key, label in OPS.items():
            for c in icfg.concurrency:
                for name, res in rep.imap.items():
                    runs_ = res.get((label, c), [])
                    if not runs_:
                        continue
                    n = statistics.median(len(p.latencies) for p in runs_)
                    rate = "—" if key in no_rate else mmm([p.rate for p in runs_])
                    cpu = "—" if key in ("append", "cold") else \
                        mmm([p.server_cpu * 1000 / max(1, len(p.latencies)) for p in runs_])
                    print(f"| {label} | {c} | {name} | {n:.0f} | {rate} | "
                          f"{mmm([il.pct(p.latencies, 50) * 1000 for p in runs_])} | "
                          f"{mmm([il.pct(p.latencies, 99) * 1000 for p in runs_])} | {cpu} |")
        print(f"\nEach cell: min / median / max over the runs (p50 and p99 within each run, over all the commands "
              "of all C clients). n: commands timed per run (median). commands/s: commands of all clients "
              f"divided by the phase's wall time; phases stop early after {icfg.cap:.0f} s. Server CPU: the "
              "server's whole process tree over the phase, divided by n (IDLE: per wake-up, its APPEND "
              "included).\n")
        if peer:
            print(f"| operation | C | Postvault / {peer}, commands/s | p50 latency | server CPU per command |")
            print("| --- | --- | --- | --- | --- |")
            for key, label in OPS.items():
                for c in icfg.concurrency:
                    pv, other = rep.imap["Postvault"].get((label, c), []), rep.imap[peer].get((label, c), [])
                    if not pv or not other:
                        continue
                    rate = "—" if key in no_rate else pct_mmm(ratio_runs([p.rate for p in pv], [p.rate for p in other]))
                    lat = pct_mmm(ratio_runs([il.pct(p.latencies, 50) for p in pv],
                                             [il.pct(p.latencies, 50) for p in other]))
                    cpu = "—" if key in ("append", "cold") else pct_mmm(ratio_runs(
                        [p.server_cpu / max(1, len(p.latencies)) for p in pv],
                        [p.server_cpu / max(1, len(p.latencies)) for p in other]))
                    print(f"| {label} | {c} | {rate} | {lat} | {cpu} |")
            print("\nRatios run by run, min / median / max. commands/s: above 100 % Postvault is faster; latency "
                  "and CPU: above 100 % Postvault takes longer / spends more.\n")
            for key, goal, label in (("mixed", GOALS["imap_mixed"], (f"IMAP mixed load, C = 10: commands/s ≥ "
                                                                      f"{GOALS['imap_mixed']:.0%} of {peer}'s")),
                                     ("bodies", GOALS["imap_bodies"], (f"IMAP read-heavy (FETCH bodies), C = 10: "
                                                                        f"commands/s ≥ {GOALS['imap_bodies']:.0%} of "
                                                                        f"{peer}'s"))):
                pv = rep.imap["Postvault"].get((OPS[key], 10), [])
                other = rep.imap[peer].get((OPS[key], 10), [])
                if pv and other:
                    a, b = med([p.rate for p in pv]), med([p.rate for p in other])
                    cpu = div(med([p.server_cpu / max(1, len(p.latencies)) for p in pv]),
                              med([p.server_cpu / max(1, len(p.latencies)) for p in other]))
                    goals.append((label, fmt(a), fmt(b), pc(div(a, b)), "yes" if div(a, b) >= goal else "**no**",
                                  pc(cpu)))
        pv = rep.imap.get("Postvault", {})
        peer_res = rep.imap.get(peer, {}) if peer else {}

        def absolute(label: str, key: tuple[str, int], p: float, limit: float) -> None:
            runs_ = pv.get(key, [])
            if not runs_:
                return
            a = med([il.pct(x.latencies, p) * 1000 for x in runs_])
            o = peer_res.get(key, [])
            b = fmt(med([il.pct(x.latencies, p) * 1000 for x in o])) if o else "—"
            goals.append((label, fmt(a), b, "—", "yes" if a < limit else "**no**", "—"))

        for c in icfg.concurrency:
            absolute(f"IDLE wake-up p99, C = {c}: < {GOALS['idle_p99_ms']:.0f} ms", (OPS["idle"], c), 99,
                     GOALS["idle_p99_ms"])
        absolute(f"LOGIN cold p50: < {GOALS['cold_p50_ms']:.0f} ms", (OPS["cold"], 1), 50, GOALS["cold_p50_ms"])
        absolute(f"LOGIN warm p50 (C = 1): < {GOALS['warm_p50_ms']:.0f} ms", (OPS["login"], 1), 50,
                 GOALS["warm_p50_ms"])
    if goals:
        print("### Goals (medians over the runs; latencies in ms)\n")
        print("| goal | Postvault | peer | Postvault / peer | met | server CPU per operation, Postvault / peer |")
        print("| --- | --- | --- | --- | --- | --- |")
        for g in goals:
            print("| " + " | ".join(g) + " |")
        print()


# -- main ---------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Install the peers (Debian): apt-get install dovecot-imapd postfix "
                                        "libsasl2-modules sasl2-bin; see the module docstring.")
    ap.add_argument("--quick", action="store_true", help="small numbers, one run: a smoke run of a few minutes")
    ap.add_argument("--runs", type=int, help="runs per server (default 3; --quick: 1)")
    ap.add_argument("--messages", type=int, help="IMAP INBOX size (default 10,000; --quick: 1,000)")
    ap.add_argument("--only", choices=("imap", "smtp"), help="one protocol only")
    ap.add_argument("--no-peers", action="store_true", help="Postvault alone (for trying the script)")
    ap.add_argument("--keep-on-error", action="store_true", help="keep the temporary folder if the run fails")
    ap.add_argument("--save", metavar="FILE", help="also pickle the raw results to FILE")
    ap.add_argument("--report-from", metavar="FILE", help="print the report of results saved with --save")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes sealing the mailbox")
    ap.add_argument("--smtp-processes", type=int, default=1, metavar="N",
                    help="Postvault's [smtp] processes (submission in N processes; default 1)")
    args = ap.parse_args()
    if args.report_from:
        import pickle

        with open(args.report_from, "rb") as f:
            saved = pickle.load(f)  # a file this script wrote
        lab = Lab(Path(tempfile.gettempdir()))
        lab.versions, lab.skipped = saved["versions"], saved["skipped"]
        print_report(saved["rep"], lab, saved["icfg"], saved["runs"], saved["argv"])
        return 0
    if os.geteuid() != 0 and not args.no_peers:
        raise SystemExit("run as root: Dovecot and Postfix start as root and drop privileges (or --no-peers)")
    quick = args.quick
    runs = max(1, args.runs or (1 if quick else 3))
    messages = max(100, args.messages or (1_000 if quick else 10_000))
    icfg = ImapCfg(messages=messages, runs=runs, reps=3 if quick else 5, headers=5 if quick else 20,
                   bodies=15 if quick else 100, stores=10 if quick else 100, searches=6 if quick else 30,
                   mixed=30 if quick else 150, appends=4 if quick else 10, cold=2 if quick else 5,
                   cap=5.0 if quick else 12.0)
    argv = "".join(" " + a for a in sys.argv[1:])
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    import imap_load as il
    import smtp_load as sl

    from postvault.certs.context import client_context

    work = Path(tempfile.mkdtemp(prefix="pv-compare-", dir=os.environ.get("BENCH_DIR")))
    lab = Lab(work)
    atexit.register(lab.stop)

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    rep = Report()
    ok = False
    sampling = threading.Event()

    def sample_load() -> None:
        while not sampling.wait(30):
            rep.load_samples.append(os.getloadavg()[0])

    threading.Thread(target=sample_load, daemon=True).start()
    try:
        cold = [[f"cold{r}-{k}@dental.bench.test" for k in range(icfg.cold)] for r in range(runs)]
        t0, step = make_postvault_home(lab, messages, [a for run_ in cold for a in run_], args.workers)
        targets = [lab.postvault(10, args.smtp_processes)]
        if args.no_peers:
            lab.skipped["Dovecot and Postfix"] = "--no-peers"
        else:
            users = {a: il.PASSWORD for a in (il.READER, *il.SENDERS)} | {a: il.PASSWORD for r in cold for a in r}
            users[sl.SENDER] = sl.PASSWORD
            if args.only != "smtp" and shutil.which("dovecot"):  # the same mailbox as Postvault's
                t = time.perf_counter()
                write_maildir(lab.dovecot_maildir(il.READER), messages, t0, step)
                log(f"Dovecot: {messages:,} maildir files in {time.perf_counter() - t:.1f} s")
            dovecot = lab.dovecot(users)
            if dovecot is not None:
                targets.append(dovecot)
                log(f"Dovecot {lab.versions['Dovecot']} on 127.0.0.1:{dovecot.imap_port}")
            if not args.only or args.only == "smtp":
                postfix = lab.postfix(dovecot is not None)
                if postfix is not None:
                    targets.append(postfix)
                    log(f"Postfix {lab.versions['Postfix']} on 127.0.0.1:{postfix.smtp_port}")
        for name, why in lab.skipped.items():
            log(f"{name} skipped: {why}")
        imap_targets = [t for t in targets if t.imap_port] if args.only != "smtp" else []
        smtp_targets = [t for t in targets if t.smtp_port] if args.only != "imap" else []
        if imap_targets:
            for t in imap_targets:
                w = time.perf_counter()
                asyncio.run(imap_warmup(t, messages))
                log(f"{t.name}: IMAP warm-up {time.perf_counter() - w:.1f} s")
                rep.imap[t.name] = {}
            append_no = {t.name: [0] for t in imap_targets}
            for r in range(runs):
                for c in icfg.concurrency:
                    order = imap_targets if r % 2 == 0 else imap_targets[::-1]
                    for t in order:
                        w = time.perf_counter()
                        asyncio.run(imap_run(t, icfg, c, rep.imap[t.name], 1000 * r + c, cold[r] if c == 1 else [],
                                             append_no[t.name]))
                        mixed = rep.imap[t.name][(OPS["mixed"], c)][-1].rate
                        log(f"IMAP run {r + 1}, C={c}, {t.name}: {time.perf_counter() - w:.1f} s "
                            f"(mixed {mixed:.0f} commands/s)")
        if smtp_targets:
            ctx = client_context(lab.home / "certs" / "ca.pem")
            for t in smtp_targets:
                rep.smtp[t.name] = {}
            for size in SMTP_SIZES:
                for c in (1, 10):
                    n = SMTP_N[quick][(size, c)]
                    batch = [sl.make_message(sl.SIZES[size], i) for i in range(n)]
                    for t in smtp_targets:  # warm-up: imports, first paths, page cache
                        smtp_round(t, ctx, min(2, c), batch[:2])
                    for r in range(runs):
                        for t in (smtp_targets if r % 2 == 0 else smtp_targets[::-1]):
                            rr = smtp_round(t, ctx, c, batch)
                            rep.smtp[t.name].setdefault((size, c), []).append(rr)
                            log(f"SMTP {size} C={c} run {r + 1}, {t.name}: {rr.msgs:.1f} msg/s, {rr.mbs:.1f} MB/s")
                    if lab.postfix_conf is not None:  # delivered mail is not needed again; keep the disk small
                        shutil.rmtree(work / "postfix" / "mail" / "maildir", ignore_errors=True)
        ok = True
    finally:
        lab.stop()
        if ok or not args.keep_on_error:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work} (servers' logs: postvault.log, dovecot/dovecot.log, postfix/postfix.log)")
    sampling.set()
    rep.load = (load0, os.getloadavg()[0])
    rep.minutes = (time.perf_counter() - started) / 60
    if args.save:
        import pickle

        try:
            with open(args.save, "wb") as f:
                pickle.dump({"rep": rep, "versions": lab.versions, "skipped": lab.skipped,
                             "icfg": icfg if rep.imap else None, "runs": runs, "argv": argv}, f)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
            log(f"could not save the results: {e!r}")
    print_report(rep, lab, icfg if rep.imap else None, runs, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
