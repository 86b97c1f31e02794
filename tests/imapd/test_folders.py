"""Folders of one's own over IMAP with Python's imaplib and raw sessions:
DELETE, RENAME, SUBSCRIBE/LSUB, what another session that has the folder
selected sees (BYE, never a write to the old name), the audit, and APPEND
under the attachment policy of submission."""

from __future__ import annotations

import imaplib
import re
import time

import pytest
from sqlalchemy import select

from postvault.store.models import AuditEvent

from .client import Client
from .conftest import PASSWORD, Server

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases

MSG = b"From: a@dental.test\r\nSubject: private note\r\n\r\nbody\r\n"
EXE = (b"From: a@dental.test\r\nSubject: tool\r\nMIME-Version: 1.0\r\n"
       b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee\r\n'
       b"--b\r\nContent-Type: application/octet-stream\r\n"
       b'Content-Disposition: attachment; filename="setup.exe"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
       b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAA=\r\n--b--\r\n")


def imaps(server: Server, user: str) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=server.context(), timeout=30)
    client.login(user, PASSWORD)
    return client


def raw_session(server: Server, user: str) -> Client:
    c = Client("127.0.0.1", server.imaps, server.context(), timeout=10)
    c.response()
    assert c.command("l", f'LOGIN {user} "{PASSWORD}"')[-1].startswith(b"l OK")
    return c


def names(client: imaplib.IMAP4_SSL, command: str = "list") -> list[str]:
    typ, data = getattr(client, command)('""', "*")
    assert typ == "OK"
    return [re.search(rb'"/" "?(.*?)"?$', d)[1].decode() for d in data if d]  # type: ignore[index,union-attr]


def test_create_rename_delete_and_subscriptions(folders_server: Server) -> None:
    member = folders_server.account("member")
    c = imaps(folders_server, member)
    try:
        assert c.create("Projects")[0] == "OK"
        assert c.create("Projects/2025")[0] == "OK"
        typ, data = c.append("Projects", None, None, MSG)
        assert typ == "OK", data
        assert c.unsubscribe("Projects/2025")[0] == "OK"
        assert names(c, "lsub") == ["INBOX", "Drafts", "Sent", "Trash", "Projects"]
        typ, data = c.rename("Projects", "Done")
        assert typ == "OK", data
        assert names(c) == ["INBOX", "Drafts", "Sent", "Trash", "Done", "Done/2025"]
        assert names(c, "lsub") == ["INBOX", "Drafts", "Sent", "Trash", "Done"]
        typ, data = c.select("Done")
        assert typ == "OK" and data == [b"1"]
        typ, data = c.uid("FETCH", "1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == MSG  # type: ignore[index]
        c.close()
        typ, data = c.delete("Done")
        assert typ == "NO" and b"[HASCHILDREN]" in data[0]
        assert c.delete("Done/2025")[0] == "OK"
        assert c.delete("Done")[0] == "OK"
        assert names(c) == ["INBOX", "Drafts", "Sent", "Trash"]
        typ, data = c.delete("Done")
        assert typ == "NO" and b"[NONEXISTENT]" in data[0]
        typ, data = c.rename("Trash", "Bin2")
        assert typ == "NO" and b"[CANNOT]" in data[0]
    finally:
        c.logout()
    with folders_server.store._sessions() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.account == member,
                                                         AuditEvent.event.in_(["mailbox.delete", "mailbox.rename"]))
                                .order_by(AuditEvent.id)))
    assert [e.event for e in events] == ["mailbox.rename", "mailbox.delete", "mailbox.delete"]
    assert all(e.client_ip == "127.0.0.1" and e.protocol == "imap" for e in events)
    assert not any("Projects" in e.detail or "Done" in e.detail or "private" in e.detail for e in events)
    assert "count=1 messages=" in events[2].detail


@pytest.mark.parametrize("change", ["DELETE Shared", "RENAME Shared Moved", "RENAME Top Top2"])
def test_another_session_with_the_folder_selected_gets_bye(folders_server: Server, change: str) -> None:
    member = folders_server.account("member")
    actor = imaps(folders_server, member)
    watcher = raw_session(folders_server, member)
    try:
        if "Top" in change:
            assert actor.create("Top")[0] == "OK"  # renamed with what is inside it
        assert actor.create("Top/Shared" if "Top" in change else "Shared")[0] == "OK"
        selected = "Top/Shared" if "Top" in change else "Shared"
        actor.append(selected, None, None, MSG)
        assert watcher.command("s", f"SELECT {selected}")[-1].startswith(b"s OK")
        verb, *args = change.split(" ")
        typ, data = actor.delete(*args) if verb == "DELETE" else actor.rename(*args)
        assert typ == "OK", data
        # The watcher is told at once, without a command of its own.
        line = watcher.response()
        assert line.startswith(b"* BYE ") and b"deleted or renamed" in line
        with pytest.raises((EOFError, OSError)):
            watcher.response()
        # Nothing the watcher could have written landed under the old name.
        assert actor.create(selected)[0] == "OK"
        assert actor.select(selected)[1] == [b"0"]
    finally:
        watcher.close()
        actor.logout()


def test_unrelated_changes_leave_a_selected_session_alone(folders_server: Server) -> None:
    member = folders_server.account("member")
    actor = imaps(folders_server, member)
    watcher = raw_session(folders_server, member)
    try:
        actor.create("Stay")
        actor.create("Other")
        actor.create("Stay2")  # a prefix of nothing selected; "Stay" itself stays
        assert watcher.command("s", "SELECT Stay")[-1].startswith(b"s OK")
        assert actor.rename("Other", "Other2")[0] == "OK"
        assert actor.delete("Stay2")[0] == "OK"
        time.sleep(0.3)
        lines = watcher.command("n", "NOOP")
        assert lines == [b"n OK NOOP completed"], lines
    finally:
        watcher.close()
        actor.logout()


def test_own_rename_of_the_selected_folder_keeps_working(folders_server: Server) -> None:
    member = folders_server.account("member")
    c = raw_session(folders_server, member)
    try:
        assert c.command("c", "CREATE Mine")[-1].startswith(b"c OK")
        assert c.command("s", "SELECT Mine")[-1].startswith(b"s OK")
        assert c.command("r", "RENAME Mine Yours")[-1] == b"r OK RENAME completed"
        lines = c.command("a", 'APPEND Yours {%d+}\r\n' % len(MSG) + MSG.decode())
        assert b"* 1 EXISTS" in lines and lines[-1].startswith(b"a OK"), lines
        assert c.command("n", "NOOP") == [b"n OK NOOP completed"]
        lines = c.command("f", "UID FETCH 1 (UID FLAGS)")
        assert lines[-1] == b"f OK FETCH completed" and b"UID 1" in lines[0], lines
    finally:
        c.close()


def test_append_runs_the_attachment_policy(server: Server) -> None:
    member = server.account("member")
    c = imaps(server, member)
    try:
        typ, data = c.append("Drafts", "(\\Draft)", None, EXE)
        assert typ == "NO" and re.match(rb"\[CANNOT\] \S.*\.$", data[0]), data
        assert c.status("Drafts", "(MESSAGES UIDNEXT)")[1] == [b'"Drafts" (MESSAGES 0 UIDNEXT 1)']
        typ, data = c.append("Drafts", "(\\Draft)", None, MSG)
        assert typ == "OK"
    finally:
        c.logout()
