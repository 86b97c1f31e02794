"""The officer procedure of docs/recovery.md end to end: a real home with
``[recovery] keys``, the real ``postvault serve`` (IMAP and SMTP over TLS),
the ``postvault`` CLI as subprocesses, and the officer's ``gpg --decrypt``.

A message delivered over SMTP before the recovery opens over IMAP with
the new password afterwards; a wrong escrow changes nothing; a reset
without escrow deletes the mail nobody can open; break-glass access reads
over IMAP, cannot change anything, is audited under the person's name, is
refused after revocation and closed at expiry; the owner is notified of
each step through the outbound queue.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from sqlalchemy import select

from postvault.certs.context import client_context
from postvault.conf.load import load_config
from postvault.home import open_store
from postvault.store.api import Store
from postvault.store.models import AuditEvent, Mailbox, MessageCopy
from tests.imapd.conftest import start_server, stop_server
from tests.outbound.sink import SinkHandler, sink, write_certs

from .conftest import Officer, configure_recovery, make_officer

HOST = "mail.example.test"
PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a brand new passphrase 2024"
MEMBER = "office@dental.test"
OTHER = "front@clinic.test"
KDF = {"POSTVAULT_STORE_KDF_ITERATIONS": "1"}
NOTICE_SUBJECTS = ("Your Secure Messaging password was reset", "Emergency access to your Secure Messaging mailbox")


def pv(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """The postvault CLI as an admin's script runs it: no terminal at all
    (a new session has no controlling tty), so nothing can be asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    proc = subprocess.run([sys.executable, "-m", "postvault.cli.main", *args], input=stdin, capture_output=True,
                          env={**env, **KDF}, timeout=120, start_new_session=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@dataclass
class Site:
    home: Path
    officer: Officer
    ports: dict[str, int]
    store: Store
    sink: SinkHandler

    def context(self) -> ssl.SSLContext:
        return client_context(self.home / "certs" / "ca.pem")

    def imap(self, user: str, password: str) -> imaplib.IMAP4_SSL:
        client = imaplib.IMAP4_SSL("127.0.0.1", self.ports["imaps"], ssl_context=self.context(), timeout=30)
        client.login(user, password)
        return client

    def send(self, sender: str, to: str, subject: str, body: str, password: str = PASSWORD) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = sender, to, subject
        msg.set_content(body)
        with smtplib.SMTP_SSL("127.0.0.1", self.ports["submissions"], context=self.context(), timeout=30) as smtp:
            smtp.login(sender, password)
            smtp.send_message(msg)

    def events(self, name: str, account: str | None = None) -> list[AuditEvent]:
        with self.store._sessions() as s:
            q = select(AuditEvent).where(AuditEvent.event == name).order_by(AuditEvent.id)
            if account is not None:
                q = q.where(AuditEvent.account == account)
            return list(s.scalars(q))

    def notices(self, account: str, wait_for: int = 0) -> list[EmailMessage]:
        """Security notices about ``account`` that reached the smarthost
        (waiting up to 30 s for ``wait_for`` of them); new-mail
        notifications left out."""
        deadline = time.monotonic() + 30
        while True:
            got = []
            for r in list(self.sink.received):
                msg = BytesParser(policy=email_policy.default).parsebytes(r.data)
                if r.rcpt_tos == [account] and msg["Subject"] in NOTICE_SUBJECTS:
                    got.append(msg)
            if len(got) >= wait_for or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def escrow(self, email: str, tmp: Path) -> bytes:
        """Admin exports, officer decrypts: the decrypted escrow (in memory)."""
        out = tmp / f"{email}.escrow.asc"
        exported = pv("escrow", "export", email, "--out", str(out), "--home", str(self.home))
        assert exported.returncode == 0, exported.stderr
        assert f"escrow of {email} written to {out}, encrypted to " in exported.stdout
        return self.officer.decrypt(out.read_bytes())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if shutil.which("gpg") is None:
        pytest.fail("GnuPG (gpg) is not installed; .ci/run installs it")
    root = tmp_path_factory.mktemp("recovery")
    home = root / "home"
    assert pv("init", "--home", str(home), "--hostname", HOST).returncode == 0
    for officer in make_officer(root / "officer-gnupg", "officer@dental.test"):
        configure_recovery(home, officer)
        for email, practice in ((MEMBER, "Smile Dental"), (OTHER, "Family Clinic")):
            added = pv("member", "add", email, "--practice", practice, "--password-stdin", "--home", str(home),
                       stdin=PASSWORD.encode() + b"\n")
            assert added.returncode == 0, added.stderr
        certs = write_certs(root / "smarthost")
        with sink(certs) as (handler, port):
            # Notices go out through a local smarthost, so the test reads
            # what the owner receives.
            proc, ports, _log = start_server(home, {"POSTVAULT_NOTIFY_RELAY": f"127.0.0.1:{port}",
                                                    "POSTVAULT_NOTIFY_RELAY_CA": str(certs.ca)})
            os.environ.update(KDF)
            try:
                store = open_store(load_config(home))
            finally:
                del os.environ["POSTVAULT_STORE_KDF_ITERATIONS"]
            try:
                yield Site(home, officer, ports, store, handler)
            finally:
                stop_server(proc)
                store.close()


def fetch_body(client: imaplib.IMAP4_SSL, n: int = 1) -> bytes:
    typ, data = client.fetch(str(n), "(BODY.PEEK[])")
    assert typ == "OK", data
    return data[0][1]  # type: ignore[index]


def test_recovery_with_escrow_keeps_old_mail_readable(site: Site, tmp_path: Path) -> None:
    site.send(OTHER, MEMBER, "Referral before the reset", "Please see the patient on Monday.\n")
    escrow = site.escrow(MEMBER, tmp_path)
    assert escrow.startswith(b'{"account":"office@dental.test"')

    # The other account's escrow, as a file: refused in one line, nothing changed.
    wrong = tmp_path / "wrong.json"
    wrong.write_bytes(site.escrow(OTHER, tmp_path))
    refused = pv("recover", MEMBER, "--escrow-file", str(wrong), "--password-stdin", "--home", str(site.home),
                 stdin=NEW_PASSWORD.encode() + b"\n")
    one_line_error(refused, "belongs to another account", OTHER)
    site.imap(MEMBER, PASSWORD).logout()
    assert site.events("account.recover") == []

    one_line_error(pv("escrow", "export", "nobody@dental.test", "--out", str(tmp_path / "x"), "--home",
                      str(site.home)), "no account for nobody@dental.test")
    still_sealed = pv("recover", MEMBER, "--escrow-file", str(tmp_path / f"{MEMBER}.escrow.asc"), "--password-stdin",
                      "--home", str(site.home), stdin=NEW_PASSWORD.encode() + b"\n")
    one_line_error(still_sealed, "still encrypted", "gpg --decrypt")

    # The recommended way: the decrypted escrow only ever in a pipe.
    done = pv("recover", MEMBER, "--escrow-file", "-", "--password-stdin", "--home", str(site.home),
              stdin=escrow + NEW_PASSWORD.encode() + b"\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"password of {MEMBER} reset with the recovery escrow; its mail stays readable; "
                                   "1 notice(s) to the owner queued")

    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        site.imap(MEMBER, PASSWORD)
    client = site.imap(MEMBER, NEW_PASSWORD)
    client.select("INBOX")
    body = fetch_body(client)
    assert b"Subject: Referral before the reset" in body and b"Please see the patient on Monday." in body
    client.logout()

    [event] = site.events("account.recover")
    assert (event.actor, event.account) == ("admin", MEMBER)
    [msg] = site.notices(MEMBER, wait_for=1)
    assert msg["To"] == MEMBER and msg["Subject"] == "Your Secure Messaging password was reset"
    text = msg.get_content()
    assert "readable" in text and "Referral" not in text and "patient" not in text


def test_reset_without_escrow_asks_and_deletes_unreadable_mail(site: Site) -> None:
    site.send(MEMBER, OTHER, "Sent before the reset", "Body.\n", NEW_PASSWORD)  # recovered above
    # A script without a terminal must say --yes; nothing changes otherwise.
    unconfirmed = pv("recover", OTHER, "--reset-without-escrow", "--password-stdin", "--home", str(site.home),
                     stdin=NEW_PASSWORD.encode() + b"\n")
    assert unconfirmed.returncode == 1 and "Traceback" not in unconfirmed.stderr
    warning, error = unconfirmed.stderr.strip().splitlines()
    assert warning.startswith(f"WARNING: resetting {OTHER} without its recovery escrow makes a new key pair.")
    assert "will be DELETED" in warning and "This account HAS an escrow" in warning
    assert error == "postvault: no terminal to confirm at; pass --yes to confirm in a script"
    client = site.imap(OTHER, PASSWORD)
    assert client.select("INBOX")[1] == [b"1"]
    client.logout()

    done = pv("recover", OTHER, "--reset-without-escrow", "--yes", "--password-stdin", "--home", str(site.home),
              stdin=NEW_PASSWORD.encode() + b"\n")
    assert done.returncode == 0, done.stderr
    # Its INBOX message and the Sent copy of the referral it wrote before.
    assert f"password of {OTHER} reset with a new key pair; 2 message(s) deleted" in done.stdout
    client = site.imap(OTHER, NEW_PASSWORD)
    assert client.select("INBOX")[1] == [b"0"] and client.select("Sent")[1] == [b"0"]
    client.logout()
    # The other side keeps its copies: the sender's Sent, the recipient's INBOX.
    member = site.imap(MEMBER, NEW_PASSWORD)
    member.select("Sent")
    assert b"Sent before the reset" in fetch_body(member)
    member.select("INBOX")
    assert b"Referral before the reset" in fetch_body(member)
    member.logout()
    [event] = site.events("account.reset")
    assert event.detail == "with=new-key-pair deleted=2"
    [notice] = site.notices(OTHER, wait_for=1)
    text = notice.get_content()
    assert "without a recovery key" in text and "were deleted (2)" in text and "Sent before" not in text


def _unindexed(site: Site, email: str) -> int:
    """Copies of ``email``'s mail with neither a search index entry nor a
    header cache entry (imapd/indexfill.py fills them after a login)."""
    with site.store._sessions() as s:
        acct_id = site.store.accounts([email])[email].id
        rows = s.execute(select(MessageCopy.sealed_search, MessageCopy.sealed_header)
                         .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
                         .where(Mailbox.account_id == acct_id)).all()
    return sum(1 for search, header in rows if search is None and header is None)


def test_break_glass_reads_only_is_audited_and_ends(site: Site, tmp_path: Path) -> None:
    escrow = site.escrow(MEMBER, tmp_path)
    # Delivered now (no entries), read only through the emergency session:
    # a read-only login starts no index fill.
    site.store.deliver(b"Subject: after the reset\r\n\r\nbody\r\n", OTHER, [MEMBER], save_sent=False)
    unindexed = _unindexed(site, MEMBER)
    assert unindexed >= 1
    granted = pv("emergency", "grant", MEMBER, "--person", "Dr. Jane Cover", "--reason", "owner in hospital",
                 "--hours", "1", "--escrow-file", "-", "--home", str(site.home), stdin=escrow)
    assert granted.returncode == 0, granted.stderr
    user = re.search(r"user name: (emergency-[0-9a-f]{16})", granted.stdout)[1]  # type: ignore[index]
    password = re.search(r"password \(shown once, not stored anywhere\): (\S+)", granted.stdout)[1]  # type: ignore[index]
    grant_id = user.removeprefix("emergency-")
    assert f"IMAP server {HOST} port 993 (SSL/TLS); user name: {user}" in granted.stdout  # as configured

    client = site.imap(user, password)
    # SELECT answers [READ-ONLY] (imaplib raises on that), so a client EXAMINEs.
    with pytest.raises(imaplib.IMAP4.readonly):
        client.select("INBOX")
    assert client.select("INBOX", readonly=True)[0] == "OK"
    assert b"Referral before the reset" in fetch_body(client)
    typ, data = client.store("1", "+FLAGS", "(\\Seen \\Deleted)")
    assert typ == "NO" and data[0].startswith(b"[CANNOT] This is read-only emergency access")
    typ, data = client.append("INBOX", "", None, b"Subject: planted\r\n\r\nx\r\n")
    assert typ == "NO" and data[0].startswith(b"[CANNOT]")
    typ, data = client.uid("MOVE", "1", "Trash")
    assert typ == "NO" and data[0].startswith(b"[CANNOT]")
    assert client.expunge()[0] == "NO"

    reads = [e for e in site.events("message.read", MEMBER) if e.actor == "Dr. Jane Cover"]
    assert len(reads) == 1 and f"emergency={grant_id}" in reads[0].detail
    assert [e.actor for e in site.events("emergency.login", MEMBER)] == ["Dr. Jane Cover"]
    time.sleep(1.0)  # a fill, had one started, would have filled a few messages by now
    assert _unindexed(site, MEMBER) == unindexed
    owner = site.imap(MEMBER, NEW_PASSWORD)
    owner.select("INBOX")
    typ, data = owner.fetch("1", "(FLAGS)")
    assert b"\\Seen" not in data[0] and b"\\Deleted" not in data[0]  # type: ignore[operator]
    owner.logout()
    notice = site.notices(MEMBER, wait_for=2)[-1]
    text = notice.get_content()
    assert notice["Subject"] == "Emergency access to your Secure Messaging mailbox"
    assert "Dr. Jane Cover" in text and "read-only" in text and "owner in hospital" not in text

    # SMTP does not know emergency user names.
    with smtplib.SMTP_SSL("127.0.0.1", site.ports["submissions"], context=site.context(), timeout=30) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login(user, password)

    # Revoked from the CLI: the open session's next read is refused, and so is a new login.
    revoked = pv("emergency", "revoke", grant_id, "--home", str(site.home))
    assert revoked.returncode == 0 and revoked.stdout.strip().endswith("revoked")
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "NO" and b"Emergency access to this mailbox has ended" in data[0]  # type: ignore[operator]
    client.logout()
    with pytest.raises(imaplib.IMAP4.error):
        site.imap(user, password)
    listed = pv("emergency", "list", "--home", str(site.home))
    assert re.search(rf"^{grant_id}\trevoked\t{MEMBER}\tDr. Jane Cover\t", listed.stdout, re.M), listed.stdout


def test_break_glass_session_is_closed_at_expiry(site: Site, tmp_path: Path) -> None:
    escrow = site.escrow(MEMBER, tmp_path)
    too_long = pv("emergency", "grant", MEMBER, "--person", "Dr. Long", "--reason", "x", "--hours", "73",
                  "--escrow-file", "-", "--home", str(site.home), stdin=escrow)
    one_line_error(too_long, "at most 72")
    granted = pv("emergency", "grant", MEMBER, "--person", "Dr. Brief", "--reason", "on call",
                 "--hours", "0.002", "--escrow-file", "-", "--home", str(site.home), stdin=escrow)  # 7.2 s
    assert granted.returncode == 0, granted.stderr
    user = re.search(r"user name: (\S+)", granted.stdout)[1]  # type: ignore[index]
    password = re.search(r"not stored anywhere\): (\S+)", granted.stdout)[1]  # type: ignore[index]
    client = site.imap(user, password)
    client.select("INBOX", readonly=True)
    assert b"Referral before the reset" in fetch_body(client)
    # The server says BYE at the end of the grant and closes the connection.
    deadline = time.monotonic() + 20
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            client.noop()
            time.sleep(0.5)
        except (imaplib.IMAP4.abort, OSError):
            closed = True
    assert closed
    with pytest.raises(imaplib.IMAP4.error):
        site.imap(user, password)
    assert site.events("emergency.refused", MEMBER)[-1].detail.endswith("why=expired")
