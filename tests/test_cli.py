"""The ``postvault`` command as an admin runs it: a real subprocess of the
installed console script, real home folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

PASSWORD = "correct horse battery staple"


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("postvault") or sys.exit("the postvault console script is not installed")
    base = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    return subprocess.run(
        [exe, *args], input=stdin, capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def cli_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    proc = run("init", "--home", str(home), "--hostname", "mail.clinic.test")
    assert proc.returncode == 0, proc.stderr
    return home


def test_init_makes_the_home_folder(cli_home: Path) -> None:
    for rel in ["conf/postvault.toml", "conf/policy.toml", "certs/ca.pem", "certs/server.pem",
                "certs/server.key", "data/postvault.db"]:
        assert (cli_home / rel).is_file(), rel
    assert (cli_home / "certs/server.key").stat().st_mode & 0o777 == 0o600
    assert (cli_home / "data/postvault.db").stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate((cli_home / "certs/server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mail.clinic.test" in names.get_values_for_type(x509.DNSName)
    assert 'hostname = "mail.clinic.test"' in (cli_home / "conf/postvault.toml").read_text()
    # Every default is written out and commented.
    policy = (cli_home / "conf/policy.toml").read_text()
    assert 'max_size = "15 MiB"' in policy and "# " in policy


def test_init_refuses_an_existing_home(cli_home: Path) -> None:
    before = (cli_home / "conf/postvault.toml").read_bytes()
    proc = run("init", "--home", str(cli_home))
    assert_one_line_error(proc, "refusing to overwrite")
    assert (cli_home / "conf/postvault.toml").read_bytes() == before


def test_init_with_bad_hostname_leaves_nothing(tmp_path: Path) -> None:
    proc = run("init", "--home", str(tmp_path / "h"), "--hostname", "not a host!")
    assert_one_line_error(proc, "hostname")
    assert not (tmp_path / "h").exists() or not any((tmp_path / "h").iterdir())


def test_home_from_environment(tmp_path: Path) -> None:
    proc = run("init", env={"POSTVAULT_HOME": str(tmp_path / "envhome")})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "envhome/conf/postvault.toml").is_file()


def test_config_show_with_override(cli_home: Path) -> None:
    proc = run("config", "show", "--home", str(cli_home), env={"POSTVAULT_LISTEN_IMAPS": "127.0.0.1:10993"})
    assert proc.returncode == 0, proc.stderr
    assert 'imaps = "127.0.0.1:10993"' in proc.stdout
    bad = run("config", "show", "--home", str(cli_home), env={"POSTVAULT_LISTEN_IMAPS": "127.0.0.1:99999"})
    assert_one_line_error(bad, "POSTVAULT_LISTEN_IMAPS", "listen.imaps")


def test_config_errors_name_file_and_key(cli_home: Path) -> None:
    conf = cli_home / "conf/postvault.toml"
    conf.write_text(conf.read_text().replace('imap = "0.0.0.0:143"', 'imap = "0.0.0.0:143"\nimapz = 1'))
    assert_one_line_error(run("config", "show", "--home", str(cli_home)), "postvault.toml", "imapz")


def test_member_and_colleague_add(cli_home: Path) -> None:
    h = ("--home", str(cli_home))
    ok = run("member", "add", "office@dental.test", "--practice", "Smile Dental", "--timezone", "America/Chicago",
             "--password-stdin", *h, stdin=PASSWORD + "\n")
    assert ok.returncode == 0, ok.stderr
    assert "office@dental.test" in ok.stdout and ok.stdout.count("\n") == 1
    ok = run("colleague", "add", "dr@ortho.test", "--member", "office@dental.test", "--practice", "Ortho",
             "--password-stdin", *h, stdin=PASSWORD + "\n")
    assert ok.returncode == 0, ok.stderr

    from postvault.conf.load import load_config
    from postvault.home import open_store

    store = open_store(load_config(cli_home))
    try:
        assert store.contacts("dr@ortho.test") == ["office@dental.test"]
        assert store.get_account("office@dental.test").timezone == "America/Chicago"
        store.login("dr@ortho.test", PASSWORD)
    finally:
        store.close()

    dup = run("member", "add", "office@dental.test", "--practice", "X", "--password-stdin", *h, stdin=PASSWORD)
    assert_one_line_error(dup, "already exists")
    short = run("member", "add", "new@dental.test", "--practice", "X", "--password-stdin", *h, stdin="short\n")
    assert_one_line_error(short, "at least 12")
    tz = run("member", "add", "new@dental.test", "--practice", "X", "--timezone", "Mars/Base", "--password-stdin",
             *h, stdin=PASSWORD)
    assert_one_line_error(tz, "time zone")
    nomember = run("colleague", "add", "x@ortho.test", "--member", "ghost@dental.test", "--practice", "X",
                   "--password-stdin", *h, stdin=PASSWORD)
    assert_one_line_error(nomember, "ghost@dental.test")
    notmember = run("colleague", "add", "y@ortho.test", "--member", "dr@ortho.test", "--practice", "X",
                    "--password-stdin", *h, stdin=PASSWORD)
    assert_one_line_error(notmember, "not a member")
    guessable = run("member", "add", "new@smiledental.test", "--practice", "Smile Dental", "--password-stdin",
                    *h, stdin="SmileDental2024!\n")
    assert_one_line_error(guessable)
    nopw = run("member", "add", "z@dental.test", "--practice", "X", *h, stdin="")
    assert_one_line_error(nopw, "--password-stdin")


def test_missing_home_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("config", "show", "--home", str(tmp_path / "absent")), "postvault.toml")
