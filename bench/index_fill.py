"""The search index filled after login ([imap] index_on_login): how long
from LOGIN until every message of the reader's INBOX has its entries, and
what a header SEARCH costs right after login and once the fill is done.

Run as ``python bench/index_fill.py --home DIR --messages 10000``. It makes
(or reuses) a never-searched home as bench/imap_profile.py does, then runs
three cases, each on a fresh copy of that home (a fill is kept): the fill
off and ``UID SEARCH SUBJECT`` right after login (the search fills the
index itself, as before); the fill on and the same search right after
login (racing the fill); the fill on, waiting (polling the database) until
it is done, then the search. Wall times; the machine is shared, so compare
within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imap_load as il
from _server import Serve, free_port
from sqlalchemy import func, select

SEARCH = b'UID SEARCH SUBJECT "referral"'


def _missing(store: object) -> int:
    from postvault.store.models import Mailbox, MessageCopy

    engine = store.engine  # type: ignore[attr-defined]
    acct_id = store.accounts([il.READER])[il.READER].id  # type: ignore[attr-defined]
    with engine.connect() as c:
        return int(c.execute(
            select(func.count()).select_from(MessageCopy).join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
            .where(Mailbox.account_id == acct_id, MessageCopy.sealed_search.is_(None))).scalar_one())


async def case(source: Path, fill: bool, search_first: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="pv-fill-") as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(source, home)
        port = free_port()
        env = {"POSTVAULT_IMAP_INDEX_ON_LOGIN": "true" if fill else "false"}
        server = Serve(home, {"imaps": f"127.0.0.1:{port}"}, home / "serve.log", extra_env=env)
        store = il.server_store(home)
        out: dict[str, float] = {}
        try:
            cl = await il.Client.connect(port, il.client_context(home))
            t0 = time.perf_counter()
            await cl.login(il.READER, il.PASSWORD)
            out["login"] = time.perf_counter() - t0
            await cl.command(b"SELECT INBOX", keep=False)
            if search_first:
                t = time.perf_counter()
                await cl.command(SEARCH, timeout=3600, keep=False)
                out["search right after login"] = time.perf_counter() - t
            if fill:
                while _missing(store):
                    await asyncio.sleep(0.2)
                out["login to fill done"] = time.perf_counter() - t0
            t = time.perf_counter()
            await cl.command(SEARCH, timeout=3600, keep=False)
            out["search after that"] = time.perf_counter() - t
            await cl.logout()
        finally:
            store.close()
            server.stop()
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", required=True, help="home folder; made on first use, reused after (never searched)")
    ap.add_argument("--messages", type=int, default=10000, help="messages in the reader's INBOX")
    ap.add_argument("--workers", type=int, default=2, help="processes sealing the messages")
    args = ap.parse_args()
    home = Path(args.home).absolute()
    marker = home / "bench.json"
    if marker.exists():
        if json.loads(marker.read_text())["messages"] != args.messages:
            raise SystemExit(f"{home} was made for another size")
    else:
        il.make_home(home, il.Config(**{**il.QUICK.__dict__, "messages": args.messages, "big": 1, "cold": 0}),
                     args.workers)
    load = os.getloadavg()
    rows = []
    for label, fill, first in (("fill off, SEARCH right after login", False, True),
                               ("fill on, SEARCH right after login", True, True),
                               ("fill on, SEARCH once the fill is done", True, False)):
        got = asyncio.run(case(home, fill, first))
        il.log(f"{label}: {got}")
        rows.append(f"| {label} | " + " | ".join(
            f"{got[k]:.2f}" if k in got else "—" for k in
            ("login", "search right after login", "login to fill done", "search after that")) + " |")
    print(f"Machine: {il.machine_line()}. Server code: {il.source_version()}. "
          f"Load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}. {args.messages:,} messages.\n")
    print("| case | LOGIN s | SEARCH SUBJECT right after login, s | LOGIN to fill done, s | SEARCH SUBJECT after that, s |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
