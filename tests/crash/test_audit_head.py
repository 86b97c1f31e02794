"""certs/audit-head.json against a process killed while writing it: the
file is replaced whole (temporary file, fsync, rename, folder fsync), so
``postvault audit verify`` passes whatever moment the kill came; the
temporary files such kills leave are removed by a later write once stale."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from postvault.conf.load import load_config
from postvault.home import open_store
from postvault.store.auditsign import HEAD_FILE, STALE_TMP_SECONDS

from .harness import Harness

# A writer that never stops: an event, a checkpoint (DB row, then the head
# file), again; its parent kills it at random moments.
WRITER = """
import sys
from pathlib import Path
from postvault.conf.load import load_config
from postvault.home import open_store
home = Path(sys.argv[1])
store = open_store(load_config(home))
print("writing", flush=True)
while True:
    store.record_event("admin.test", actor="admin")
    store.audit_checkpoint(home, "manual")
"""


def verify(h: Harness) -> subprocess.CompletedProcess[str]:
    return h.cli("audit", "verify")


def test_sigkill_while_writing_checkpoints(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    rng = random.Random()
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(h.home)], env=env, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        result = verify(h)
        assert result.returncode == 0, result.stdout + result.stderr
    head = h.home / HEAD_FILE
    assert head.read_text().startswith("{")


def test_stale_temporary_head_files(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    head = h.home / HEAD_FILE
    store = open_store(load_config(h.home))
    try:
        store.record_event("admin.test", actor="admin")
        store.audit_checkpoint(h.home, "manual")
        # What a kill before the rename leaves: a half-written temporary file.
        stale = head.with_name(f".{head.name}.0123456789ab.tmp")
        stale.write_text('{"v":1,"seq":')
        old = time.time() - STALE_TMP_SECONDS - 10
        os.utime(stale, (old, old))
        young = head.with_name(f".{head.name}.ba9876543210.tmp")
        young.write_text('{"v":1,')
        assert verify(h).returncode == 0

        # A kill after the checkpoint row committed but before the head
        # file was replaced: the file names an older checkpoint, still fine.
        before = head.read_bytes()
        store.record_event("admin.test", actor="admin")
        store.audit_checkpoint(h.home, "manual")
        assert not stale.exists(), "a stale temporary head file was left behind"
        assert young.exists(), "a young one may be another writer's: kept"
        head.write_bytes(before)
        result = verify(h)
        assert result.returncode == 0, result.stdout + result.stderr

        # The next checkpoint brings the file up to date again.
        store.record_event("admin.test", actor="admin")
        store.audit_checkpoint(h.home, "manual")
        assert head.read_bytes() != before
        assert verify(h).returncode == 0
    finally:
        store.close()
