"""imapd/indexfill.py over a real store (SQLite file, or PostgreSQL with
--db postgresql), without the IMAP server: one job per account, the job's
end with the account's last session, and shutdown."""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from postvault.imapd.indexfill import IndexFiller
from postvault.store.api import Store
from postvault.store.db import sessions
from postvault.store.models import Mailbox, MessageCopy

from tests.conftest import PASSWORD
from tests.searchcorpus import CORPUS


def _filled(store: Store, who: str) -> int:
    acct_id = store.accounts([who])[who].id
    with sessions(store.engine)() as s:
        return int(s.scalar(select(func.count(MessageCopy.sealed_search))
                            .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
                            .where(Mailbox.account_id == acct_id)) or 0)


def _wait_for(done: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.05)
    return done()


class _CountingJobs:
    """Counts the jobs the filler starts (each lists the account's folders
    once) while passing every call through."""

    def __init__(self, store: Store) -> None:
        self.jobs = 0
        real = store.list_mailboxes

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.jobs += 1
            return real(*args, **kwargs)

        store.list_mailboxes = counting  # type: ignore[method-assign]


def _deliver(store: Store, people: dict[str, str], n: int) -> None:
    for i in range(n):
        store.deliver(CORPUS[i % len(CORPUS)], people["colleague"], [people["member"]], save_sent=False)


def test_one_job_per_account_and_it_ends_with_the_last_session(store: Store, people: dict[str, str]) -> None:
    member = people["member"]
    _deliver(store, people, 30)
    counter = _CountingJobs(store)
    filler = IndexFiller(store, enabled=True, round_messages=1)
    try:
        one, two = store.login(member, PASSWORD), store.login(member, PASSWORD)
        filler.logged_in(one)
        assert _wait_for(lambda: _filled(store, member) >= 2)
        filler.logged_in(two)  # while the first job runs: no second job
        filler.logged_out(one)  # the other session keeps it going
        assert _wait_for(lambda: _filled(store, member) == 30)
        assert _wait_for(lambda: not filler._jobs)
        assert counter.jobs == 1
        filler.logged_out(two)
        assert filler._live == {}  # no session, so no key, is kept
        # A login after the fill ended starts a new one (mail may have come).
        filler.logged_in(one)
        assert _wait_for(lambda: counter.jobs == 2 and not filler._jobs)
        filler.logged_out(one)
    finally:
        filler.stop(5)


def test_logout_and_shutdown_stop_the_job(store: Store, people: dict[str, str]) -> None:
    member = people["member"]
    _deliver(store, people, 40)
    filler = IndexFiller(store, enabled=True, round_messages=1)
    try:
        session = store.login(member, PASSWORD)
        filler.logged_in(session)
        assert _wait_for(lambda: _filled(store, member) >= 2)
        filler.logged_out(session)
        assert _wait_for(lambda: not filler._jobs, 5)  # ended with the session
        stopped = _filled(store, member)
        assert stopped < 40
        filler.logged_in(session)
        assert _wait_for(lambda: _filled(store, member) > stopped)
    finally:
        filler.stop(5)
    assert filler._thread is not None and not filler._thread.is_alive()
    halted = _filled(store, member)
    assert halted < 40
    time.sleep(0.5)
    assert _filled(store, member) == halted
    filler.logged_in(session)  # after shutdown: nothing starts
    assert filler._live == {} and not filler._jobs


def test_switched_off_or_read_only_starts_nothing(store: Store, people: dict[str, str]) -> None:
    member = people["member"]
    _deliver(store, people, 3)
    session = store.login(member, PASSWORD)
    for filler, s in ((IndexFiller(store, enabled=False, round_messages=1), session),
                      (IndexFiller(store, enabled=True, round_messages=1), replace(session, read_only=True))):
        filler.logged_in(s)
        assert filler._thread is None and filler._live == {}
        filler.stop(5)
    assert _filled(store, member) == 0
