"""Server CPU per IMAP command for the hot paths of issue 9 item 4.

Run as ``python bench/imap_profile.py --home DIR --messages 2000``. It
makes (or reuses) a home with the reader's INBOX filled by
``bench/imap_populate.py`` (as bench/imap_load.py does), starts the real
``postvault serve`` over TLS, and with one client runs each command a few
times, printing the server's CPU time per command (and per message where
that is the natural unit) as Markdown rows. Server CPU, not wall time, is
the figure to compare: the machine is shared, and CPU per command moves
far less with the load than latency does.

The commands are those docs/benchmarks.md names where the peers lead:
``UID FETCH`` of a 50-message window with ``BODY.PEEK[HEADER.FIELDS
(...)]`` (a mail client's message list), ``UID SEARCH`` on flags and a
date, ``UID FETCH n BODY.PEEK[]`` of single messages, ``UID STORE
±FLAGS``, SELECT and NOOP (the rest of the comparison's mixed load), and
``UID SEARCH SUBJECT`` over the whole folder (left out with ``--quick``).
``--py-spy PREFIX`` records the server with py-spy
(``PREFIX-<phase>.txt``, raw collapsed stacks) during each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imap_load as il

HEADER_FIELDS = b"(From To Cc Subject Date Message-ID References In-Reply-To Content-Type)"


async def measure(server: il.Server, n: int, reps: int, py_spy: str | None, only_search: bool = False,
                  quick: bool = False, only: set[str] | None = None, gil: bool = False) -> list[str]:
    ctx = il.client_context(server.home)
    cl = await il.Client.connect(server.port, ctx)
    await cl.login(il.READER, il.PASSWORD)
    await cl.command(b"SELECT INBOX", keep=False)
    rng = random.Random(7)
    rows: list[str] = []

    async def one(label: str, commands: list[bytes], per: int, unit: str,
                  timeout: float = 600.0, clients: list[il.Client] | None = None) -> None:
        spy = None
        if py_spy:
            spy = subprocess.Popen(["py-spy", "record", "--format", "raw", "-r", "200", *(["--gil"] if gil else []), "-o",
                                    f"{py_spy}-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.txt", "--pid", str(server.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)

        async def send(c: il.Client, mine: list[bytes]) -> None:
            for text in mine:
                await c.command(text, timeout=timeout, keep=False)

        group = clients or [cl]
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        # C clients at once, each with its share of the commands.
        await asyncio.gather(*(send(c, commands[k::len(group)]) for k, c in enumerate(group)))
        cpu, wall = server.cpu_seconds() - cpu0, time.perf_counter() - t0
        if spy is not None:
            spy.send_signal(2)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
        k = len(commands)
        rows.append(f"| {label} | {k} | {cpu / k * 1000:.2f} | {cpu / k / per * 1000:.2f} {unit} "
                    f"| {wall / k * 1000:.1f} | {k / wall:.0f} |")
        il.log(rows[-1])

    if only_search:
        # SEARCH alone (issue 9 item 3): metadata keys, then header keys;
        # the first header search of a folder fills its search index, so
        # it runs twice, then other header keys that use the same index.
        await one("SEARCH UNSEEN / FLAGGED / SINCE", [b"UID SEARCH UNSEEN", b"UID SEARCH FLAGGED",
                                                      b"UID SEARCH SINCE 1-Jan-2024"] * max(1, reps // 3), 1, "",
                  timeout=1800)
        await one("SEARCH SUBJECT, first (fills the index)", [b'UID SEARCH SUBJECT "referral"'], n, "ms/message",
                  timeout=3600)
        await one("SEARCH SUBJECT, second", [b'UID SEARCH SUBJECT "referral"'], n, "ms/message", timeout=3600)
        await one("SEARCH FROM", [b'UID SEARCH FROM "ortho2"'], n, "ms/message", timeout=3600)
        await one("SEARCH UNSEEN SUBJECT", [b'UID SEARCH UNSEEN SUBJECT "report"'], n, "ms/message",
                  timeout=3600)
        await cl.logout()
        return rows
    windows = [rng.randrange(1, max(2, n - 50)) for _ in range(reps)]
    if only:
        # Chosen phases only, each with ``reps`` commands (the CPU figure
        # needs many: /proc counts in 10 ms ticks).
        for name in sorted(only):
            if name == "body":
                await one("FETCH BODY.PEEK[], one message, C = 1", [
                    b"UID FETCH %d BODY.PEEK[]" % rng.randrange(1, n) for _ in range(reps)], 1, "ms/message")
            elif name == "body10":
                many = [await il.Client.connect(server.port, ctx) for _ in range(10)]
                for c in many:
                    await c.login(il.READER, il.PASSWORD)
                    await c.command(b"EXAMINE INBOX", keep=False)
                await one("FETCH BODY.PEEK[], one message, C = 10", [
                    b"UID FETCH %d BODY.PEEK[]" % rng.randrange(1, n) for _ in range(reps)], 1, "ms/message",
                    clients=many)
                await asyncio.gather(*(c.logout() for c in many))
            elif name == "select":
                await one("SELECT INBOX", [b"SELECT INBOX"] * max(1, reps // 10), 1, "")
            elif name == "select-store":
                # SELECT after another session's STORE (the mixed load):
                # the CPU per pair, less a STORE's, is the SELECT's.
                other = await il.Client.connect(server.port, ctx)
                await other.login(il.READER, il.PASSWORD)
                await other.command(b"SELECT INBOX", keep=False)
                pairs = max(1, reps // 10)
                sel = [b"SELECT INBOX"] * pairs
                sto = [b"UID STORE %d %sFLAGS (\\Flagged)" % (rng.randrange(1, n), b"+-"[k % 2:k % 2 + 1])
                       for k in range(pairs)]

                cpu0, t0 = server.cpu_seconds(), time.perf_counter()
                for k in range(pairs):
                    await other.command(sto[k], keep=False)
                    await cl.command(sel[k], keep=False)
                cpu, wall = server.cpu_seconds() - cpu0, time.perf_counter() - t0
                rows.append(f"| STORE (other session) + SELECT INBOX | {pairs} | {cpu / pairs * 1000:.2f} | "
                            f"per pair | {wall / pairs * 1000:.1f} | {pairs / wall:.0f} |")
                il.log(rows[-1])
                await other.logout()
            elif name == "store":
                await one("UID STORE +/-FLAGS (\\Flagged), one message", [
                    b"UID STORE %d %sFLAGS (\\Flagged)" % (rng.randrange(1, n), b"+-"[k % 2:k % 2 + 1])
                    for k in range(reps)], 1, "")
            elif name == "noop":
                await one("NOOP", [b"NOOP"] * reps, 1, "")
            else:
                raise SystemExit(f"unknown phase {name}")
        await cl.logout()
        return rows
    await one("FETCH headers, 50-message window", [
        b"UID FETCH %d:%d (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS %s])" % (lo, lo + 49, HEADER_FIELDS)
        for lo in windows], 50, "ms/message")
    await one("SEARCH UNSEEN / FLAGGED / SINCE", [b"UID SEARCH UNSEEN", b"UID SEARCH FLAGGED",
                                                  b"UID SEARCH SINCE 1-Jan-2024"] * max(1, reps // 3), 1, "")
    await one("FETCH BODY.PEEK[], one message", [b"UID FETCH %d BODY.PEEK[]" % rng.randrange(1, n)
                                                 for _ in range(reps * 10)], 1, "ms/message")
    await one("FETCH BODY.PEEK[], 20-message window", [
        b"UID FETCH %d:%d BODY.PEEK[]" % (lo, lo + 19) for lo in windows], 20, "ms/message")
    await one("UID STORE +/-FLAGS (\\Flagged), one message", [
        b"UID STORE %d %sFLAGS (\\Flagged)" % (rng.randrange(1, n), b"+-"[k % 2:k % 2 + 1])
        for k in range(reps * 10)], 1, "")
    await one("SELECT INBOX", [b"SELECT INBOX"] * reps, 1, "")
    await one("NOOP", [b"NOOP"] * (reps * 10), 1, "")
    if not quick:
        await one("SEARCH SUBJECT (whole folder)", [b'UID SEARCH SUBJECT "referral"'], n, "ms/message")
    await cl.logout()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", required=True, help="home folder; made on first use, reused after")
    ap.add_argument("--messages", type=int, default=2000, help="messages in the reader's INBOX")
    ap.add_argument("--reps", type=int, default=6, help="commands per phase (FETCH windows, searches)")
    ap.add_argument("--workers", type=int, default=2, help="processes sealing the messages")
    ap.add_argument("--py-spy", metavar="PREFIX", help="record each phase with py-spy")
    ap.add_argument("--search", action="store_true",
                    help="SEARCH only: flags/date, SUBJECT twice (the first fills the search index), FROM")
    ap.add_argument("--quick", action="store_true", help="leave out the whole-folder SUBJECT search")
    ap.add_argument("--gil", action="store_true", help="py-spy samples only the thread holding the GIL "
                    "(CPU in Python; a worker waiting for the GIL is not counted as busy)")
    ap.add_argument("--only", help="comma-separated phases, each --reps commands (SELECT a tenth): "
                    "body (C = 1), body10 (UID FETCH n BODY.PEEK[] from 10 clients at once), select, "
                    "select-store (another session's STORE, then SELECT), store, noop")
    args = ap.parse_args()
    home = Path(args.home).absolute()
    marker = home / "bench.json"
    cfg = il.Config(**{**il.QUICK.__dict__, "messages": args.messages, "big": 1, "cold": 0})
    if marker.exists():
        if json.loads(marker.read_text())["messages"] != args.messages:
            raise SystemExit(f"{home} was made for another size")
    else:
        il.make_home(home, cfg, args.workers)
    load = os.getloadavg()
    server = il.Server(home)
    try:
        rows = asyncio.run(measure(server, args.messages, args.reps, args.py_spy, args.search, args.quick,
                                  set(args.only.split(",")) if args.only else None, args.gil))
    finally:
        server.stop()
    print(f"Machine: {il.machine_line()}. Server code: {il.source_version()}. "
          f"Load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}. "
          f"{args.messages:,} messages.\n")
    print("| command | n | server CPU ms per command | per message | wall ms per command | commands/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
