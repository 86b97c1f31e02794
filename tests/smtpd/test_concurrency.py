"""Ten clients sending fifty messages each at once: every message is
delivered exactly once, with ascending UIDs and no gaps."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from .client import PASSWORD, message
from .conftest import Server, World

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases

CLIENTS, MESSAGES = 10, 50
SENDER, RECIPIENT = "bulk@clinic.test", "bulk-in@clinic.test"


def test_ten_clients_fifty_messages_each(server: Server, world: World) -> None:
    world.store.create_account(SENDER, "member", "Bulk Clinic", PASSWORD)
    world.store.create_account(RECIPIENT, "member", "Bulk Inbox", PASSWORD)
    start = threading.Barrier(CLIENTS)

    def client(n: int) -> list[str]:
        ids = []
        smtp = server.smtps(user=SENDER) if n % 2 else server.starttls(user=SENDER)
        start.wait(60)
        for m in range(MESSAGES):
            msgid = f"<c{n}-m{m}@clinic.test>"
            body = f"client {n} message {m}\n" + "x" * (m * 97 % 3000)
            refused = smtp.sendmail(SENDER, [RECIPIENT], message(SENDER, RECIPIENT, f"#{n}/{m}", msgid=msgid,
                                                                 body=body))
            assert refused == {}
            ids.append(msgid)
        smtp.quit()
        return ids

    with ThreadPoolExecutor(CLIENTS) as pool:
        sent = [i for ids in pool.map(client, range(CLIENTS)) for i in ids]
    assert len(set(sent)) == CLIENTS * MESSAGES

    for email, mailbox in ((RECIPIENT, "INBOX"), (SENDER, "Sent")):
        metas = world.messages(email, mailbox)
        uids = [m.uid for m in metas]
        assert uids == list(range(1, CLIENTS * MESSAGES + 1)), mailbox
        assert len({m.message_id for m in metas}) == len(metas)  # one stored message each
    got = []
    for meta in world.messages(RECIPIENT):
        head = world.read(RECIPIENT, meta.uid)[:4096]
        found = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", head)
        assert found
        got.append(found.group(1).decode())
    assert sorted(got) == sorted(sent)
