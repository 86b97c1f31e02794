"""``postvault invite`` and ``postvault contacts import`` as an admin runs
them: the real console script in a subprocess, a real home folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from postvault.conf.load import load_config
from postvault.errors import InvalidInput
from postvault.home import open_store
from postvault.notices.hooks import outbound_queue
from tests.store.test_store_api import mail
from tests.test_cli import PASSWORD, assert_one_line_error, run

MEMBER = "office@dental.test"
COLLEAGUE = "dr@ortho.test"


@pytest.fixture
def member_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    assert run("init", "--home", str(home), "--hostname", "mail.clinic.test").returncode == 0
    proc = run("member", "add", MEMBER, "--practice", "Smile Dental", "--password-stdin", "--home", str(home),
               stdin=PASSWORD + "\n")
    assert proc.returncode == 0, proc.stderr
    return home


def link_in(stdout: str) -> str:
    [link] = [line for line in stdout.splitlines() if line.startswith("https://")]
    assert link.startswith("https://mail.clinic.test/signup/")
    return link.rsplit("/", 1)[1]


def test_invitation_life_cycle(member_home: Path) -> None:
    home = str(member_home)
    first = run("invite", COLLEAGUE, "--member", MEMBER, "--print-link", "--home", home)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"invited {COLLEAGUE} for {MEMBER}; the link is valid until ")
    old_token = link_in(first.stdout)

    store = open_store(load_config(member_home))
    try:
        assert outbound_queue(store, load_config(member_home)).entries() == []  # printed, not emailed
        store.deliver(mail("Waiting for you"), MEMBER, [COLLEAGUE])
    finally:
        store.close()

    # Asking again without the password: still invited, no new link.
    again = run("invite", COLLEAGUE, "--member", MEMBER, "--home", home)
    assert again.returncode == 0 and "invited already" in again.stdout and "--member-password-stdin" in again.stdout

    wrong = run("invite", COLLEAGUE, "--member", MEMBER, "--member-password-stdin", "--home", home,
                stdin="not the password\n")
    assert_one_line_error(wrong, "authentication failed")

    renewed = run("invite", COLLEAGUE, "--member", MEMBER, "--member-password-stdin", "--print-link",
                  "--home", home, stdin=PASSWORD + "\n")
    assert renewed.returncode == 0, renewed.stderr
    assert "the old link no longer works; 1 waiting message(s) carried over" in renewed.stdout
    new_token = link_in(renewed.stdout)
    assert new_token != old_token

    store = open_store(load_config(member_home))
    try:
        with pytest.raises(InvalidInput, match="replaced by a newer invitation"):
            store.sign_up(old_token, "Ortho Partners", "UTC", PASSWORD)
        store.sign_up(new_token, "Ortho Partners", "America/Chicago", PASSWORD)
        session = store.login(COLLEAGUE, PASSWORD)
        assert store.open_message(session, "INBOX", 1).read() == mail("Waiting for you")
        assert store.contacts(COLLEAGUE) == [MEMBER]
    finally:
        store.close()

    active = run("invite", COLLEAGUE, "--member", MEMBER, "--home", home)
    assert active.returncode == 0 and "already has an account" in active.stdout


def test_invite_emails_the_link_by_default(member_home: Path) -> None:
    proc = run("invite", COLLEAGUE, "--member", MEMBER, "--home", str(member_home))
    assert proc.returncode == 0 and "(emailed)" in proc.stdout and "https://" not in proc.stdout
    config = load_config(member_home)
    store = open_store(config)
    try:
        [entry] = outbound_queue(store, config).entries()
        assert (entry.kind, entry.recipient, entry.state) == ("invitation", COLLEAGUE, "queued")
    finally:
        store.close()


def test_invite_refusals_are_one_line(member_home: Path) -> None:
    assert_one_line_error(run("invite", "not an address", "--member", MEMBER, "--home", str(member_home)),
                          "not an email address")
    assert_one_line_error(run("invite", COLLEAGUE, "--member", "nobody@dental.test", "--home", str(member_home)),
                          "no account for nobody@dental.test")


def test_contacts_import(member_home: Path, tmp_path: Path) -> None:
    export = tmp_path / "colleagues.csv"
    export.write_bytes(
        b"\xef\xbb\xbfName,Practice,Email,Specialty\r\n"
        b'"Dr. Ada Ortho","Ortho Partners, LLC",ada@ortho.test,Orthodontics\r\n'
        b'Bo,"Skin\nClinic",bo@skin.test,\r\n'
        b"Cy,Cy Care,cy@care.test,\r\n"
    )
    proc = run("contacts", "import", str(export), "--member", MEMBER, "--invite", "--home", str(member_home))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("invited: row 2: ada@ortho.test, added in the address book")
    assert lines[1] == "refused: row 3: 'Practice' contains a line break"
    assert lines[2].startswith("invited: row 4: cy@care.test")
    assert proc.stderr.strip() == ("colleagues.csv: imported with refusals: 3 rows: 2 added, 0 updated, "
                                   "0 unchanged, 2 invited, 1 refused")

    good = tmp_path / "good.csv"
    good.write_text("email;name;practice\nada@ortho.test;Dr. Ada Ortho;Ortho Partners, LLC\n", "utf-8")
    again = run("contacts", "import", str(good), "--member", MEMBER, "--home", str(member_home))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "unchanged: row 2: ada@ortho.test (invited earlier, not signed up yet)",
        "good.csv: imported: 1 rows: 0 added, 0 updated, 1 unchanged, 0 invited, 0 refused",
    ]

    missing = tmp_path / "missing.csv"
    missing.write_text("name,email\nA,a@b.test\n", "utf-8")
    assert_one_line_error(run("contacts", "import", str(missing), "--member", MEMBER, "--home", str(member_home)),
                          "practice")
