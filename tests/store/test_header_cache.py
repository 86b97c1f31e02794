"""The sealed header cache (store/headercache.py) behind FETCH of header
sections (imapd/server.py ``_batch_data``), over a real store (SQLite file,
or PostgreSQL with --db postgresql): the first header FETCH writes each
copy's entry, later ones answer from it with no content key or blob opened,
a damaged, swapped or foreign entry is replaced rather than used, read-only
sessions write nothing, and APPEND, COPY, MOVE, EXPUNGE and the search
index fill keep entries where they belong."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postvault.errors import IntegrityError
from postvault.imapd.parse import FetchItem, Section
from postvault.imapd.server import _batch_data, _filter_headers, _needs_structure
from postvault.mime.summary import header_size
from postvault.store import crypto
from postvault.store.api import Store
from postvault.store.headercache import HEADER_CACHE_MAX, header_block

from tests.conftest import PASSWORD
from tests.searchcorpus import CORPUS
from tests.support import copy_column, set_copy_column

pytestmark = pytest.mark.databases

FIELDS = ("From", "Subject", "Date", "X-Nothing")
HEADER_ITEMS = [
    FetchItem("UID"),
    FetchItem("RFC822.SIZE"),
    FetchItem("BODY", Section((), "HEADER.FIELDS", FIELDS), peek=True),
    FetchItem("BODY", Section((), "HEADER"), peek=True, partial=(3, 40)),
    FetchItem("BODY", Section((), "HEADER.FIELDS.NOT", ("Subject",)), peek=True),
    FetchItem("RFC822.HEADER"),
    FetchItem("BODY", Section((), "HEADER.FIELDS", ("subject", "TO")), peek=True, partial=(4, 30)),
]
WHOLE = [FetchItem("BODY", Section(), peek=True)]


def _expected(raw: bytes) -> list[bytes]:
    """What the items of HEADER_ITEMS give for ``raw``, from its plaintext."""
    head = raw[:header_size(raw)]
    return [_filter_headers(head, FIELDS, False), head[3:43], _filter_headers(head, ("Subject",), True), head,
            _filter_headers(head, ("subject", "to"), False)[4:34]]


def _fetch(store: Store, session: Any, box: str, uids: list[int], items: list[FetchItem] = HEADER_ITEMS) \
        -> dict[int, list[bytes] | IntegrityError]:
    """The content FETCH's first worker call gives for these messages (no
    content-key cache: each call is as a new connection's)."""
    data = _batch_data(store, session, box, uids, True, any(_needs_structure(i) for i in items), (), None, items)
    assert data.parts is not None and set(data.tried) >= set(data.metas)
    return data.parts


def _break_keys(store: Store, account: str, box: str, uids: list[int]) -> None:
    """Damage the copies' wrapped content keys: nothing that opens the
    message (its summary, its blob) works for them any more."""
    for uid in uids:
        set_copy_column(store, account, box, "wrapped_key", bytes(92), uid=uid)


