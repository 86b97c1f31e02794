"""SMTP submission under load: Postvault next to a bare aiosmtpd server.

Run as ``python bench/smtp_load.py`` (``--quick`` for a smoke run). Prints
Markdown for docs/benchmarks.md.

C concurrent sessions, each over implicit TLS (port-465 style) and
authenticated with AUTH PLAIN before the clock starts, send N messages of
each size (10 KB of text; 1 MB and 10 MB with a base64 attachment) to:

- **Postvault**: ``postvault serve`` as a subprocess on a fresh home folder
  (policy, reply-only checks, attachment checks, sealing, SQLite commit
  with fsync, a copy in INBOX and in Sent);
- **bare**: aiosmtpd with the same TLS context and no checks, whose only
  work is to write each message to its own file and fsync it (on a worker
  thread, so sessions overlap): the upper bound for a Python server.

Rounds alternate between the two servers so that load from elsewhere on the
machine falls on both alike. Reported: messages/s and MB/s (decimal) over
the wall time of each round (median of rounds), p50/p99 latency of single
messages (all rounds), and Postvault's share of the bare server's figures.
Goals (issue 4): >= 60 % of bare messages/s at 10 KB and C=10, and >= 80 %
of bare MB/s at 10 MB.

``--processes 1,2,3`` starts one Postvault server per value of ``[smtp]
processes`` (each on a home folder of its own) and measures each against
the same bare server in the same run; the server CPU column then counts
the submission worker processes too.

Everything stays on 127.0.0.1; every loop is bounded by N and timeouts.
``--profile-out FILE`` also records a py-spy profile of the Postvault
server (all threads) during its first 10 KB round (from the end of the
sessions' logins, so bcrypt is left out), if py-spy is installed. Only
samples of the thread holding the GIL are kept: the server is one Python
process, so that is where its one core's time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

# Run from a checkout without installing: make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import Serve, free_port

MB = 1_000_000
PASSWORD = "bench passphrase for postvault load"
SENDER, RECIPIENT = "office@bench.test", "clinic@bench.test"
SIZES = {"10 KB": 10_000, "1 MB": 1_000_000, "10 MB": 10_000_000}
DEFAULT_N = {"10 KB": 300, "1 MB": 40, "10 MB": 20}
QUICK_N = {"10 KB": 30, "1 MB": 10, "10 MB": 10}


# --- the bare server (runs in a child process) --------------------------------


def bare_server(port: int, cert: Path, key: Path, out: Path) -> None:
    """aiosmtpd over TLS with AUTH that accepts PASSWORD; each message is
    written to its own file and fsynced before 250."""
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

    from postvault.certs.context import server_context

    counter = iter(range(10**9))

    def store(data: bytes) -> None:
        path = out / f"{next(counter):08d}.eml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    class Handler:
        async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
            await asyncio.to_thread(store, envelope.content)  # type: ignore[attr-defined]
            return "250 2.0.0 OK"

    def authenticator(server: SMTP, session: object, envelope: object, mechanism: str, data: object) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.password == PASSWORD.encode()
        return AuthResult(success=ok)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ctx = server_context(cert, key)
        await loop.create_server(
            lambda: SMTP(Handler(), hostname="bare.bench.test", authenticator=authenticator, auth_required=True,
                         auth_require_tls=False, data_size_limit=64 * MB, loop=loop),
            "127.0.0.1", port, ssl=ctx)
        print("bare ready", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    import warnings

    warnings.simplefilter("ignore")  # aiosmtpd warns about auth_require_tls=False; the transport is TLS
    asyncio.run(main())


# --- servers as child processes ------------------------------------------------


def wait_ready(proc: subprocess.Popen[bytes], word: bytes, seconds: float = 120) -> None:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline, seen = time.monotonic() + seconds, b""
    import select

    while time.monotonic() < deadline and word not in seen:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
    if word not in seen:
        proc.kill()
        raise SystemExit(f"server did not start: {seen!r}")


def postvault_name(processes: int) -> str:
    """The report's name of Postvault with ``[smtp] processes`` = N."""
    return "Postvault" if processes == 1 else f"Postvault, {processes} processes"


