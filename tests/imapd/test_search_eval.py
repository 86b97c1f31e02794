"""``search.run_search`` (bitmaps over the view, metadata from one store
query, content from the index) against a message-by-message reference of
RFC 3501 §6.4.4, over a real store, for many random search keys."""

from __future__ import annotations

import random
from array import array
from datetime import datetime, timedelta, timezone
from typing import Any

from postvault.imapd.parse import Key, SeqSet
from postvault.imapd.search import View, run_search
from postvault.store.api import Store
from postvault.store.types import UID_TYPECODE

from tests.conftest import PASSWORD
from tests.searchcorpus import CORPUS, matches

FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft", "kw1"]
_FLAG_KEYS = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "DRAFT": "\\Draft", "FLAGGED": "\\Flagged",
              "SEEN": "\\Seen"}
BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _leaf(rng: random.Random, n: int, top_uid: int) -> Key:
    kind = rng.choice(["ALL", "SEQ", "UID", "FLAG", "UNFLAG", "KEYWORD", "UNKEYWORD", "RECENT", "NEW", "OLD",
                       "LARGER", "SMALLER", "BEFORE", "ON", "SINCE", "SUBJECT"])
    if kind in ("SEQ", "UID"):
        top = n if kind == "SEQ" else top_uid
        ranges = []
        for _ in range(rng.randint(1, 3)):
            a = rng.choice([None, rng.randint(1, top + 3)])
            b = rng.choice([a, None, rng.randint(1, top + 3)])
            ranges.append((a, b))
        return Key(kind, (SeqSet(tuple(ranges)),))
    if kind == "FLAG":
        return Key(rng.choice(list(_FLAG_KEYS)))
    if kind == "UNFLAG":
        return Key("UN" + rng.choice(list(_FLAG_KEYS)))
    if kind in ("KEYWORD", "UNKEYWORD"):
        return Key(kind, (rng.choice(["kw1", "kw2"]),))
    if kind in ("LARGER", "SMALLER"):
        return Key(kind, (rng.randint(50, 900),))
    if kind in ("BEFORE", "ON", "SINCE"):
        day = BASE + timedelta(days=rng.randint(-1, 8))
        return Key(kind, (datetime(day.year, day.month, day.day),))
    if kind == "SUBJECT":
        return Key(kind, (rng.choice(["x-ray", "PANORAMIC", "", "strasse", "zzz"]),))
    return Key(kind)


def _key(rng: random.Random, n: int, top_uid: int, depth: int = 0) -> Key:
    if depth >= 3 or rng.random() < 0.4:
        return _leaf(rng, n, top_uid)
    op = rng.choice(["AND", "OR", "NOT"])
    if op == "NOT":
        return Key("NOT", sub=[_key(rng, n, top_uid, depth + 1)])
    if op == "OR":
        return Key("OR", sub=[_key(rng, n, top_uid, depth + 1), _key(rng, n, top_uid, depth + 1)])
    return Key("AND", sub=[_key(rng, n, top_uid, depth + 1) for _ in range(rng.randint(1, 3))])


class _Gone(Exception):
    """The message's content was needed, but it is no longer in the store."""


