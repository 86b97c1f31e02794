"""``postvault demo`` as a new user runs it: a fresh home, printed settings
that work, a real server, and a second run that prints the same accounts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import time
from pathlib import Path

from postvault.certs.context import client_context
from tests.support import free_port




def start_demo(home: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    # The demo's fixed ports may be taken on a shared machine: the env
    # overrides every config key, as DESIGN.md promises.
    for key in ("imaps", "imap", "submissions", "submission", "https"):
        env[f"POSTVAULT_LISTEN_{key.upper()}"] = f"127.0.0.1:{ports[key]}" if key in ports else ""
    exe = shutil.which("postvault")
    assert exe
    proc = subprocess.Popen([exe, "demo", "--home", str(home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    out: list[str] = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if line.startswith("postvault ready"):
            return proc, "".join(out)
    proc.kill()
    raise AssertionError("demo did not start: " + "".join(out) + (proc.stderr.read() if proc.stderr else ""))


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_demo_from_nothing(tmp_path: Path) -> None:
    home = tmp_path / "postvault-demo"
    ports = {"submissions": free_port()}
    proc, out = start_demo(home, ports)
    try:
        accounts = dict(re.findall(r"user name (\S+@\S+)\s+password (\S+)", out))
        assert set(accounts) == {"office@demo-dental.test", "doctor@demo-ortho.test"}
        assert f"port {ports['submissions']}" in out and str(home / "certs" / "ca.pem") in out
        ctx = client_context(home / "certs" / "ca.pem")
        with smtplib.SMTP_SSL("localhost", ports["submissions"], context=ctx, timeout=30) as smtp:
            smtp.login("office@demo-dental.test", accounts["office@demo-dental.test"])
            smtp.sendmail("office@demo-dental.test", ["doctor@demo-ortho.test"],
                          b"From: office@demo-dental.test\r\nTo: doctor@demo-ortho.test\r\n"
                          b"Subject: hello\r\n\r\nWelcome to the demo.\r\n")
    finally:
        assert stop(proc) == 0
    assert (home / "demo-accounts.txt").stat().st_mode & 0o077 == 0

    # A second run reuses the home and prints the same accounts.
    proc, again = start_demo(home, {"submissions": free_port()})
    assert stop(proc) == 0
    assert dict(re.findall(r"user name (\S+@\S+)\s+password (\S+)", again)) == accounts
