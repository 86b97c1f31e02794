"""The audit log of a real ``postvault serve``: mail submitted over SMTP
(TLS), read and changed over IMAP (TLS), a refusal by policy, a policy
reload; then every event is there with who, what, from where, no event
carries the subject or a file name, one FETCH command that returns content
is one event, the server signs checkpoints by itself, and ``postvault audit
verify`` and ``export`` (subprocesses) agree."""

from __future__ import annotations

import email.policy
import imaplib
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from postvault.certs.context import client_context
from postvault.conf.load import load_config
from postvault.home import init_home, open_store
from postvault.store.api import Store
from tests.imapd.conftest import start_server, stop_server
from tests.test_canary import encodings
from tests.support import cheap_home_env

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases

PASSWORD = "correct horse battery staple"
MEMBER, COLLEAGUE = "office@dental.test", "dr@ortho.test"
MARKER = "Zürich-auditcanary-5f3e9a1c7b2d4e60"


def query(engine: Engine, sql: str) -> list[dict[str, Any]]:
    """Rows as the server left them, read past the store API (SQLite file
    or PostgreSQL database alike)."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql)).mappings()]


class Serve:
    def __init__(self, home: Path, ports: dict[str, int], proc: subprocess.Popen[str], store: Store) -> None:
        self.home, self.ports, self.proc, self.store = home, ports, proc, store

    def smtp(self, user: str) -> smtplib.SMTP_SSL:
        client = smtplib.SMTP_SSL("localhost", self.ports["submissions"],
                                  context=client_context(self.home / "certs" / "ca.pem"), timeout=30)
        client.login(user, PASSWORD)
        return client

    def imap(self, user: str) -> imaplib.IMAP4_SSL:
        client = imaplib.IMAP4_SSL("localhost", self.ports["imaps"],
                                   ssl_context=client_context(self.home / "certs" / "ca.pem"), timeout=30)
        client.login(user, PASSWORD)
        return client

    def events(self) -> list[dict[str, Any]]:
        return query(self.store.engine, "SELECT * FROM audit_events ORDER BY id")

    def wait_for(self, event: str, after: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.events() if r["id"] > after and r["event"] == event]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {event} event")


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, store_overrides: Callable[[], dict[str, str]]) -> Iterator[Serve]:
    home = tmp_path_factory.mktemp("audit") / "home"
    with cheap_home_env():
        init_home(home, "mail.example.test", store_overrides())
        store = open_store(load_config(home))
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    store.create_account(COLLEAGUE, "colleague", "Ortho", PASSWORD, invited_by=MEMBER)
    proc, ports, _log = start_server(home, {"POSTVAULT_AUDIT_CHECKPOINT_SECONDS": "1"})
    try:
        yield Serve(home, ports, proc, store)
    finally:
        stop_server(proc)
        store.close()


def message(attachment_name: str, data: bytes = b"%PDF-1.4\n" + b"0" * 200) -> bytes:
    msg = EmailMessage()
    msg["From"] = MEMBER
    msg["To"] = COLLEAGUE
    msg["Subject"] = f"Patient {MARKER}"
    msg.set_content(f"Findings for {MARKER}.")
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=attachment_name)
    return msg.as_bytes(policy=email.policy.SMTP)


def test_activity_is_audited_without_content(serve: Serve) -> None:
    start = serve.events()[-1]["id"]
    with serve.smtp(MEMBER) as smtp:
        smtp.sendmail(MEMBER, [COLLEAGUE], message(f"xray-{MARKER}.pdf"))
        smtp.sendmail(MEMBER, [COLLEAGUE], message("second.pdf"))
        # Refused by the attachment policy; the reason is a rule id, not the name.
        with pytest.raises(smtplib.SMTPDataError):
            smtp.sendmail(MEMBER, [COLLEAGUE], message(f"tool-{MARKER}.exe", b"MZ" + b"\0" * 200))
    with serve.smtp(COLLEAGUE) as smtp:
        # A colleague may not start a conversation with a member it never heard from.
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail(COLLEAGUE, ["front@clinic.test"], b"Subject: x\r\n\r\nx\r\n")

    imap = serve.imap(COLLEAGUE)
    imap.select("INBOX")
    before = serve.events()[-1]["id"]
    typ, data = imap.fetch("1", "(FLAGS)")  # no content: no read event
    assert typ == "OK"
    typ, data = imap.fetch("1", "(BODY[])")
    assert typ == "OK" and MARKER.encode() in data[0][1]
    # (The outbound worker may log its own events meanwhile: the new-mail
    # notices it can't send in this test.)
    read = [r for r in serve.events() if r["id"] > before and not r["event"].startswith("outbound.")]
    assert [r["event"] for r in read] == ["message.read"]
    delivered = serve.store.accounts([COLLEAGUE])  # the account exists; the message id comes from the event
    assert delivered and read[0]["message"] and read[0]["protocol"] == "imap" and read[0]["client_ip"] == "127.0.0.1"

    typ, data = imap.append("Drafts", "(\\Draft)", imaplib.Time2Internaldate(time.time()), message("note.pdf"))
    assert typ == "OK", data
    before = serve.events()[-1]["id"]
    typ, data = imap.fetch("1:2", "(BODY.PEEK[HEADER] RFC822.SIZE)")
    assert typ == "OK"
    read = [r for r in serve.events() if r["id"] > before and not r["event"].startswith("outbound.")]
    # One event for the command, naming both messages.
    assert [r["event"] for r in read] == ["message.read"] and "count=2" in read[0]["detail"]

    assert imap.store("1", "+FLAGS", "(\\Flagged $Patient)")[0] == "OK"
    assert imap.copy("2", "Trash")[0] == "OK"
    assert imap.store("2", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert imap.expunge()[0] == "OK"
    imap.logout()

    serve.proc.send_signal(signal.SIGHUP)
    serve.wait_for("policy.reload", start)

    rows = [r for r in serve.events() if r["id"] > start]
    kinds = [r["event"] for r in rows]
    for expected in ("login.ok", "message.deliver", "message.refused", "message.read", "message.append",
                     "message.flags", "message.copy", "message.expunge", "policy.reload"):
        assert expected in kinds, (expected, kinds)
    # Every IMAP event names the client's address and protocol, APPEND's too.
    imap_events = [r for r in rows if r["event"] in ("message.read", "message.append", "message.flags",
                                                     "message.copy", "message.expunge")]
    assert all(r["protocol"] == "imap" and r["client_ip"] == "127.0.0.1" for r in imap_events), imap_events
    refused = [r for r in rows if r["event"] == "message.refused"]
    assert {r["account"] for r in refused} == {MEMBER, COLLEAGUE}
    assert all(r["protocol"] == "smtp" and r["client_ip"] == "127.0.0.1" and "rule=" in r["detail"]
               and "code=5" in r["detail"] for r in refused)
    flags = next(r for r in rows if r["event"] == "message.flags" and "Flagged" in r["detail"])
    # A keyword is the user's own text: counted, not named.
    assert "keywords:1" in flags["detail"] and "$Patient" not in flags["detail"]

    # No event holds the subject, the body or a file name, in any encoding.
    needles = encodings(MARKER)
    for r in serve.events():
        values = "|".join(str(v) for v in r.values()).encode()
        assert not [name for name, n in needles.items() if n in values], r
    assert "xray" not in str([tuple(r.values()) for r in serve.events()])

    # The server signs the head by itself ([audit] checkpoint_seconds = 1).
    last = serve.events()[-1]["id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        signed = query(serve.store.engine,
                       "SELECT max(event_id) AS m FROM audit_checkpoints WHERE kind='periodic'")[0]["m"]
        if signed is not None and signed >= last:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no periodic checkpoint")

    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    cli = [sys.executable, "-m", "postvault.cli.main", "audit"]
    proc = subprocess.run([*cli, "verify", "--home", str(serve.home)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("audit chain intact:"), proc.stdout + proc.stderr
    for fmt in ("jsonl", "csv"):
        proc = subprocess.run([*cli, "export", "--account", COLLEAGUE, "--format", fmt, "--home", str(serve.home)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "message.read" in proc.stdout and MEMBER not in proc.stdout.replace(f"member={MEMBER}", "")
        assert not [name for name, n in needles.items() if n in proc.stdout.encode()]
        assert "xray" not in proc.stdout and ".exe" not in proc.stdout
    lines = [json.loads(x) for x in subprocess.run(
        [*cli, "export", "--format", "jsonl", "--home", str(serve.home)], capture_output=True, text=True,
        env=env, timeout=120).stdout.splitlines()]
    assert [x["id"] for x in lines] == sorted(x["id"] for x in lines) and len(lines) >= len(rows)


def test_shutdown_signs_the_last_events(tmp_path: Path, store_overrides: Callable[[], dict[str, str]]) -> None:
    home = tmp_path / "home"
    with cheap_home_env():
        init_home(home, "mail.example.test", store_overrides())
    proc, _ports, _log = start_server(home)
    stop_server(proc)
    assert proc.returncode == 0
    store = open_store(load_config(home))
    try:
        [last] = query(store.engine, "SELECT max(id) AS last, max(CASE WHEN event='server.stop' THEN id END) AS stop "
                                     "FROM audit_events")
        [signed] = query(store.engine, "SELECT event_id, kind FROM audit_checkpoints ORDER BY seq DESC LIMIT 1")
    finally:
        store.close()
    assert last["last"] == last["stop"] and signed == {"event_id": last["last"], "kind": "shutdown"}