@dataclass
class Servers:
    work: Path
    bare_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    bare_pid: int = 0
    # name -> (port, pid), one per process count asked for
    postvault: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def postvault_pid(self) -> int:
        return next(iter(self.postvault.values()))[1]

    def start(self, concurrency: int, processes: list[int] | None = None) -> None:
        from postvault.conf.load import load_config
        from postvault.home import init_home, open_store

        home = self.work
        for n in processes or [1]:
            # A home folder each, so every server starts with empty mailboxes.
            home = self.work / f"home-{n}"
            init_home(home, "mail.example.test")
            store = open_store(load_config(home, environ={}))
            store.create_account(SENDER, "member", "Bench Dental", PASSWORD)
            store.create_account(RECIPIENT, "member", "Bench Clinic", PASSWORD)
            store.close()
            port = free_port()
            try:
                pv = Serve(home, {"submissions": f"127.0.0.1:{port}"}, self.work / f"postvault-{n}.log",
                           {"POSTVAULT_SMTP_MAX_CONNECTIONS_PER_IP": str(max(50, concurrency + 5)),
                            "POSTVAULT_SMTP_PROCESSES": str(n)})
            except RuntimeError as e:
                raise SystemExit(str(e)) from None
            self.procs.append(pv.proc)
            self.postvault[postvault_name(n)] = (port, pv.pid)
        self.bare_port = free_port()
        out = self.work / "bare-out"
        out.mkdir()
        bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(self.bare_port),
                                 str(home / "certs/server.pem"), str(home / "certs/server.key"), str(out)],
                                stdout=subprocess.PIPE, stderr=(self.work / "bare.log").open("wb"))
        self.procs.append(bare)
        wait_ready(bare, b"bare ready")
        self.bare_pid = bare.pid

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# --- the load ----------------------------------------------------------------------


def make_message(size: int, n: int) -> bytes:
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = f"bench {n}"
    msg["Message-ID"] = f"<bench-{n}-{size}@bench.test>"
    msg["Date"] = "Tue, 02 Jan 2024 09:30:00 +0000"
    if size < 100_000:
        line = "Patient notes for the benchmark, nothing else. " * 1 + "\n"
        msg.set_content(line * max(1, (size - 300) // len(line)))
    else:
        msg.set_content("Scan attached.\n")
        raw = int((size - 600) * 3 / 4 * 76 / 78)  # base64 with CRLF every 76 characters
        # A PDF header, so the attachment check sees a document, not a program.
        msg.add_attachment(b"%PDF-1.7\n" + os.urandom(raw - 9), maintype="application", subtype="pdf",
                           filename="scan.pdf")
    return msg.as_bytes()


@dataclass
class Round:
    seconds: float
    latencies: list[float]
    count: int
    size: int
    cpu: float = 0.0  # the server process's user+system CPU seconds during the round


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) and of
    its live child processes (Postvault's submission workers) so far, from
    /proc/PID/stat (fields 14 and 15, in clock ticks); 0 elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    if os.environ.get("BENCH_CPU_SPLIT"):
        print(f"    pid {pid} user {fields[11]} sys {fields[12]}", file=sys.stderr)
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return own + sum(cpu_seconds(c) for c in children)


def run_round(port: int, ctx: ssl.SSLContext, concurrency: int, messages: list[bytes],
              logged_in: Callable[[], object] | None = None, pid: int = 0) -> Round:
    clients = []
    for _ in range(concurrency):
        c = smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=300)
        c.login(SENDER, PASSWORD)
        clients.append(c)
    if logged_in is not None:
        logged_in()  # e.g. start the profiler: the bcrypt logins are not the load
    shares = [messages[i::concurrency] for i in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)

    def work(i: int) -> list[float]:
        out = []
        barrier.wait(120)
        for m in shares[i]:
            t = time.perf_counter()
            refused = clients[i].sendmail(SENDER, [RECIPIENT], m)
            out.append(time.perf_counter() - t)
            if refused:
                raise SystemExit(f"refused: {refused}")
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(work, i) for i in range(concurrency)]
        barrier.wait(120)
        started, cpu_before = time.perf_counter(), cpu_seconds(pid)
        latencies = [x for f in futures for x in f.result()]
        seconds, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
    for c in clients:
        c.quit()
    return Round(seconds, latencies, len(messages), sum(len(m) for m in messages), cpu)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summarize(rounds: list[Round]) -> dict[str, float]:
    lat = [x for r in rounds for x in r.latencies]
    return {
        "msgs": statistics.median(r.count / r.seconds for r in rounds),
        "mbs": statistics.median(r.size / MB / r.seconds for r in rounds),
        "p50": percentile(lat, 50) * 1000,
        "p99": percentile(lat, 99) * 1000,
        "n": sum(r.count for r in rounds),
        "cpu": 1000 * sum(r.cpu for r in rounds) / sum(r.count for r in rounds),
    }


