"""Real mail clients against the real server: swaks on both ports (STARTTLS
and implicit TLS, AUTH PLAIN and LOGIN) and curl over smtps:// and smtp://
with --ssl-reqd. ``bash .ci/run`` installs both."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .client import PASSWORD, message
from .conftest import COLLEAGUE, MEMBER, OUTSIDER, Server, World


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed; `bash .ci/run` installs it (apt-get install {name})"
    return path


def swaks(server: Server, world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("swaks"), "--server", "127.0.0.1", "--from", MEMBER, "--to", COLLEAGUE, "--auth-user", MEMBER,
         "--auth-password", PASSWORD, "--tls-verify", "--tls-ca-path", str(world.ca), "--tls-sni", "localhost",
         "--helo", "swaks.client.test", *args],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("port, tls, auth", [
    ("587", "--tls", "PLAIN"), ("587", "--tls", "LOGIN"), ("465", "--tls-on-connect", "PLAIN"),
    ("465", "--tls-on-connect", "LOGIN"),
])
def test_swaks_submits_on_both_ports(server: Server, world: World, port: str, tls: str, auth: str) -> None:
    before = world.count(COLLEAGUE)
    number = server.port587 if port == "587" else server.port465
    subject = f"swaks {port} {auth}"
    proc = swaks(server, world, "--port", str(number), tls, "--auth", auth, "--header", f"Subject: {subject}",
                 "--body", "Sent by swaks.")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "250 2.0.0 Message accepted for delivery" in proc.stdout
    assert "AUTH PLAIN LOGIN" in proc.stdout and "SIZE 52428800" in proc.stdout
    assert world.count(COLLEAGUE) == before + 1
    stored = world.read(COLLEAGUE)
    assert subject.encode() in stored and b"Sent by swaks." in stored
    assert stored.startswith(b"Received: from swaks.client.test ([127.0.0.1])")


def test_swaks_wrong_password_and_no_tls_are_refused(server: Server, world: World) -> None:
    before = world.count(COLLEAGUE)
    proc = swaks(server, world, "--port", str(server.port465), "--tls-on-connect", "--auth", "PLAIN",
                 "--auth-password", "not the password")
    assert proc.returncode != 0
    assert "535 5.7.8 Authentication failed" in proc.stdout
    # Without STARTTLS on 587: AUTH is neither offered nor accepted.
    proc = subprocess.run(
        [tool("swaks"), "--server", "127.0.0.1", "--port", str(server.port587), "--from", MEMBER, "--to", COLLEAGUE,
         "--auth", "PLAIN", "--auth-user", MEMBER, "--auth-password", PASSWORD],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "AUTH PLAIN" not in proc.stdout
    assert world.count(COLLEAGUE) == before


def test_swaks_refused_attachment(server: Server, world: World, tmp_path: Path) -> None:
    before = world.count(COLLEAGUE)
    (tmp_path / "setup.exe").write_bytes(b"MZ\x90\x00" + b"\x00" * 100)
    proc = swaks(server, world, "--port", str(server.port465), "--tls-on-connect", "--auth", "PLAIN",
                 "--attach", f"@{tmp_path / 'setup.exe'}")
    assert proc.returncode != 0
    assert "550 5.7.1 " in proc.stdout and "setup.exe" in proc.stdout
    assert world.count(COLLEAGUE) == before


def curl(url: str, world: World, upload: Path, *args: str, rcpt: str = COLLEAGUE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("curl"), "--silent", "--show-error", "--verbose", "--ssl-reqd", "--cacert", str(world.ca), url,
         "--mail-from", MEMBER, "--mail-rcpt", rcpt, "--upload-file", str(upload), "--user", f"{MEMBER}:{PASSWORD}",
         *args],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("scheme", ["smtps", "smtp"])
def test_curl_submits_over_tls(server: Server, world: World, tmp_path: Path, scheme: str) -> None:
    before = world.count(COLLEAGUE)
    port = server.port465 if scheme == "smtps" else server.port587
    original = message(MEMBER, COLLEAGUE, f"curl {scheme}", msgid=f"<curl-{scheme}@dental.test>",
                       body=".dot first\nSecond line.\n")
    (tmp_path / "mail.eml").write_bytes(original)
    proc = curl(f"{scheme}://localhost:{port}/client.example", world, tmp_path / "mail.eml")
    assert proc.returncode == 0, proc.stderr
    assert "250 2.0.0 Message accepted for delivery" in proc.stderr
    assert world.count(COLLEAGUE) == before + 1
    assert world.read(COLLEAGUE).endswith(original)


def test_curl_refusals(server: Server, world: World, tmp_path: Path) -> None:
    before = world.count(COLLEAGUE)
    (tmp_path / "mail.eml").write_bytes(message(MEMBER, OUTSIDER, "not in the book"))
    proc = curl(f"smtps://localhost:{server.port465}/client.example", world, tmp_path / "mail.eml", rcpt=OUTSIDER)
    assert proc.returncode != 0
    assert "550 5.7.1 lab@lab.test is not in your address book" in proc.stderr
    (tmp_path / "bad.eml").write_bytes(message("front@clinic.test", COLLEAGUE, "spoofed"))
    proc = curl(f"smtps://localhost:{server.port465}/client.example", world, tmp_path / "bad.eml")
    assert proc.returncode != 0
    assert "553 5.7.1 The From header (front@clinic.test) is not the account" in proc.stderr
    proc = curl(f"smtps://localhost:{server.port465}/client.example", world, tmp_path / "bad.eml",
                "--user", f"{MEMBER}:wrong")
    assert proc.returncode != 0 and "535 5.7.8" in proc.stderr
    assert world.count(COLLEAGUE) == before
