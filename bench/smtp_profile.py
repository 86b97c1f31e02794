"""Server CPU per 10 KB submission, Postvault alone, optionally under py-spy.

Run as ``python bench/smtp_profile.py --messages 2000 [--py-spy FILE]``.
It starts ``postvault serve`` on a fresh home folder as
``bench/smtp_load.py`` does (same accounts, same messages, C sessions over
implicit TLS, logged in before the clock starts), sends N messages of
10 KB in one round and prints msg/s and the server's CPU per message. One
long round gives a profile enough samples and lets background work that
grows with the load (the outbound worker's notifications) show in the
CPU figure; no bare server runs meanwhile. ``--py-spy FILE`` records the
server with ``py-spy record --gil --threads --rate 200 --format raw``
(samples of the thread holding the GIL: where its one core goes) for the
round; ``--py-spy-flags`` replaces ``--gil`` (e.g. ``--idle``).

Round 5 in docs/benchmarks.md was guided by these profiles.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import smtp_load as load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=2000)
    parser.add_argument("--concurrency", "-c", type=int, default=10)
    parser.add_argument("--py-spy", dest="py_spy", metavar="FILE", help="raw py-spy profile of the round")
    parser.add_argument("--py-spy-flags", default="--gil", help="extra py-spy flags (default: --gil)")
    args = parser.parse_args()
    from postvault.certs.context import client_context

    exe = shutil.which("py-spy") if args.py_spy else None
    if args.py_spy and exe is None:
        raise SystemExit("py-spy is not installed")
    with tempfile.TemporaryDirectory(prefix="pv-smtp-profile-") as tmp:
        servers = load.Servers(Path(tmp))
        servers.start(args.concurrency, [1])
        port, pid = servers.postvault["Postvault"]
        ctx = client_context(Path(tmp) / "home-1/certs/ca.pem")
        messages = [load.make_message(load.SIZES["10 KB"], i) for i in range(args.messages)]
        spies: list[subprocess.Popen[bytes]] = []

        def start() -> None:
            if exe is not None:
                spies.append(subprocess.Popen(
                    [exe, "record", "--pid", str(pid), "--format", "raw", "--output", args.py_spy,
                     "--nonblocking", "--threads", "--rate", "200", *args.py_spy_flags.split()],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        try:
            load.run_round(port, ctx, min(2, args.concurrency), messages[:4])  # warm up
            r = load.run_round(port, ctx, args.concurrency, messages, start, pid)
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            servers.stop()
    print(f"{args.messages} messages of 10 KB, C = {args.concurrency}: {args.messages / r.seconds:.1f} msg/s, "
          f"server CPU {1000 * r.cpu / args.messages:.2f} ms/msg")


if __name__ == "__main__":
    main()