def py_spy(pid: int, out: str, seconds: int) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("(py-spy is not installed; no profile)", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(seconds), "--format", "raw",
                             "--output", out, "--nonblocking", "--threads",
                             *os.environ.get("BENCH_SPY_FLAGS", "--gil").split()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import aiosmtpd

    return (f"Machine: {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"aiosmtpd {aiosmtpd.__version__}, OpenSSL {ssl.OPENSSL_VERSION.split()[1]}; clients and both servers "
            "on the same machine over loopback.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", "-c", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per server and size (interleaved)")
    parser.add_argument("--quick", action="store_true", help="few messages, one round: a smoke run")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--profile-out", help="py-spy raw profile of Postvault's first 10 KB round")
    parser.add_argument("--profile-idle", type=float, default=0, metavar="SECONDS",
                        help="after the load, measure both servers' CPU while idle for SECONDS (background "
                             "work such as the outbound worker's polling) and, with --profile-out, record a "
                             "py-spy profile of Postvault meanwhile (FILE.idle)")
    parser.add_argument("--processes", default="1",
                        help="comma-separated [smtp] processes values: one Postvault server each, all measured "
                             "in the same run against the one bare server (default: 1)")
    parser.add_argument("--bare-server", nargs=4, metavar=("PORT", "CERT", "KEY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        port, cert, key, out = args.bare_server
        bare_server(int(port), Path(cert), Path(key), Path(out))
        return
    from postvault.certs.context import client_context

    counts = QUICK_N if args.quick else DEFAULT_N
    rounds = 1 if args.quick else args.rounds
    sizes = [s.strip() for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="pv-smtp-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        servers = Servers(Path(tmp))
        processes = [int(n) for n in args.processes.split(",")]
        servers.start(args.concurrency, processes)
        # One development CA per home folder: a context per server.
        ctxs = {postvault_name(n): client_context(Path(tmp) / f"home-{n}/certs/ca.pem") for n in processes}
        ctxs["bare aiosmtpd"] = ctxs[postvault_name(processes[-1])]
        targets = [(name, port, pid) for name, (port, pid) in servers.postvault.items()]
        targets.append(("bare aiosmtpd", servers.bare_port, servers.bare_pid))
        results: dict[str, dict[str, dict[str, float]]] = {}
        try:
            for size_name in sizes:
                n = counts[size_name]
                messages = [make_message(SIZES[size_name], i) for i in range(n)]
                # Warm up both (imports, first bcrypt-free paths, page cache).
                for name, port, _ in targets:
                    run_round(port, ctxs[name], min(2, args.concurrency), messages[:2])
                done: dict[str, list[Round]] = {name: [] for name, _, _ in targets}
                for r in range(rounds):
                    for name, port, pid in targets:
                        spies: list[subprocess.Popen[bytes] | None] = []
                        start_spy = None
                        if args.profile_out and name == "Postvault" and size_name == "10 KB" and r == 0:
                            out = args.profile_out
                            start_spy = lambda: spies.append(py_spy(servers.postvault_pid, out, 600))  # noqa: E731
                        done[name].append(run_round(port, ctxs[name], args.concurrency, messages, start_spy, pid))
                        spy = spies[0] if spies else None
                        if spy is not None:
                            spy.send_signal(signal.SIGINT)
                            spy.wait(60)
                        last = done[name][-1]
                        print(f"  {size_name} {name} round {r + 1}: {n / last.seconds:.1f} msg/s, "
                              f"server CPU {1000 * last.cpu / n:.1f} ms/msg", file=sys.stderr, flush=True)
                results[size_name] = {name: summarize(rs) for name, rs in done.items()}
            idle = measure_idle(servers, args.profile_idle, args.profile_out) if args.profile_idle > 0 else None
        finally:
            servers.stop()
    print_report(results, args.concurrency, rounds, counts, idle)


def measure_idle(servers: Servers, seconds: float, profile_out: str | None) -> dict[str, float]:
    """CPU ms per second of each server while no client is connected."""
    spy = py_spy(servers.postvault_pid, profile_out + ".idle", int(seconds) + 5) if profile_out else None
    pids = {name: pid for name, (_, pid) in servers.postvault.items()}
    pids["bare aiosmtpd"] = servers.bare_pid
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    return {name: 1000 * (after[name] - before[name]) / seconds for name in before}


def print_report(results: dict[str, dict[str, dict[str, float]]], concurrency: int, rounds: int,
                 counts: dict[str, int], idle: dict[str, float] | None = None) -> None:
    print(machine_line())
    print()
    print(f"C = {concurrency} concurrent TLS sessions, AUTH before the clock starts; {rounds} round(s) per server "
          "and size, interleaved.")
    print()
    print("| size | server | messages | msg/s | MB/s | p50 ms | p99 ms | server CPU ms/msg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, by_server in results.items():
        for name, r in by_server.items():
            print(f"| {size} | {name} | {int(r['n'])} | {r['msgs']:.1f} | {r['mbs']:.1f} | {r['p50']:.0f} | "
                  f"{r['p99']:.0f} | {r['cpu']:.1f} |")
    print()
    print("| size | server | Postvault / bare, msg/s | Postvault / bare, MB/s |")
    print("| --- | --- | --- | --- |")
    ratio: Callable[[str, str, str], float] = lambda s, n, k: results[s][n][k] / results[s]["bare aiosmtpd"][k]
    for size, by_server in results.items():
        for name in by_server:
            if name != "bare aiosmtpd":
                print(f"| {size} | {name} | {ratio(size, name, 'msgs'):.0%} | {ratio(size, name, 'mbs'):.0%} |")
    if idle is not None:
        print()
        print("Idle, after the load: " + ", ".join(f"{name} {ms:.1f} ms of CPU per second" for name, ms in idle.items())
              + ".")


if __name__ == "__main__":
    main()