def _reference(key: Key, seq: int, uid: int, flags: frozenset[str], recent: bool, meta: Any, raw: bytes | None,
               n: int, top_uid: int) -> bool:
    """RFC 3501 §6.4.4, one message at a time, written for clarity; keys
    that need no content are tried first (as SEARCH has always done), so a
    message gone from the store is decided without its content if it can be."""
    name = key.name

    def again(k: Key) -> bool:
        return _reference(k, seq, uid, flags, recent, meta, raw, n, top_uid)

    def content_last(keys: list[Key]) -> list[Key]:
        return sorted(keys, key=lambda k: _uses(k, {"SUBJECT"}))

    if name == "AND":
        return all(again(k) for k in content_last(key.sub))
    if name == "OR":
        a, b = content_last(key.sub)
        return again(a) or again(b)
    if name == "NOT":
        return not again(key.sub[0])
    if name == "ALL":
        return True
    if name == "SEQ":
        return key.args[0].contains(seq, n)  # type: ignore[attr-defined]
    if name == "UID":
        return key.args[0].contains(uid, top_uid)  # type: ignore[attr-defined]
    if name in _FLAG_KEYS:
        return _FLAG_KEYS[name] in flags
    if name.startswith("UN") and name[2:] in _FLAG_KEYS:
        return _FLAG_KEYS[name[2:]] not in flags
    if name == "KEYWORD":
        return key.args[0] in flags
    if name == "UNKEYWORD":
        return key.args[0] not in flags
    if name == "RECENT":
        return recent
    if name == "NEW":
        return recent and "\\Seen" not in flags
    if name == "OLD":
        return not recent
    if name == "LARGER":
        return bool(meta.size > key.args[0])
    if name == "SMALLER":
        return bool(meta.size < key.args[0])
    if name in ("BEFORE", "ON", "SINCE"):
        day = meta.internal_date.astimezone(timezone.utc).date() if meta.internal_date.tzinfo else \
            meta.internal_date.date()
        ref = key.args[0].date()  # type: ignore[attr-defined]
        return {"BEFORE": day < ref, "ON": day == ref, "SINCE": day >= ref}[name]
    if name == "SUBJECT":
        if raw is None:
            raise _Gone
        return matches(raw, ("SUBJECT", str(key.args[0])))
    raise AssertionError(name)


def _uses(key: Key, names: set[str]) -> bool:
    return key.name in names or any(_uses(k, names) for k in key.sub)


def test_random_keys_match_the_reference(store: Store, people: dict[str, str]) -> None:
    rng = random.Random(20261127)
    s = store.login(people["member"], PASSWORD)
    raws = {}
    for i in range(40):
        raw = CORPUS[i % len(CORPUS)] + b"y" * rng.randint(0, 800)
        when = BASE + timedelta(days=rng.randint(0, 6), hours=rng.randint(0, 23), minutes=rng.randint(0, 59))
        flags = [f for f in FLAGS if rng.random() < 0.35]
        uid = store.append(s, "Drafts", raw, flags, internal_date=when).uid
        raws[uid] = raw
    metas = {m.uid: m for m in store.snapshot(s, "Drafts").messages}
    state = store.mailbox_state(s, "Drafts")
    loaded = store.message_flags(s, "Drafts")
    uids = array(UID_TYPECODE, state.uids)
    # Ghosts (expunged, the session told) and messages expunged by someone
    # else that the view has not heard of yet.
    ghosts = frozenset(rng.sample(list(uids), 4))
    unheard = set(rng.sample([u for u in uids if u not in ghosts], 3))
    store.set_flags(s, "Drafts", sorted(ghosts | unheard), {"\\Deleted"}, "add")
    store.expunge(s, "Drafts", sorted(ghosts | unheard))
    view = View(uids, array("I", loaded.index), list(loaded.sets), frozenset(rng.sample(list(uids), 12)), ghosts)
    n, top = len(uids), uids[-1]
    checked = nonempty = 0
    for _ in range(400):
        key = Key("AND", sub=[_key(rng, n, top) for _ in range(rng.randint(1, 2))])
        got = run_search(store, s, "Drafts", key, view)
        metadata = _uses(key, {"LARGER", "SMALLER", "BEFORE", "ON", "SINCE"})
        want = []
        for pos, uid in enumerate(uids):
            if uid in ghosts:
                continue
            if uid in unheard and metadata:
                continue  # gone from the store: no size or date to compare
            flags = loaded.sets[loaded.index[pos]]
            try:
                if _reference(key, pos + 1, uid, flags, uid in view.recent, metas[uid],
                              None if uid in unheard else raws[uid], n, top):
                    want.append(pos)
            except _Gone:
                continue
        assert got == want, repr((key, got, want))
        checked += 1
        nonempty += bool(want)
    assert checked == 400 and nonempty > 100  # the keys are not all empty or trivial
