"""The canary test: a marker carried in a message's subject, body and
attachment name must appear nowhere under the home folder afterwards, in no
encoding a mail could carry it: not in the database or its WAL, the blobs,
logs or temp files (DESIGN.md, "Encryption at rest")."""

from __future__ import annotations

import base64
import logging
import quopri
import secrets
import tempfile
from email.header import Header
from email.message import EmailMessage
from pathlib import Path

import pytest

from postvault.conf.load import load_config
from postvault.home import open_store

from tests.conftest import PASSWORD


def encodings(marker: str) -> dict[str, bytes]:
    raw = marker.encode("utf-8")
    forms = {
        "raw": raw,
        "raw-latin1": marker.encode("latin-1", "replace"),
        # The search index keeps header values case-folded (sealed).
        "casefold": marker.casefold().encode("utf-8"),
        # The random tail alone: catches a Message-ID or a header cut short.
        "token": marker.rsplit("-", 1)[-1].encode(),
    }
    for shift in range(3):
        # The stretch of base64 that is the same wherever the marker starts
        # at this offset modulo 3.
        encoded = base64.b64encode(b"\0" * shift + raw)
        start = -(-shift // 3) * 4 + (4 if shift else 0)
        forms[f"base64+{shift}"] = encoded[start:-4]
    forms["quoted-printable"] = quopri.encodestring(raw).rstrip(b"=\n")
    forms["rfc2047-q"] = Header(marker, "utf-8").encode().encode()[10:-2].replace(b"?=", b"")[:20]
    return forms


def scan(root: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {name}" for name, n in needles.items() if n and n in data]
    return hits


def test_marker_nowhere_on_disk(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = f"Zürich-canary-{secrets.token_hex(8)}"
    needles = encodings(marker)
    assert all(len(n) >= 8 for n in needles.values()), needles

    # Temp files and logs go inside the home folder for this test, so that the
    # scan below covers them; every postvault logger at DEBUG.
    tmp = home / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    handler = logging.FileHandler(home / "postvault.log")
    logger = logging.getLogger("postvault")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)

    store = open_store(load_config(home))
    try:
        store.create_account("office@dental.test", "member", "Smile Dental", PASSWORD)
        store.create_account("dr@ortho.test", "colleague", "Ortho", PASSWORD, invited_by="office@dental.test")
        msg = EmailMessage()
        msg["From"] = "office@dental.test"
        msg["To"] = "dr@ortho.test"
        msg["Subject"] = f"Patient {marker}"
        msg["Message-ID"] = f"<{marker.encode('ascii', 'ignore').decode()}@dental.test>"
        msg.set_content(f"Findings for {marker}.\n" * 50)
        msg.add_attachment(marker.encode() * 100, maintype="application", subtype="octet-stream",
                           filename=f"xray-{marker}.png")
        raw = msg.as_bytes()
        assert all(n in raw or name.startswith(("raw", "base64", "rfc2047", "casefold")) for name, n in needles.items()), (
            "the message itself should carry the marker"
        )

        store.deliver(raw, "office@dental.test", ["dr@ortho.test"])
        colleague = store.login("dr@ortho.test", PASSWORD)
        assert store.open_message(colleague, "INBOX", 1).read() == raw
        # A header search fills the search index (store/searchindex.py);
        # the copy to Trash below carries the entry, APPEND writes one.
        [(uid, fields)] = list(store.search_fields(colleague, "INBOX", [1]))
        assert uid == 1 and fields.has("subject", marker.upper())  # type: ignore[union-attr]
        store.append(colleague, "Drafts", raw, ["\\Draft"])
        store.copy(colleague, "INBOX", [1], "Trash")
        store.set_flags(colleague, "INBOX", [1], ["\\Seen", "\\Deleted"], "add")
        store.expunge(colleague, "INBOX")
        store.change_password("dr@ortho.test", PASSWORD, "another long passphrase")

        # Scan while the database is still open, so its WAL is on disk too.
        assert list(home.rglob("*-wal")), "expected a SQLite WAL file to scan"
        hits = scan(home, needles)
    finally:
        store.close()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
    assert hits == []
    # The scan can find things: the marker written to a file is caught.
    (tmp / "leak.txt").write_bytes(raw)
    assert scan(home, needles)
