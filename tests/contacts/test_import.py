"""Importing a PMS export into a member's address book: idempotent, per
row reports, invitations for colleagues without an account."""

from __future__ import annotations

from pathlib import Path

from postvault.conf.schema import Config
from postvault.contacts.importer import import_file
from postvault.notices.hooks import outbound_queue
from postvault.store.api import Store

EXPORT = (
    "Name;Practice;E-mail;Phone\n"
    "Dr. Ada Ortho;Ortho Partners;ada@ortho.test;555-0100\n"
    "Dr. Bo Skin;Skin Clinic;bo@skin.test;\n"
    "Broken;Nowhere;not-an-address;\n"
    "Known;Ortho Partners;dr@ortho.test;\n"
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "export.csv"
    path.write_text(text, "utf-8")
    return path


def test_import_reports_each_row_and_is_idempotent(
    store: Store, config: Config, people: dict[str, str], tmp_path: Path
) -> None:
    path = write(tmp_path, EXPORT)
    report = import_file(store, config, path, people["member"])
    assert report.lines == [
        "added: row 2: ada@ortho.test",
        "added: row 3: bo@skin.test",
        "refused: row 4: invalid address 'not-an-address': An email address must have an @-sign.",
        "updated: row 5: dr@ortho.test (has an account)",
    ]
    assert not report.ok and report.counts["refused"] == 1
    assert report.summary(path).endswith("4 rows: 2 added, 1 updated, 0 unchanged, 0 invited, 1 refused")

    again = import_file(store, config, path, people["member"])
    assert [line.split(":")[0] for line in again.lines] == ["unchanged", "unchanged", "refused", "unchanged"]
    book = {c.email: c for c in store.address_book(people["member"])}
    assert len(book) == 3 and book["ada@ortho.test"].extra == {"Phone": "555-0100"}
    assert book["ada@ortho.test"].account_state == "none" and book["dr@ortho.test"].account_state == "active"

    changed = write(tmp_path, EXPORT.replace("Ortho Partners;ada", "Ortho Partners West;ada"))
    third = import_file(store, config, changed, people["member"])
    assert third.lines[0] == "updated: row 2: ada@ortho.test"
    assert store.address_book(people["member"])[0].practice == "Ortho Partners West"


def test_import_with_invite(store: Store, config: Config, people: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path, EXPORT.replace("Broken;Nowhere;not-an-address;\n", ""))
    report = import_file(store, config, path, people["member"], invite=True)
    assert report.ok
    assert report.lines[0].startswith("invited: row 2: ada@ortho.test, added in the address book (link valid until ")
    assert report.lines[1].startswith("invited: row 3: bo@skin.test")
    assert report.lines[2] == "updated: row 4: dr@ortho.test (has an account)"
    entries = outbound_queue(store, config).entries()
    assert sorted(e.recipient for e in entries) == ["ada@ortho.test", "bo@skin.test"]
    # Again: already invited, nothing new is sent.
    again = import_file(store, config, path, people["member"], invite=True)
    assert again.lines[0] == "unchanged: row 2: ada@ortho.test (invited earlier, not signed up yet)"
    assert len(outbound_queue(store, config).entries()) == 2
    assert store.contacts("ada@ortho.test") == [people["member"]]