def test_first_header_fetch_writes_entries_and_later_ones_use_them(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    for raw in CORPUS:
        store.deliver(raw, colleague, [member], save_sent=False)
    s = store.login(member, PASSWORD)
    uids = list(range(1, len(CORPUS) + 1))
    assert set(copy_column(store, member, "INBOX", "sealed_header").values()) == {None}
    first = _fetch(store, s, "INBOX", uids)
    assert first == {u: _expected(CORPUS[u - 1]) for u in uids}
    stored = copy_column(store, member, "INBOX", "sealed_header")
    assert all(stored[u] for u in uids)
    # Each entry is the header block, sealed for this account and message.
    key = crypto.header_cache_key(s.private_key)
    pids = {m.uid: m.message_id.encode() for m in store.snapshot(s, "INBOX").messages}
    for u in uids:
        opened = crypto.open_header_entries(key, s.key_owner, [(pids[u], stored[u])])  # type: ignore[list-item]
        assert opened == [CORPUS[u - 1][:header_size(CORPUS[u - 1])]]
    # No content key opens now: the whole message fails, the headers still answer.
    _break_keys(store, member, "INBOX", uids)
    assert all(isinstance(v, IntegrityError) for v in _fetch(store, s, "INBOX", uids, WHOLE).values())
    assert _fetch(store, s, "INBOX", uids) == first
    assert copy_column(store, member, "INBOX", "sealed_header") == stored  # and nothing was rewritten


def test_a_damaged_or_swapped_entry_is_not_trusted(store: Store, people: dict[str, str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    member, colleague = people["member"], people["colleague"]
    store.deliver(CORPUS[0], colleague, [member], save_sent=False)  # "Referral for X-ray"
    store.deliver(CORPUS[7], colleague, [member], save_sent=False)  # "Quarterly PANORAMIC review"
    s = store.login(member, PASSWORD)
    _fetch(store, s, "INBOX", [1, 2])
    stored = copy_column(store, member, "INBOX", "sealed_header")
    entry1, entry2 = stored[1], stored[2]
    assert entry1 is not None and entry2 is not None
    # Message 1's entry in message 2's row, and message 1's own with one bit flipped.
    set_copy_column(store, member, "INBOX", "sealed_header", entry1, uid=2)
    set_copy_column(store, member, "INBOX", "sealed_header", entry1[:-1] + bytes([entry1[-1] ^ 1]), uid=1)
    with caplog.at_level(logging.WARNING, logger="postvault.store.headercache"):
        got = _fetch(store, s, "INBOX", [1, 2])
    assert got == {1: _expected(CORPUS[0]), 2: _expected(CORPUS[7])}
    warnings = [r.getMessage() for r in caplog.records if r.name == "postvault.store.headercache"]
    assert warnings and "2 header cache entries" in warnings[0]
    assert not any(word in w.lower() for w in warnings for word in ("x-ray", "panoramic", "referral"))
    again = copy_column(store, member, "INBOX", "sealed_header")
    assert again[1] not in (None, entry1) and again[2] not in (None, entry1, entry2)  # re-sealed
    # A search-index entry (another key and label) in the header column: refused the same way.
    list(store.search_fields(s, "INBOX", [1]))
    search_entry = copy_column(store, member, "INBOX", "sealed_search")[1]
    assert search_entry is not None
    set_copy_column(store, member, "INBOX", "sealed_header", search_entry, uid=1)
    assert _fetch(store, s, "INBOX", [1]) == {1: _expected(CORPUS[0])}
    # A damaged entry of a message that does not open either: refused as
    # before the cache (its summary does not open), never answered.
    set_copy_column(store, member, "INBOX", "sealed_header", b"\x01" + bytes(40), uid=2)
    _break_keys(store, member, "INBOX", [2])
    with pytest.raises(IntegrityError):
        _fetch(store, s, "INBOX", [2])


def test_another_accounts_entry_does_not_open(store: Store, people: dict[str, str]) -> None:
    member, member2, colleague = people["member"], people["member2"], people["colleague"]
    store.deliver(CORPUS[0], colleague, [member, member2], save_sent=False)  # one message, two copies
    one, two = store.login(member, PASSWORD), store.login(member2, PASSWORD)
    _fetch(store, one, "INBOX", [1])
    mine = copy_column(store, member, "INBOX", "sealed_header")[1]
    assert mine is not None
    pid = store.snapshot(two, "INBOX", [1]).messages[0].message_id.encode()
    assert crypto.open_header_entries(crypto.header_cache_key(two.private_key), two.key_owner, [(pid, mine)]) == [None]
    set_copy_column(store, member2, "INBOX", "sealed_header", mine, uid=1)
    assert _fetch(store, two, "INBOX", [1]) == {1: _expected(CORPUS[0])}
    assert copy_column(store, member2, "INBOX", "sealed_header")[1] not in (mine, None)


def test_a_read_only_session_uses_entries_but_writes_none(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    for raw in CORPUS[:3]:
        store.deliver(raw, colleague, [member], save_sent=False)
    s = store.login(member, PASSWORD)
    reader = dataclasses.replace(s, read_only=True)  # as an emergency access session is
    assert _fetch(store, reader, "INBOX", [1, 2, 3]) == {u: _expected(CORPUS[u - 1]) for u in (1, 2, 3)}
    assert set(copy_column(store, member, "INBOX", "sealed_header").values()) == {None}
    _fetch(store, s, "INBOX", [1])  # the account's own session writes
    entry = copy_column(store, member, "INBOX", "sealed_header")[1]
    assert entry is not None
    _break_keys(store, member, "INBOX", [1])
    assert _fetch(store, reader, "INBOX", [1]) == {1: _expected(CORPUS[0])}  # read from the entry
    flipped = entry[:-1] + bytes([entry[-1] ^ 1])
    set_copy_column(store, member, "INBOX", "sealed_header", flipped, uid=1)
    with pytest.raises(IntegrityError):
        _fetch(store, reader, "INBOX", [1])
    assert copy_column(store, member, "INBOX", "sealed_header")[1] == flipped  # not rewritten


def test_append_copy_move_and_expunge(store: Store, people: dict[str, str]) -> None:
    member = people["member"]
    s = store.login(member, PASSWORD)
    for raw in CORPUS[:3]:
        store.append(s, "Drafts", raw)
    stored = copy_column(store, member, "Drafts", "sealed_header")
    assert all(stored.values()) and len(stored) == 3  # APPEND wrote them
    moved = store.move(s, "Drafts", [1], "Trash")
    copied = store.copy(s, "Drafts", [2], "Sent")
    assert sorted(copy_column(store, member, "Drafts", "sealed_header")) == [2, 3]
    assert copy_column(store, member, "Trash", "sealed_header") == {moved.uids[0][1]: stored[1]}
    assert copy_column(store, member, "Sent", "sealed_header") == {copied.uids[0][1]: stored[2]}
    # The carried entries answer in their new folders, without the message.
    _break_keys(store, member, "Trash", [moved.uids[0][1]])
    _break_keys(store, member, "Sent", [copied.uids[0][1]])
    assert _fetch(store, s, "Trash", [moved.uids[0][1]]) == {moved.uids[0][1]: _expected(CORPUS[0])}
    assert _fetch(store, s, "Sent", [copied.uids[0][1]]) == {copied.uids[0][1]: _expected(CORPUS[1])}
    store.set_flags(s, "Drafts", [3], {"\\Deleted"}, "add")
    assert store.expunge(s, "Drafts") == [3]
    assert sorted(copy_column(store, member, "Drafts", "sealed_header")) == [2]


def test_the_search_index_fill_writes_header_entries(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    for raw in CORPUS:
        store.deliver(raw, colleague, [member], save_sent=False)
    s = store.login(member, PASSWORD)
    uids = list(range(1, len(CORPUS) + 1))
    assert len(dict(store.search_fields(s, "INBOX", uids))) == len(uids)
    assert all(copy_column(store, member, "INBOX", "sealed_header").values())
    _break_keys(store, member, "INBOX", uids)
    assert _fetch(store, s, "INBOX", uids) == {u: _expected(CORPUS[u - 1]) for u in uids}


def test_headers_above_the_cap_are_read_from_the_message(store: Store, people: dict[str, str]) -> None:
    member, colleague = people["member"], people["colleague"]
    big = b"Subject: long\r\n" + b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"y" * 60) for i in range(1200)) + \
        b"\r\nbody\r\n"
    assert header_size(big) > HEADER_CACHE_MAX
    store.deliver(big, colleague, [member], save_sent=False)
    store.deliver(CORPUS[0], colleague, [member], save_sent=False)
    s = store.login(member, PASSWORD)
    data = _batch_data(store, s, "INBOX", [1, 2], True, True, (), None, HEADER_ITEMS)
    assert data.parts is not None and 1 not in data.tried  # left to FETCH's usual path
    assert data.parts[2] == _expected(CORPUS[0])
    stored = copy_column(store, member, "INBOX", "sealed_header")
    assert stored[1] is None and stored[2] is not None


@pytest.mark.parametrize(("head", "whole", "block"), [
    (b"A: b\r\n\r\nbody", True, b"A: b\r\n\r\n"),
    (b"A: b\r\n\r\n", False, b"A: b\r\n\r\n"),
    (b"A: b\nC: d\n\nbody", False, b"A: b\nC: d\n\n"),
    (b"\r\nbody", False, b"\r\n"),
    (b"A: b\r\nC: d", True, b"A: b\r\nC: d"),  # all header, no body
    (b"A: b\r\nC: d", False, None),  # cut before its end: not known yet
    (b"", True, b""),
])
def test_header_block_is_the_summarys_header(head: bytes, whole: bool, block: bytes | None) -> None:
    assert header_block(head, whole) == block
    if block is not None and whole:
        assert len(block) == header_size(head)


def _filter_headers_before(head: bytes, names: tuple[str, ...], negate: bool) -> bytes:
    """imapd/server.py's ``_filter_headers`` as it was before it compared
    ASCII field names as bytes: the reference the faster one must match."""
    wanted = {n.lower() for n in names}
    out: list[bytes] = []
    keep = False
    for line in head.split(b"\r\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        field = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        keep = (field in wanted) != negate
        if keep:
            out.append(line)
    return b"".join(x + b"\r\n" for x in out) + b"\r\n"


_NAME_BYTES = [b"From", b"from", b"SUBJECT", b"To", b"X-a", b"K", b"k", b"\xe2\x84\xaa", b"\xff", b" ", b"\t",
               b"\x1f", b"", b":", b"\r", b"\n", b"x y", b"\xc3\xa9"]
_NAMES = ["From", "subject", "TO", "x-A", "\u212a", "\ufffd", "k", "\udcff", "\xe9", "", " to", "x y"]


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(st.tuples(st.lists(st.sampled_from(_NAME_BYTES), max_size=3),
                                st.sampled_from([b": v", b":", b"", b" v:w", b"\tc", b"\r\n", b"\n"])), max_size=8),
       names=st.lists(st.sampled_from(_NAMES), max_size=4), negate=st.booleans())
def test_filter_headers_answers_as_before(lines: list[tuple[list[bytes], bytes]], names: list[str],
                                         negate: bool) -> None:
    head = b"\r\n".join(b"".join(parts) + rest for parts, rest in lines) + b"\r\n\r\nbody"
    assert _filter_headers(head, tuple(names), negate) == _filter_headers_before(head, tuple(names), negate)
    for sample in CORPUS:
        block = sample[:header_size(sample)]
        assert _filter_headers(block, tuple(names), negate) == _filter_headers_before(block, tuple(names), negate)
