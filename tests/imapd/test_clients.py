"""Real mail clients against the real server: mbsync (isync) syncs the four
folders to a Maildir and back, neomutt reads a message and saves its
attachment in batch mode, curl lists and fetches over imaps://.

They connect to "localhost" (the development certificate names it) and
trust the home's development CA file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest

from .conftest import PASSWORD, Server

PDF = b"%PDF-1.4\n%Postvault test scan\n"


def message(subject: str, body: str = "Hello.\n", attachment: bytes | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "dr@ortho.test", "office@dental.test", subject
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="scan.pdf")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def flags_of(server: Server, user: str, folder: str) -> dict[str, frozenset[str]]:
    """Subject -> flags of each message in a folder, read as the account."""
    session = server.store.login(user, PASSWORD)
    snap = server.store.snapshot(session, folder)
    out = {}
    for meta in snap.messages:
        reader = server.store.open_message(session, folder, meta.uid)
        try:
            head = reader.read(4096)
        finally:
            reader.close()
        m = re.search(rb"^Subject: (.*?)\r$", head, re.M)
        out[m[1].decode() if m else f"uid{meta.uid}"] = meta.flags
    return out


# -- mbsync -------------------------------------------------------------------------


def mbsync_rc(server: Server, user: str, root: Path) -> Path:
    rc = root / "mbsyncrc"
    (root / "mail").mkdir(exist_ok=True)
    rc.write_text(f"""\
IMAPAccount pv
Host localhost
Port {server.imaps}
User {user}
Pass "{PASSWORD}"
SSLType IMAPS
CertificateFile {server.ca}

IMAPStore remote
Account pv

MaildirStore local
Path {root}/mail/
Inbox {root}/mail/INBOX
SubFolders Verbatim

Channel pv
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
""")
    return rc


def mbsync(rc: Path) -> None:
    out = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def maildir(root: Path, folder: str) -> list[Path]:
    base = root / "mail" / folder
    return sorted(p for sub in ("cur", "new") for p in (base / sub).glob("*"))


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="isync is not installed (.ci/run installs it)")
def test_mbsync_both_ways(server: Server, tmp_path: Path) -> None:
    member = server.account("member")
    for subject in ("Keep", "Delete me", "Move me"):
        server.store.deliver(message(subject), server.sender, [member])
    rc = mbsync_rc(server, member, tmp_path)
    mbsync(rc)
    for folder in ("INBOX", "Drafts", "Sent", "Trash"):
        assert (tmp_path / "mail" / folder / "cur").is_dir(), folder
    files = {re.search(rb"^Subject: (.*?)\r?$", p.read_bytes(), re.M)[1].decode(): p  # type: ignore[index]
             for p in maildir(tmp_path, "INBOX")}
    assert set(files) == {"Keep", "Delete me", "Move me"}

    # Local changes: flags on one, delete one, move one to Trash, a new draft.
    keep = files["Keep"]
    base = keep.name.split(":2,")[0]
    keep.rename(keep.parent.parent / "cur" / f"{base}:2,FS")
    delete = files["Delete me"]
    delete.rename(delete.parent.parent / "cur" / (delete.name.split(":2,")[0] + ":2,ST"))
    move = files["Move me"]
    # A file that moves to another folder loses its ",U=" (mbsync's UID tag).
    target = tmp_path / "mail" / "Trash" / "cur" / (re.sub(r",U=\d+", "", move.name.split(":2,")[0]) + ":2,S")
    move.rename(target)
    draft = tmp_path / "mail" / "Drafts" / "cur" / "1700000000.1_1.local:2,D"
    draft.write_bytes(b"Subject: Draft from mbsync\r\nTo: dr@ortho.test\r\n\r\nUnfinished.\r\n")
    mbsync(rc)

    assert flags_of(server, member, "INBOX") == {"Keep": frozenset({"\\Flagged", "\\Seen"})}
    assert flags_of(server, member, "Trash") == {"Move me": frozenset({"\\Seen"})}
    assert flags_of(server, member, "Drafts") == {"Draft from mbsync": frozenset({"\\Draft"})}

    # And back: a server-side change reaches the Maildir.
    server.store.deliver(message("Late arrival"), server.sender, [member])
    mbsync(rc)
    subjects = {re.search(rb"^Subject: (.*?)\r?$", p.read_bytes(), re.M)[1].decode()  # type: ignore[index]
                for p in maildir(tmp_path, "INBOX")}
    assert subjects == {"Keep", "Late arrival"}


# -- neomutt ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("neomutt") is None or shutil.which("script") is None,
                    reason="neomutt is not installed (.ci/run installs it)")
def test_neomutt_reads_and_saves_attachment(server: Server, tmp_path: Path) -> None:
    member = server.account("member")
    server.store.deliver(message("X-ray", "The scan is attached.\n", PDF), server.sender, [member])
    rc = tmp_path / "neomuttrc"
    user = member.replace("@", "%40")
    rc.write_text(f"""\
set folder="imaps://{user}@localhost:{server.imaps}/"
set spoolfile="+INBOX"
set imap_pass="{PASSWORD}"
set ssl_ca_certificates_file="{server.ca}"
set certificate_file="{tmp_path}/certs"
set header_cache=""
set message_cachedir=""
set mail_check=0
set wait_key=no
""")
    saved = tmp_path / "scan.pdf"
    keys = f"<display-message><view-attachments><last-entry><save-entry><kill-line>{saved}<enter><exit><exit><quit>"
    command = f"neomutt -n -F {rc} -e 'push \"{keys}\"'"
    env = {**os.environ, "TERM": "xterm", "HOME": str(tmp_path)}
    out = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, timeout=60, env=env,
                         cwd=tmp_path)
    assert saved.exists(), out.stdout[-2000:]
    assert saved.read_bytes() == PDF
    # Displaying the message marked it read (RFC 3501 §6.4.5: BODY[] sets \Seen).
    assert "\\Seen" in flags_of(server, member, "INBOX")["X-ray"]


# -- curl ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lists_and_fetches(server: Server) -> None:
    member = server.account("member")
    server.store.deliver(message("Via curl", "Fetched by curl.\n"), server.sender, [member])
    base = f"imaps://localhost:{server.imaps}"
    common = ["curl", "-sS", "--cacert", str(server.ca), "-u", f"{member}:{PASSWORD}"]
    listing = subprocess.run([*common, f"{base}/"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert '* LIST (\\HasNoChildren \\Sent) "/" "Sent"' in listing.stdout
    assert '"INBOX"' in listing.stdout and "\\Trash" in listing.stdout and "\\Drafts" in listing.stdout
    fetched = subprocess.run([*common, f"{base}/INBOX;UID=1"], capture_output=True, timeout=60)
    assert fetched.returncode == 0, fetched.stderr
    assert b"Subject: Via curl" in fetched.stdout and b"Fetched by curl." in fetched.stdout
    search = subprocess.run([*common, f"{base}/INBOX", "-X", "SEARCH SUBJECT curl"], capture_output=True,
                            text=True, timeout=60)
    assert search.stdout.strip() == "* SEARCH 1"
