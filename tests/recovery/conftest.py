"""Fixtures for recovery and emergency access: a throwaway GnuPG home for
the "recovery officer" with a real key pair (made by gpg itself), its
public key configured in a real Postvault home's ``[recovery] keys``, and
the officer's offline step (``gpg --decrypt``) as a real subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postvault.conf.load import load_config
from postvault.conf.schema import Config
from postvault.home import open_store
from postvault.store.api import Store


@dataclass
class Officer:
    """A recovery officer: a GnuPG home with a secret key, outside Postvault."""

    gnupg_home: Path
    email: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "GNUPGHOME": str(self.gnupg_home)}

    def gpg(self, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["gpg", "--batch", "--yes", *args], input=data, capture_output=True,
                              env=self.env(), timeout=60)

    def public_key(self) -> bytes:
        out = self.gpg("--armor", "--export", self.email)
        assert out.returncode == 0 and out.stdout.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
        return out.stdout

    def secret_key(self) -> bytes:
        out = self.gpg("--armor", "--pinentry-mode", "loopback", "--passphrase", "", "--export-secret-keys",
                       self.email)
        assert out.returncode == 0
        return out.stdout

    def decrypt(self, blob: bytes) -> bytes:
        """What the officer does offline: ``gpg --decrypt``."""
        out = self.gpg("--pinentry-mode", "loopback", "--passphrase", "", "--decrypt", data=blob)
        assert out.returncode == 0, out.stderr
        return out.stdout


def make_officer(folder: Path, email: str) -> Iterator[Officer]:
    assert shutil.which("gpg"), "GnuPG (gpg) is not installed; .ci/run installs it"
    folder.mkdir(mode=0o700)
    officer = Officer(folder, email)
    made = officer.gpg("--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key",
                       f"Privacy Officer <{email}>", "future-default", "default", "never")
    assert made.returncode == 0, made.stderr
    try:
        yield officer
    finally:
        # The agent gpg started for this home (and only that one).
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=officer.env(), capture_output=True, timeout=30)


@pytest.fixture
def officer(tmp_path: Path) -> Iterator[Officer]:
    yield from make_officer(tmp_path / "officer-gnupg", "officer@dental.test")


def configure_recovery(home: Path, *officers: Officer) -> None:
    """Put the officers' public keys in HOME/conf/recovery/ and name them in
    ``[recovery] keys`` (as an admin would edit postvault.toml)."""
    folder = home / "conf" / "recovery"
    folder.mkdir(exist_ok=True)
    names = []
    for n, officer in enumerate(officers):
        (folder / f"officer{n}.asc").write_bytes(officer.public_key())
        names.append(f"conf/recovery/officer{n}.asc")
    path = home / "conf" / "postvault.toml"
    text, n = re.subn(r'(?m)^keys = ".*"$', f'keys = "{", ".join(names)}"', path.read_text())
    assert n == 1
    path.write_text(text)


@pytest.fixture
def escrow_config(home: Path, officer: Officer, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("POSTVAULT_STORE_KDF_ITERATIONS", "1")
    configure_recovery(home, officer)
    return load_config(home)


@pytest.fixture
def escrow_store(escrow_config: Config) -> Iterator[Store]:
    store = open_store(escrow_config)
    yield store
    store.close()
