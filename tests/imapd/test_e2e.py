"""End to end through both servers of one ``postvault serve``: a member
writes with swaks over submission (587, STARTTLS), the colleague's IDLE
session sees it arrive, mbsync fetches it, the colleague replies with swaks
(In-Reply-To set), and the member's mbsync finds the reply in INBOX and its
own first message in Sent. A colleague's attempt to start a new thread is
refused by SMTP and nothing is stored anywhere."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import PASSWORD, Server
from .test_clients import maildir, mbsync, mbsync_rc
from .test_imaplib import raw_session, read_until

pytestmark = [
    pytest.mark.skipif(shutil.which("swaks") is None or shutil.which("mbsync") is None,
                       reason="swaks and isync are installed by .ci/run"),
    # Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
    pytest.mark.databases,
]


def swaks(server: Server, sender: str, to: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", "localhost", "--port", str(server.submission), "--tls", "--tls-verify",
         "--tls-ca-path", str(server.ca), "--auth", "PLAIN", "--auth-user", sender, "--auth-password", PASSWORD,
         "--from", sender, "--to", to, *extra],
        capture_output=True, text=True, timeout=60)


def subjects(root: Path, folder: str) -> dict[str, bytes]:
    out = {}
    for p in maildir(root, folder):
        raw = p.read_bytes()
        m = re.search(rb"^Subject: (.*?)\r?$", raw, re.M)
        out[m[1].decode() if m else p.name] = raw
    return out


def test_member_writes_colleague_replies(server: Server, tmp_path: Path) -> None:
    member = server.account("member")
    colleague = server.account("colleague", invited_by=member)

    watcher = raw_session(server, colleague)
    watcher.command("s", "SELECT INBOX")
    watcher.send(b"i IDLE\r\n")
    assert watcher.response() == b"+ idling"

    sent = swaks(server, member, colleague, "--header", "Subject: Referral for patient 42",
                 "--header", "Message-Id: <referral42@dental.test>", "--body", "Please see patient 42.")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    acknowledged = time.monotonic()
    read_until(watcher, b"* 1 EXISTS", 5)
    assert time.monotonic() - acknowledged < 1.0  # RFC 2177 push, within a second of the 250
    watcher.send(b"DONE\r\n")
    assert read_until(watcher, b"i OK", 5)[-1] == b"i OK IDLE terminated"
    watcher.close()

    # Thunderbird then APPENDs its own copy to "Sent Items": the copy SMTP
    # already filed is recognised, and the answer names it (no duplicate).
    member_imap = raw_session(server, member)
    copy = (f"From: {member}\r\nTo: {colleague}\r\nSubject: Referral for patient 42\r\n"
            "Message-Id: <referral42@dental.test>\r\n\r\nPlease see patient 42.\r\n").encode()
    member_imap.send(b'p APPEND "Sent Items" (\\Seen) {%d}\r\n' % len(copy))
    assert member_imap.response().startswith(b"+")
    member_imap.send(copy + b"\r\n")
    answer = read_until(member_imap, b"p ", 5)[-1]
    assert re.fullmatch(rb"p OK \[APPENDUID \d+ 1\] APPEND completed", answer), answer
    member_imap.close()
    sent_box = server.store.snapshot(server.store.login(member, PASSWORD), "Sent")
    assert len(sent_box.messages) == 1

    colleague_dir = tmp_path / "colleague"
    colleague_dir.mkdir()
    mbsync(mbsync_rc(server, colleague, colleague_dir))
    inbox = subjects(colleague_dir, "INBOX")
    assert list(inbox) == ["Referral for patient 42"]
    message_id = re.search(rb"^Message-I[Dd]: (<[^>]+>)", inbox["Referral for patient 42"], re.M | re.I)
    assert message_id is not None

    reply = swaks(server, colleague, member, "--header", "Subject: Re: Referral for patient 42",
                  "--header", f"In-Reply-To: {message_id[1].decode()}", "--body", "Seen on Tuesday.")
    assert reply.returncode == 0, reply.stdout + reply.stderr

    member_dir = tmp_path / "member"
    member_dir.mkdir()
    mbsync(mbsync_rc(server, member, member_dir))
    assert list(subjects(member_dir, "INBOX")) == ["Re: Referral for patient 42"]
    assert list(subjects(member_dir, "Sent")) == ["Referral for patient 42"]

    # A colleague may only reply: a new thread is refused, nothing stored.
    before = {f: len(server.store.snapshot(server.store.login(member, PASSWORD), f).messages)
              for f in ("INBOX", "Sent")}
    fresh = swaks(server, colleague, member, "--header", "Subject: New topic", "--body", "Unsolicited.")
    assert fresh.returncode != 0
    assert re.search(r"<~\*? +550 5.7.1 ", fresh.stdout), fresh.stdout
    after = {f: len(server.store.snapshot(server.store.login(member, PASSWORD), f).messages)
             for f in ("INBOX", "Sent")}
    assert after == before
    colleague_session = server.store.login(colleague, PASSWORD)
    assert len(server.store.snapshot(colleague_session, "Sent").messages) == 1  # the reply only
