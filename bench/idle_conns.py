"""How many idle IMAP connections one node holds (issue 9 item 3: 1,000).

Run as ``python bench/idle_conns.py`` (``--connections N``, default 1,000).
It makes a throwaway home with one account and a few messages, starts the
real ``postvault serve`` (imaps only) as a subprocess, and then:

1. opens N TLS connections and logs each in (the first login pays bcrypt
   and Argon2id, the rest hit the login cache, as a mail client's parallel
   connections do), from loopback source addresses 127.0.0.2 and up, 25 per
   address (the server allows 50 per address);
2. reads the server's VmRSS before and after, and its open file count;
3. has a tenth of them SELECT INBOX and IDLE, delivers one message by
   APPEND on another connection and times each ``* 1 EXISTS`` (wake-up
   latency with N connections open);
4. times a fresh connection's LOGIN + NOOP and a NOOP on every one of the N
   (proving all are still served), then logs them all out.

Prints a Markdown table for docs/benchmarks.md and docs/scaling.md. Every
loop is bounded; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _server import Serve, free_port
from imap_load import Client, Idler

from postvault.certs.context import client_context

HOSTNAME = "mail.bench.test"
USER = "idle@dental.bench.test"
PASSWORD = "correct horse battery staple idle"
PER_ADDRESS = 25


def message(n: int) -> bytes:
    return (b"From: <%s>\r\nTo: <%s>\r\nSubject: idle bench %d\r\nMessage-ID: <idle-%d@bench.test>\r\n"
            b"Date: Tue, 02 Jan 2024 09:30:00 -0500\r\n\r\nhello\r\n" % (USER.encode(), USER.encode(), n, n))


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def bench(port: int, serve: Serve, n: int, home: Path) -> dict[str, float]:
    ctx = client_context(home / "certs" / "ca.pem")
    warm = await Client.connect(port, ctx)
    await warm.login(USER, PASSWORD)  # the cold login: the rest hit the cache
    await warm.command(b"SELECT INBOX", keep=False)
    await asyncio.sleep(1.0)
    rss_before, fds_before = serve.rss_kib(), open_files(serve.pid)

    clients: list[Client] = []
    began = time.perf_counter()
    for batch in range(0, n, 50):
        sources = [f"127.0.0.{2 + i // PER_ADDRESS}" for i in range(batch, min(n, batch + 50))]
        new = await asyncio.gather(*(Client.connect(port, ctx, s) for s in sources))
        await asyncio.gather(*(cl.login(USER, PASSWORD) for cl in new))
        clients += new
    open_seconds = time.perf_counter() - began
    await asyncio.sleep(2.0)
    rss_after, fds_after = serve.rss_kib(), open_files(serve.pid)

    # A tenth IDLE on INBOX; one APPEND wakes them all.
    idle = clients[: max(1, n // 10)]
    for cl in idle:
        await cl.command(b"SELECT INBOX", keep=False)
    idlers = [Idler(cl) for cl in idle]
    await asyncio.gather(*(i.start() for i in idlers))
    status, _ = await warm.command(b"STATUS INBOX (MESSAGES)")
    text = b" ".join(status)
    count = int(text.split(b"MESSAGES ")[1].split(b")")[0])
    sent = time.perf_counter()
    await warm.append("INBOX", message(count + 1))
    waits = await asyncio.gather(*(i.wait_for(count + 1, 30.0) for i in idlers))
    missed = sum(w is None for w in waits)
    latencies = [(w - sent) * 1000 for w in waits if w is not None]
    await asyncio.gather(*(i.stop() for i in idlers))
    rss_idle = serve.rss_kib()

    fresh_began = time.perf_counter()
    fresh = await Client.connect(port, ctx, "127.0.0.250")
    await fresh.login(USER, PASSWORD)
    await fresh.command(b"NOOP", keep=False)
    fresh_ms = (time.perf_counter() - fresh_began) * 1000
    await fresh.logout()

    noop_ms: list[float] = []

    async def noop(cl: Client) -> None:
        t = time.perf_counter()
        await cl.command(b"NOOP", keep=False, timeout=60)
        noop_ms.append((time.perf_counter() - t) * 1000)

    for batch in range(0, n, 100):
        await asyncio.gather(*(noop(cl) for cl in clients[batch:batch + 100]))
    await asyncio.gather(*(cl.logout() for cl in clients))
    await warm.logout()
    return {
        "n": len(clients), "open_seconds": open_seconds, "rss_before": rss_before, "rss_after": rss_after,
        "rss_idle": rss_idle, "fds_before": fds_before, "fds_after": fds_after, "idlers": len(idlers),
        "missed": missed, "wake_p50": statistics.median(latencies) if latencies else float("nan"),
        "wake_p99": pct(latencies, 99) if latencies else float("nan"), "fresh_ms": fresh_ms,
        "noop_p50": statistics.median(noop_ms), "noop_p99": pct(noop_ms, 99), "noops": len(noop_ms),
    }


def make_home(home: Path) -> None:
    from postvault.home import init_home, open_store

    saved = {k: v for k, v in os.environ.items() if k.startswith("POSTVAULT_")}
    for k in saved:
        del os.environ[k]
    try:
        config = init_home(home, HOSTNAME)
    finally:
        os.environ.update(saved)
    store = open_store(config)
    try:
        store.create_account(USER, "member", "Idle Bench", PASSWORD)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=1000, help="idle connections to open (default 1,000)")
    args = ap.parse_args()
    if not 1 <= args.connections <= 5000:
        ap.error("--connections must be between 1 and 5,000")
    # Each connection is a descriptor in the server and one in this client.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        sys.exit(f"idle_conns: needs {need} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    with tempfile.TemporaryDirectory(prefix="pv-idle-") as tmp:
        home = Path(tmp) / "home"
        make_home(home)
        port = free_port()
        serve = Serve(home, {"imaps": f"127.0.0.1:{port}"}, Path(tmp) / "serve.log")
        try:
            r = asyncio.run(bench(port, serve, args.connections, home))
        finally:
            code = serve.stop()
    per_conn = (r["rss_after"] - r["rss_before"]) / r["n"]
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end; server exit status {code}.\n")
    print("| connections | opened and logged in (s) | server VmRSS before / after (MiB) | per connection (KiB) "
          "| server open files before / after | IDLE wake-up of "
          f"{r['idlers']} idlers p50 / p99 (ms), missed | fresh LOGIN + NOOP (ms) | NOOP on each p50 / p99 (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {r['n']} | {r['open_seconds']:.1f} | {r['rss_before'] / 1024:.1f} / {r['rss_after'] / 1024:.1f} "
          f"| {per_conn:.0f} | {r['fds_before']} / {r['fds_after']} | {r['wake_p50']:.0f} / {r['wake_p99']:.0f}, "
          f"{r['missed']} | {r['fresh_ms']:.0f} | {r['noop_p50']:.1f} / {r['noop_p99']:.1f} ({r['noops']} answered) |")


if __name__ == "__main__":
    main()
