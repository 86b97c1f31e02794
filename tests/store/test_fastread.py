"""The SMTP path's hot reads on the sqlite3 connection (store/fastread.py)
give exactly what the same Core statements give through SQLAlchemy."""

from __future__ import annotations

from postvault.store.accounts import _ACCOUNT_INFO
from postvault.store.api import Store
from postvault.store.contacts import _ACCOUNT_ROLE, _INVITED_BY, _MEMBER_BOOK
from postvault.store.delivery import _OWNERS
from postvault.store.fastread import FastSelect, snapshot
from postvault.store.offices import _ALLOWANCES


def _core(store: Store, q: FastSelect, params: dict[str, object]) -> list[tuple[object, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(q.stmt, params)]


def test_every_hot_read_matches_its_core_statement(store: Store, people: dict[str, str]) -> None:
    member, member2, colleague = people["member"], people["member2"], people["colleague"]
    store.set_office_allowances(member, ["stl"], actor=member)
    ids = {e: store.accounts([e])[e].id for e in (member, member2, colleague)}
    cases: list[tuple[FastSelect, dict[str, object]]] = [
        (_ACCOUNT_ROLE, {"email": member}),
        (_ACCOUNT_ROLE, {"email": "nobody@x.test"}),
        (_MEMBER_BOOK, {"account": ids[member]}),
        (_INVITED_BY, {"account": ids[colleague]}),
        (_ACCOUNT_INFO, {"emails": [member]}),
        (_ACCOUNT_INFO, {"emails": sorted([member, member2, colleague, "nobody@x.test"])}),
        (_ACCOUNT_INFO, {"emails": []}),
        (_OWNERS, {"emails": sorted([member, colleague])}),
        (_ALLOWANCES, {"emails": sorted([member, member2, colleague])}),
    ]
    nonempty = 0
    for q, params in cases:
        expected = _core(store, q, params)
        got = [tuple(r) for r in q.run(store.engine, params)]
        assert sorted(got, key=repr) == sorted(expected, key=repr), q.stmt
        nonempty += bool(got)
    assert nonempty >= 6  # the comparison is not between empty results
    # Rows are named like Core's.
    row = _ACCOUNT_INFO.run(store.engine, {"emails": [member]})[0]
    assert row.email == member and row.role == "member"
    assert ("stl",) in [(r.extension,) for r in _ALLOWANCES.run(store.engine, {"emails": [member]})]


def test_a_snapshot_leaves_no_transaction_open(store: Store, people: dict[str, str]) -> None:
    with snapshot(store.engine) as conn:
        _ACCOUNT_ROLE.rows(conn, {"email": people["member"]})
    # A writer right after is not blocked by a read left open.
    store.set_office_allowances(people["member"], ["stl"], actor=people["member"])
    assert store.office_allowances([people["member"]]) == {people["member"]: frozenset({"stl"})}


def test_a_database_error_comes_out_as_sqlalchemy_raises_it(store: Store) -> None:
    import pytest
    from sqlalchemy import column, select, table
    from sqlalchemy.exc import DBAPIError

    broken = FastSelect(select(column("x")).select_from(table("no_such_table")))
    with pytest.raises(DBAPIError) as core:
        _core(store, broken, {})
    with pytest.raises(DBAPIError) as fast:
        broken.run(store.engine, {})
    assert type(fast.value) is type(core.value)
    assert type(fast.value.orig) is type(core.value.orig)


def test_the_notification_claim_read_converts_as_core_does(store: Store, people: dict[str, str]) -> None:
    """DATETIME and BOOLEAN columns come back as Core returns them."""
    from datetime import UTC, datetime

    from postvault.store.accounts import _CLAIM_READ

    member, member2, colleague = people["member"], people["member2"], people["colleague"]
    at = datetime(2024, 1, 2, 9, 30, 15, 123456, tzinfo=UTC)
    store.claim_notification(member, at, lambda _state, _at: "send")
    store.claim_notification(member2, at, lambda _state, _at: "hold")
    store.set_notification_settings(colleague, mode="off")
    seen = []
    for email in (member, member2, colleague, "nobody@x.test"):
        expected = _core(store, _CLAIM_READ, {"email": email})
        with store.engine.connect() as conn, conn.begin():
            got = [tuple(r) for r in _CLAIM_READ.rows(conn, {"email": email})]
        assert got == expected
        assert [tuple(type(v) for v in r) for r in got] == [tuple(type(v) for v in r) for r in expected]
        seen.extend(got)
    values = [v for r in seen for v in r]
    assert any(isinstance(v, datetime) for v in values) and any(isinstance(v, bool) for v in values)


def test_every_fast_write_stores_what_its_core_statement_stores(store: Store, people: dict[str, str]) -> None:
    """The writer's per-message statements on the sqlite3 connection
    (FastWrite) store the same bytes, of the same SQLite types, as the Core
    statement with the same parameters; an INSERT returns the new row's id."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from postvault.store import delivery
    from postvault.store.accounts import _PREFS_NEW_W, _PREFS_SET_W
    from postvault.store.fastread import FastWrite

    if store.engine.dialect.name != "sqlite":
        return  # elsewhere FastWrite is the Core statement itself
    at = datetime(2024, 1, 2, 9, 30, 15, 123456, tzinfo=UTC)
    ids = {e: store.accounts([e])[e].id for e in people.values()}

    def stored(conn, table: str, row_id: int, key: str = "id",  # type: ignore[no-untyped-def]
               skip: tuple[str, ...] = ()) -> list[tuple[object, ...]]:
        cols = [r[1] for r in conn.exec_driver_sql(f"PRAGMA table_info({table})") if r[1] not in (key, *skip)]
        sql = f"SELECT {', '.join(f'{c}, typeof({c})' for c in cols)} FROM {table} WHERE {key} = ?"
        return [tuple(r) for r in conn.exec_driver_sql(sql, (row_id,))]

    def both(w: FastWrite, table: str, core_params: dict[str, object], fast_params: dict[str, object],
             key: str = "id", core_id: int | None = None, fast_id: int | None = None,
             skip: tuple[str, ...] = ()) -> None:
        with store.engine.connect() as conn, conn.begin():
            result = conn.execute(w.stmt, core_params)
            core_row = core_id if core_id is not None else int(result.inserted_primary_key[0])
            fast_row = w.run(conn, fast_params)
            fast_row = fast_id if fast_id is not None else fast_row
            assert fast_row is not None and fast_row != core_row
            assert stored(conn, table, fast_row, key, skip) == stored(conn, table, core_row, key, skip) != []

    both(delivery._NEW_THREAD_W, "threads", {"created_at": at}, {"created_at": at})
    with store.engine.connect() as conn, conn.begin():
        thread = delivery._NEW_THREAD_W.run(conn, {"created_at": at})
    message = {"blob_id": "b" * 64, "size": 12345, "mid_hash": b"\x00\xff" * 16, "thread_id": thread,
               "created_at": at, "origin": "submission", "sealed_summary": b"sealed\x00summary"}
    both(delivery._NEW_MESSAGE_W, "messages", {**message, "public_id": "p1"}, {**message, "public_id": "p2"},
         skip=("public_id",))
    with store.engine.connect() as conn, conn.begin():
        msg_id = int(conn.scalar(text("SELECT max(id) FROM messages")))
        box = int(conn.scalar(text("SELECT id FROM mailboxes WHERE account_id = :a AND name = 'INBOX'"),
                              {"a": ids[people["colleague"]]}))
        copy = {"mailbox_id": box, "message_id": msg_id, "flags": "\\Seen", "internal_date": at, "size": 12345,
                "modseq": 7, "wrapped_key": b"k" * 80}
        conn.execute(delivery._ADD_COPIES, [{**copy, "uid": 901}])
        delivery._ADD_COPIES_W.run_many(conn, [{**copy, "uid": 902}, {**copy, "uid": 903}])
        rows = {uid: stored(conn, "message_copies", uid, "uid", ("id",)) for uid in (901, 902, 903)}
        assert rows[902] == rows[903] != []
        assert [v for v in rows[902][0]] == [v for v in rows[901][0]]
        # The UID allocation: the same rows returned and the same counters left.
        other = int(conn.scalar(text("SELECT id FROM mailboxes WHERE account_id = :a AND name = 'INBOX'"),
                                {"a": ids[people["member"]]}))
        before = {b: tuple(conn.execute(text("SELECT uidnext, highestmodseq FROM mailboxes WHERE id = :b"),
                                        {"b": b}).one()) for b in (box, other)}
        core = [tuple(r) for r in conn.execute(delivery._NEXT_UIDS,
                                               {"owner": ids[people["colleague"]], "box": "INBOX", "n": 3})]
        fast = delivery._NEXT_UIDS_W.returning(conn, {"owner": ids[people["member"]], "box": "INBOX", "n": 3})
        assert [(box, before[box][0] + 3, before[box][1] + 3)] == core
        assert [(other, before[other][0] + 3, before[other][1] + 3)] == [tuple(r) for r in fast]
        assert delivery._NEXT_UIDS_W.returning(conn, {"owner": ids[people["member"]], "box": "Nope", "n": 1}) == []
        part = {"thread_id": thread, "email": people["member"]}
        delivery._ADD_PARTICIPANTS_SQLITE.run_many(conn, [part, part])  # the duplicate is skipped
        assert conn.scalar(text("SELECT count(*) FROM thread_participants WHERE thread_id = :t"), {"t": thread}) == 1
    prefs = {"mode": "batched", "interval_minutes": 15, "last_sent_at": at, "held_since": None}
    both(_PREFS_NEW_W, "notification_prefs", {**prefs, "account_id": ids[people["member"]]},
         {**prefs, "account_id": ids[people["member2"]]}, key="account_id",
         core_id=ids[people["member"]], fast_id=ids[people["member2"]])
    with store.engine.connect() as conn, conn.begin():
        conn.execute(_PREFS_SET_W.stmt, {"account": ids[people["member"]], "sent": None, "held": at})
        _PREFS_SET_W.run(conn, {"account": ids[people["member2"]], "sent": None, "held": at})
        assert (stored(conn, "notification_prefs", ids[people["member"]], "account_id")
                == stored(conn, "notification_prefs", ids[people["member2"]], "account_id"))


def test_a_fast_write_error_comes_out_as_sqlalchemy_raises_it(store: Store) -> None:
    import pytest
    from sqlalchemy.exc import IntegrityError

    from postvault.store import delivery

    message = {"public_id": "same", "blob_id": "b", "size": 1, "mid_hash": None, "thread_id": None,
               "created_at": __import__("datetime").datetime.now(__import__("datetime").UTC), "origin": "submission",
               "sealed_summary": None}
    with store.engine.connect() as conn, conn.begin():
        delivery._NEW_MESSAGE_W.run(conn, message)
        with pytest.raises(IntegrityError) as core:
            conn.execute(delivery._NEW_MESSAGE, message)
        with pytest.raises(IntegrityError) as fast:
            delivery._NEW_MESSAGE_W.run(conn, message)
        assert type(fast.value.orig) is type(core.value.orig)
