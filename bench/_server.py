"""The real ``postvault serve`` as a child process, for the benchmarks.

Shared by bench/imap_load.py, bench/smtp_load.py and bench/soak.py: a free
loopback port, the child's environment (only the listeners asked for; every
``POSTVAULT_`` variable of the caller is dropped, so a developer's shell
can't change what is measured), the start (until the "postvault ready" line,
with a deadline), the server's VmRSS and CPU time from /proc, and the stop
(SIGTERM, which drains, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENERS = ("imaps", "imap", "submissions", "submission", "https")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``postvault serve --home HOME`` with the given listeners only.

    ``listen`` maps a listener name (``LISTENERS``) to "host:port"; the
    others are switched off. ``root``: run the ``postvault`` of another
    checkout (its folder is the child's working directory, which
    ``python -m`` puts first on the path; give its PYTHONPATH too). The server's standard error (its log) goes to
    ``log_path``; its standard output is read on a thread so that it can
    never block on a full pipe.
    """

    def __init__(self, home: Path, listen: dict[str, str], log_path: Path,
                 extra_env: dict[str, str] | None = None, ready_seconds: float = 120.0,
                 root: Path | None = None) -> None:
        unknown = set(listen) - set(LISTENERS)
        if unknown:
            raise ValueError(f"unknown listeners: {sorted(unknown)}")
        self.home = home
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
        env.update({f"POSTVAULT_LISTEN_{name.upper()}": listen.get(name, "") for name in LISTENERS})
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra_env or {})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postvault.cli.main", "serve", "--home", str(home)],
            env=env, stdout=subprocess.PIPE, stderr=self._log, cwd=str(root or ROOT))
        if not self._wait_ready(ready_seconds):
            self.stop()
            raise RuntimeError("postvault serve did not start:\n"
                               + log_path.read_text(encoding="utf-8", errors="replace")[-3000:])
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, seconds: float) -> bool:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline, seen = time.monotonic() + seconds, b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                if self.proc.poll() is not None:
                    return False
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return False
            seen += chunk
            if b"postvault ready" in seen:
                return True
        return False

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """Resident set size of the server process (VmRSS), in KiB."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all threads)."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, grace: float = 40.0) -> int | None:
        """SIGTERM (the server drains), SIGKILL if it takes longer than
        ``grace`` seconds; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode
