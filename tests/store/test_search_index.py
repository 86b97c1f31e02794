"""The sealed SEARCH index (store/searchindex.py) and the metadata reads of
SEARCH, over a real store (SQLite file, or PostgreSQL with --db postgresql)."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select

from postvault.errors import IntegrityError
from postvault.mime.searchfields import Fields
from postvault.store import crypto
from postvault.store.api import Store
from postvault.store.db import sessions
from postvault.store.models import Mailbox

from tests.conftest import PASSWORD
from tests.searchcorpus import CORPUS, SEARCHES, matches
from tests.support import copy_column, set_copy_column

pytestmark = pytest.mark.databases


class _CountingOpens:
    """Counts the messages the store decrypts through ``open_messages``
    (the read the index replaces) while passing every call through."""

    def __init__(self, store: Store) -> None:
        self.opened = 0
        real = store.open_messages

        def counting(*args: Any, **kwargs: Any) -> Any:
            for uid, reader in real(*args, **kwargs):
                self.opened += 1
                yield uid, reader

        store.open_messages = counting  # type: ignore[method-assign]


def _fields(store: Store, session: Any, mailbox: str, uids: list[int]) -> dict[int, Fields | IntegrityError]:
    return dict(store.search_fields(session, mailbox, uids))


def test_fields_answer_like_the_decrypted_header_and_are_reused(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    for raw in CORPUS:
        store.deliver(raw, colleague, [member], save_sent=False)
    s = store.login(member, PASSWORD)
    uids = list(range(1, len(CORPUS) + 1))
    counter = _CountingOpens(store)
    assert set(copy_column(store, member, "INBOX", "sealed_search").values()) == {None}
    first = _fields(store, s, "INBOX", uids)
    assert counter.opened == len(CORPUS)  # built from the messages once
    stored = copy_column(store, member, "INBOX", "sealed_search")
    assert all(stored[u] is not None for u in uids)
    second = _fields(store, s, "INBOX", uids)
    assert counter.opened == len(CORPUS)  # the second pass decrypts no message
    assert copy_column(store, member, "INBOX", "sealed_search") == stored  # and rewrites nothing
    for got in (first, second):
        assert sorted(got) == uids
        for _, key in SEARCHES:
            if key[0] in ("NOT", "SENTSINCE", "SENTBEFORE", "SENTON") or (key[0] == "HEADER" and key[1] in
                                                                         ("Date", "X-Nothing")):
                continue
            name, needle = (key[0], key[1]) if key[0] != "HEADER" else (key[1], key[2])
            for uid in uids:
                fields = got[uid]
                assert isinstance(fields, Fields)
                assert fields.has(name, needle) == matches(CORPUS[uid - 1], key), (key, uid)
        for uid in uids:
            fields = got[uid]
            assert isinstance(fields, Fields)
            for day in ("2026-03-03", "2026-03-04", "2026-03-07"):
                want = matches(CORPUS[uid - 1], ("SENTON", day))
                assert (fields.sent == date.fromisoformat(day)) == want, (uid, day)


def test_only_asked_uids_are_indexed_and_gone_ones_left_out(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    for raw in CORPUS[:4]:
        store.deliver(raw, colleague, [member], save_sent=False)
    s = store.login(member, PASSWORD)
    got = _fields(store, s, "INBOX", [2, 3, 99])
    assert sorted(got) == [2, 3]
    stored = copy_column(store, member, "INBOX", "sealed_search")
    assert stored[1] is None and stored[4] is None and stored[2] and stored[3]


def test_a_swapped_or_damaged_entry_is_not_trusted(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    store.deliver(CORPUS[0], colleague, [member], save_sent=False)  # "Referral for X-ray"
    store.deliver(CORPUS[7], colleague, [member], save_sent=False)  # "Quarterly PANORAMIC review"
    s = store.login(member, PASSWORD)
    _fields(store, s, "INBOX", [1, 2])
    stored = copy_column(store, member, "INBOX", "sealed_search")
    # Message 1's entry put in message 2's row: it names another message.
    set_copy_column(store, member, "INBOX", "sealed_search", stored[1], uid=2)
    counter = _CountingOpens(store)
    got = _fields(store, s, "INBOX", [1, 2])
    assert isinstance(got[2], Fields) and got[2].has("subject", "panoramic") and not got[2].has("subject", "x-ray")
    assert counter.opened == 1  # message 2 read from its content
    rebuilt = copy_column(store, member, "INBOX", "sealed_search")[2]
    assert rebuilt not in (stored[1], None)
    # One flipped octet: refused the same way, and replaced.
    assert rebuilt is not None
    set_copy_column(store, member, "INBOX", "sealed_search", stored[1][:-1] + bytes([stored[1][-1] ^ 1]), uid=1)
    got = _fields(store, s, "INBOX", [1])
    assert isinstance(got[1], Fields) and got[1].has("subject", "x-ray")
    assert counter.opened == 2
    # A damaged entry of a message whose content does not open either: the
    # message's IntegrityError, not the entry's word.
    set_copy_column(store, member, "INBOX", "sealed_search", b"\x01" + bytes(40), uid=2)
    set_copy_column(store, member, "INBOX", "wrapped_key", bytes(92), uid=2)
    assert isinstance(_fields(store, s, "INBOX", [2])[2], IntegrityError)


def test_another_accounts_entry_does_not_open(store: Store, people: dict[str, str]) -> None:
    member, member2, colleague = people["member"], people["member2"], people["colleague"]
    store.deliver(CORPUS[0], colleague, [member, member2], save_sent=False)  # one message, two copies
    store.deliver(CORPUS[7], colleague, [member2], save_sent=False)
    one, two = store.login(member, PASSWORD), store.login(member2, PASSWORD)
    _fields(store, one, "INBOX", [1])
    _fields(store, two, "INBOX", [1, 2])
    mine = copy_column(store, member, "INBOX", "sealed_search")[1]
    theirs = copy_column(store, member2, "INBOX", "sealed_search")
    assert mine is not None and mine != theirs[1]
    # The other account's key does not open it, even for the same message...
    key2 = crypto.search_index_key(two.private_key)
    pid = store.snapshot(two, "INBOX", [1]).messages[0].message_id.encode()
    assert crypto.open_search_entries(key2, two.key_owner, [(pid, mine)]) == [None]
    # ...and copied into the other account's row, it is replaced, not used.
    set_copy_column(store, member2, "INBOX", "sealed_search", mine, uid=1)
    counter = _CountingOpens(store)
    got = _fields(store, two, "INBOX", [1, 2])
    assert counter.opened == 1
    assert isinstance(got[1], Fields) and got[1].has("subject", "x-ray")
    assert copy_column(store, member2, "INBOX", "sealed_search")[1] not in (mine, None)


def test_entries_go_with_move_and_copy_and_away_with_expunge(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    for raw in CORPUS[:3]:
        store.deliver(raw, colleague, [member], save_sent=False)
    s = store.login(member, PASSWORD)
    _fields(store, s, "INBOX", [1, 2, 3])
    before = copy_column(store, member, "INBOX", "sealed_search")
    moved = store.move(s, "INBOX", [1], "Trash")
    copied = store.copy(s, "INBOX", [2], "Drafts")
    assert sorted(copy_column(store, member, "INBOX", "sealed_search")) == [2, 3]
    assert copy_column(store, member, "Trash", "sealed_search") == {moved.uids[0][1]: before[1]}
    assert copy_column(store, member, "Drafts", "sealed_search") == {copied.uids[0][1]: before[2]}
    counter = _CountingOpens(store)
    got = _fields(store, s, "Trash", [moved.uids[0][1]])
    assert counter.opened == 0  # the carried entry opens in its new folder
    assert isinstance(got[moved.uids[0][1]], Fields) and got[moved.uids[0][1]].has("subject", "x-ray")
    store.set_flags(s, "INBOX", [3], {"\\Deleted"}, "add")
    assert store.expunge(s, "INBOX") == [3]
    assert sorted(copy_column(store, member, "INBOX", "sealed_search")) == [2]


def test_metadata_tests_match_the_rows(store: Store, people: dict[str, str]) -> None:
    member = people["member"]
    s = store.login(member, PASSWORD)
    base = datetime(2026, 3, 5, tzinfo=timezone.utc)
    stamps = [base - timedelta(days=1, seconds=1), base - timedelta(seconds=1), base, base + timedelta(hours=23, minutes=59),
              base + timedelta(days=1), base + timedelta(days=40)]
    for i, when in enumerate(stamps):
        store.append(s, "Drafts", CORPUS[i % len(CORPUS)] + b"x" * (100 * i), internal_date=when)
    tests: list[tuple[str, Any]] = [("SINCE", date(2026, 3, 5)), ("BEFORE", date(2026, 3, 5)),
                                    ("ON", date(2026, 3, 5)), ("ON", datetime(2026, 3, 6)),
                                    ("LARGER", 400), ("SMALLER", 400)]
    uids, columns = store.search_metadata(s, "Drafts", tests)
    metas = store.snapshot(s, "Drafts").messages
    assert list(uids) == [m.uid for m in metas]
    for (name, value), column in zip(tests, columns):
        ref = value.date() if isinstance(value, datetime) else value
        for m, got in zip(metas, column):
            day = m.internal_date.astimezone(timezone.utc).date() if m.internal_date.tzinfo else m.internal_date.date()
            want = {"SINCE": day >= ref, "BEFORE": day < ref, "ON": day == ref}.get(name) if name not in (
                "LARGER", "SMALLER") else (m.size > value if name == "LARGER" else m.size < value)
            assert got == int(want), (name, value, m.uid)
    assert sum(columns[2]) == 2 and sum(columns[3]) == 1  # the comparison is not vacuous


def test_append_writes_its_entry(store: Store, people: dict[str, str]) -> None:
    s = store.login(people["member"], PASSWORD)
    uid = store.append(s, "Drafts", CORPUS[1]).uid  # encoded-word From and Subject
    assert copy_column(store, people["member"], "Drafts", "sealed_search")[uid]
    counter = _CountingOpens(store)
    got = _fields(store, s, "Drafts", [uid])[uid]
    assert counter.opened == 0
    assert isinstance(got, Fields) and got.has("from", "jürgen") and got.has("subject", "RÖNTGEN BEFUND FÜR")


def test_two_sessions_filling_one_folder_decrypt_each_message_once(store: Store, people: dict[str, str]) -> None:
    import threading

    member, colleague = people["member"], people["colleague"]
    for raw in CORPUS * 3:
        store.deliver(raw, colleague, [member], save_sent=False)
    sessions_ = [store.login(member, PASSWORD) for _ in range(2)]
    uids = list(range(1, 3 * len(CORPUS) + 1))
    counter = _CountingOpens(store)
    start = threading.Barrier(2)
    results: list[dict[int, Any]] = []

    def search(s: Any) -> None:
        start.wait()
        results.append(_fields(store, s, "INBOX", uids))

    threads = [threading.Thread(target=search, args=(s,)) for s in sessions_]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and all(sorted(r) == uids for r in results)
    assert counter.opened == len(uids)  # the second waited and used the first's entries


def test_a_background_fill_walks_up_the_uids_once(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    for raw in CORPUS[:5]:
        store.deliver(raw, colleague, [member], save_sent=False)
    acct_id = store.accounts([member])[member].id
    with sessions(store.engine)() as db:
        box_id = db.scalar(select(Mailbox.id).where(Mailbox.account_id == acct_id, Mailbox.name == "INBOX"))
    # Message 2's content key damaged: it does not open.
    set_copy_column(store, member, "INBOX", "wrapped_key", bytes(92), uid=2)
    s = store.login(member, PASSWORD)
    assert store.fill_search_index(replace(s, read_only=True), "INBOX") == (box_id, 0, 0, None)
    assert set(copy_column(store, member, "INBOX", "sealed_search").values()) == {None}  # emergency access writes none
    assert store.fill_search_index(s, "INBOX", 0, 3) == (box_id, 3, 2, 3)
    assert [u for u, e in sorted(copy_column(store, member, "INBOX", "sealed_search").items()) if e] == [1, 3]
    assert store.fill_search_index(s, "INBOX", 3, 3) == (box_id, 2, 2, 5)
    assert store.fill_search_index(s, "INBOX", 5, 3) == (box_id, 0, 0, None)  # done: 2 is not tried again
    heads = copy_column(store, member, "INBOX", "sealed_header")
    assert [u for u, h in sorted(heads.items()) if h] == [1, 3, 4, 5]  # the header cache too
    # A new fill (the next login) looks at the one left once more.
    assert store.fill_search_index(s, "INBOX", 0, 3) == (box_id, 1, 0, 2)
    assert _fields(store, s, "INBOX", [1, 3, 4, 5]).keys() == {1, 3, 4, 5}


def test_aggregated_metadata_is_put_in_uid_order() -> None:
    from postvault.store.searchindex import _aligned

    uids, columns = _aligned("3,1,2", ["010", "110"])  # any order the database aggregated in
    assert list(uids) == [1, 2, 3] and columns == [b"\x01\x00\x00", b"\x01\x00\x01"]
    uids, columns = _aligned(None, [None])  # an empty folder
    assert list(uids) == [] and columns == [b""]
