"""Issue 8 item 3: SIGKILL ``postvault serve`` at random moments under
concurrent SMTP submission and IMAP APPEND / MOVE / EXPUNGE, at least 50
times, restarting it each time; then nothing acknowledged is lost or
doubled, nothing unknown appears, UIDs never go backwards, ``postvault
fsck`` is clean and ``postvault audit verify`` passes. See harness.py."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Harness

CYCLES = int(os.environ.get("POSTVAULT_CRASH_CYCLES", "50"))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, seed=int(os.environ.get("POSTVAULT_CRASH_SEED", "0")) or None)
    yield h
    if h.proc is not None and h.proc.poll() is None:
        h.proc.kill()
        h.proc.wait(30)


def test_sigkill_cycles(harness: Harness) -> None:
    started = time.monotonic()
    for i in range(CYCLES):
        # Mostly in the middle of the load; one cycle in five soon after
        # the start (startup recovery, logins, first commands).
        early = i % 5 == 4
        harness.cycle(harness.random.uniform(0.0, 1.0) if early else harness.random.uniform(0.0, 1.5), early=early)
    harness.start()
    harness.check_uids()
    numbers = harness.final_check()
    harness.wait_for_sweep()
    assert harness.stop() == 0
    numbers["wall_seconds"] = round(time.monotonic() - started)
    print("crash harness:", " ".join(f"{k}={v}" for k, v in numbers.items()))
    print("crash harness seconds:", " ".join(f"{k}={v:.0f}" for k, v in harness.timings.items()))

    assert not harness.ledger.problems, "\n".join(harness.ledger.problems[:50])
    assert numbers["kills"] >= CYCLES
    # The load really ran: each cycle but the early ones waited for an
    # acknowledged message of each kind before its kill.
    loaded = CYCLES - CYCLES // 5
    assert numbers["acked_smtp"] >= loaded and numbers["acked_append"] >= loaded, numbers
    if CYCLES >= 20:  # shorter runs (POSTVAULT_CRASH_CYCLES) may not get that far
        assert numbers["moved"] > 0 and numbers["expunged"] > 0, numbers

    fsck = harness.cli("fsck")
    assert fsck.returncode == 0 and fsck.stdout.rstrip().endswith("clean"), fsck.stdout + fsck.stderr
    audit = harness.cli("audit", "verify")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    tracebacks = [log.name for log in harness.logs if "Traceback" in log.read_text()]
    assert not tracebacks, tracebacks
