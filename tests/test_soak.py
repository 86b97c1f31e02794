"""A short soak in CI: bench/soak.py's own code, for under a minute.

The real ``postvault serve`` (a subprocess, SQLite file store, TLS on
loopback), 20 IMAP clients on 10 mailboxes (IDLE, FETCH, STORE, NOOP, and
reconnecting every 20-40 s) and 5 SMTP senders (10 KB messages over TLS
with AUTH) at once. The full ten-minute run with 50 + 10 clients is
``python bench/soak.py``; its results are in docs/hardening.md section 4.

What must hold is correctness under concurrency, never speed: no NO, BAD,
4xx/5xx or exception on any connection; nothing in the server's log about
"database is locked", no traceback, no ERROR or WARNING line; every message the server
acknowledged seen, whole (its body matches the hash its sender put in a
header), exactly once by each client of its mailbox; IDLE clients told of
new mail while in IDLE; the server's memory not running away; SIGTERM
stopping it cleanly.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import soak  # noqa: E402  (bench/ is not a package)


def test_soak_short(tmp_path: Path) -> None:
    opts = soak.Options(minutes=0.8, imap=20, smtp=5, per_account=2, interval=1.5, warmup=15.0, drain=60.0,
                        session=(10.0, 20.0), fast_kdf=True)
    result = soak.run(opts, tmp_path)
    lines: list[str] = []
    soak.report(result, lines.append)
    text = "\n".join(lines)
    print(text)  # shown by pytest on failure, with the samples of errors and log lines

    assert result.errors == {}, text
    assert result.log_locked == 0, text
    assert result.log_tracebacks == 0, text
    assert result.log_errors == 0, text
    assert result.log_warnings == 0, text
    assert result.server_status == 0, text
    # The new-mail notices went out too (to the local sink), one per delivery.
    assert result.notifications > 0, text
    # Delivered exactly once: every acknowledged message reached each of
    # the two clients of its mailbox once, with its body intact (a mismatch
    # would be an error above).
    assert result.sent > 20 and result.delivered_ok == result.sent, text
    assert result.lost == 0 and result.duplicates == 0, text
    # Wake-ups happened in IDLE (not only through NOOP or a reconnection),
    # and none was lost: a client that sat in IDLE for 5 s after a 250
    # without hearing of the message would count here.
    assert len(result.wakeups) > 10, text
    assert result.missed_wakeups == 0, text
    # Connections came and went (sessions of 10-20 s), so per-connection
    # state that is never freed would pile up.
    assert result.reconnects >= opts.imap // 4, text
    # Memory: "start" is sampled after the warm-up, with every connection
    # open and every path (logins with Argon2id's 64 MiB, FETCH, STORE,
    # delivery) used, "end" when the load stops with as many connections.
    # The bound is generous on purpose: over a run this short the
    # allocator's arenas and SQLite's page cache still grow, and a login
    # that overlaps the end sample can hold Argon2id's buffer; a timing- or
    # load-dependent bound would make the test flaky. It catches a gross
    # leak (e.g. a session's keys or a message's plaintext kept per
    # connection or per message: dozens of reconnections and hundreds of
    # fetches here),
    # not a slow one; the ten-minute run reports the numbers.
    assert result.rss_end < result.rss_start * 1.5 + 30 * 1024, text
