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
