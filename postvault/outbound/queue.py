"""The outbound queue: invitations and notifications waiting to be sent,
kept in the database (table ``outbound_queue``) so that they survive a
restart and any process (the CLI, the servers) can add to it.

Life of a row: ``queued`` -> ``sent`` or ``failed``. A worker claims due
rows by pushing ``next_attempt_at`` out by a lease in a conditional update,
so two workers never send the same row at once, and a worker that dies
mid-send leaves the row to be retried when the lease ends. Temporary
failures back off exponentially (first wait doubling up to a maximum); at
``give_up_at`` a row fails for good. Each final outcome is one audit event,
``outbound.sent`` or ``outbound.failed``, naming the account the mail is
about, never the recipient address or the server's reply text (which may
quote the address).

The queue holds no PHI, but an invitation holds its sign-up link, which
unlocks the mail waiting for that colleague until sign-up. So ``body`` is
emptied the moment a row is final, and rows are only as long-lived as
``give_up_at`` allows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal, cast

from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..conf.schema import NotifyConfig
from ..store import audit
from ..store.db import sessions, unit_of_work
from ..store.fastread import FastSelect
from ..store.models import OutboundMail

Kind = Literal["invitation", "notification", "notice"]
Clock = Callable[[], datetime]
LEASE = timedelta(minutes=10)
_Q = cast(Table, OutboundMail.__table__)  # a Table (mypy sees only FromClause)
_ADD = insert(_Q)
# Built once: the worker runs these every pass (see claim_due, record_outcomes).
_ANY_DUE = select(_Q.c.id).where(_Q.c.state == "queued", _Q.c.next_attempt_at <= bindparam("now")).limit(1)
_DUE = (
    select(_Q.c.id, _Q.c.kind, _Q.c.account, _Q.c.mail_from, _Q.c.recipient, _Q.c.body, _Q.c.attempts,
           _Q.c.give_up_at)
    .where(_Q.c.state == "queued", _Q.c.next_attempt_at <= bindparam("now"))
    .order_by(_Q.c.next_attempt_at, _Q.c.id)
    .limit(bindparam("limit"))
    # PostgreSQL: rows another process is claiming right now are passed
    # over rather than waited for (SQLite renders nothing: one writer).
    .with_for_update(skip_locked=True)
)
_LEASE = (
    update(_Q)
    .where(_Q.c.id.in_(bindparam("ids", expanding=True)), _Q.c.state == "queued",
           _Q.c.next_attempt_at <= bindparam("now"))
    .values(next_attempt_at=bindparam("until"), attempts=_Q.c.attempts + 1)
    .returning(_Q.c.id)
)
_FINISH = (
    update(_Q).where(_Q.c.id == bindparam("row"))
    .values(state=bindparam("state"), body=b"", finished_at=bindparam("finished"), last_error=bindparam("error"))
)
# Notifications still waiting for their first attempt, per address and
# account (see add_notifications); on the writer's sqlite3 connection.
_UNTRIED = FastSelect(
    select(_Q.c.body).where(_Q.c.state == "queued", _Q.c.kind == "notification", _Q.c.attempts == 0,
                            _Q.c.recipient == bindparam("recipient"), _Q.c.account == bindparam("account"),
                            _Q.c.mail_from == bindparam("mail_from"))
)
# A notification's own lines: the rest is the same for every notification
# of one sender practice to one address (outbound.message.notification_bytes).
_OWN_LINES = re.compile(rb"^(?:Date|Message-ID):[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*", re.IGNORECASE | re.MULTILINE)
_RETRY = update(_Q).where(_Q.c.id == bindparam("row")).values(next_attempt_at=bindparam("next"),
                                                              last_error=bindparam("error"))


def _own_lines_removed(body: bytes) -> bytes:
    """A notification without its Date and Message-ID fields (the header
    section only): what two notifications must share to say the same."""
    end = body.find(b"\r\n\r\n")
    end = len(body) if end < 0 else end + 2  # the last field's line end too
    return _OWN_LINES.sub(b"", body[:end]) + body[end:]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime) -> datetime:
    # SQLite returns naive datetimes; we only ever store UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: ``first``, doubling, at most ``maximum``."""

    first: timedelta = timedelta(seconds=60)
    maximum: timedelta = timedelta(hours=1)
    give_up_after: timedelta = timedelta(hours=48)

    def delay(self, attempts: int) -> timedelta:
        """The wait after the ``attempts``-th failed attempt (1-based)."""
        factor = 2 ** min(max(attempts - 1, 0), 30)
        return min(self.first * factor, self.maximum)


@dataclass(frozen=True)
class QueuedMail:
    id: int
    kind: str
    account: str | None
    mail_from: str
    recipient: str
    body: bytes = field(repr=False)
    attempts: int
    give_up_at: datetime


@dataclass(frozen=True)
class QueueEntry:
    """A row as an admin or a test may see it (no body)."""

    id: int
    kind: str
    account: str | None
    recipient: str
    state: str
    attempts: int
    next_attempt_at: datetime
    give_up_at: datetime
    last_error: str
    has_body: bool


class OutboundQueue:
    def __init__(self, engine: Engine, backoff: Backoff | None = None, clock: Clock = utc_now) -> None:
        self._sessions: sessionmaker[Session] = sessions(engine)
        self.backoff = backoff or Backoff()
        self.clock = clock

    @classmethod
    def for_config(cls, engine: Engine, notify: NotifyConfig, clock: Clock = utc_now) -> "OutboundQueue":
        """The queue with the retry timings of ``[notify]``."""
        backoff = Backoff(
            timedelta(seconds=notify.retry_first_seconds),
            timedelta(seconds=notify.retry_max_seconds),
            timedelta(hours=notify.give_up_hours),
        )
        return cls(engine, backoff, clock)

    def enqueue(self, kind: Kind, mail_from: str, recipient: str, body: bytes, *, account: str | None = None) -> int:
        """Add a message; due at once. Returns the row id."""
        stamp = self.clock()
        with unit_of_work(self._sessions) as s:
            row = OutboundMail(
                kind=kind, account=account, mail_from=mail_from, recipient=recipient, body=body, state="queued",
                attempts=0, created_at=stamp, next_attempt_at=stamp, give_up_at=stamp + self.backoff.give_up_after,
                finished_at=None, last_error="",
            )
            s.add(row)
            s.flush()
            return row.id

    def add(self, session: Session, kind: Kind, mail_from: str, recipient: str, body: bytes, *,
            account: str | None = None) -> None:
        """``enqueue`` inside the caller's write transaction (committed with it)."""
        stamp = self.clock()
        session.add(OutboundMail(
            kind=kind, account=account, mail_from=mail_from, recipient=recipient, body=body, state="queued",
            attempts=0, created_at=stamp, next_attempt_at=stamp, give_up_at=stamp + self.backoff.give_up_after,
            finished_at=None, last_error="",
        ))

    def add_rows(self, conn: Connection, kind: Kind, mail_from: str, rows: Sequence[tuple[str, bytes, str | None]]
                 ) -> None:
        """``add`` for (recipient, body, account) rows inside the caller's
        Core transaction: one multi-row insert (the SMTP server queues its
        notifications in the transaction that files the message)."""
        if not rows:
            return
        stamp = self.clock()
        give_up = stamp + self.backoff.give_up_after
        conn.execute(_ADD, [{
            "kind": kind, "account": account, "mail_from": mail_from, "recipient": recipient, "body": body,
            "state": "queued", "attempts": 0, "created_at": stamp, "next_attempt_at": stamp, "give_up_at": give_up,
            "finished_at": None, "last_error": "",
        } for recipient, body, account in rows])

    def add_notifications(self, conn: Connection, mail_from: str,
                          rows: Sequence[tuple[str, bytes, str | None]]) -> int:
        """``add_rows`` for new-mail notifications, without those that would
        repeat one still waiting in the queue: a notification to the same
        address about the same account, not tried yet, that says the same
        (the same bytes but for its Date and Message-ID, i.e. the same
        sender practice). That one goes out with the first attempt anyway
        and tells the same thing, "a secure message waits"; a second copy
        only costs a send (and a reader's attention). Once the waiting one
        has been tried (leased for sending, or failed and waiting to retry),
        the next delivery queues a notification of its own again, so a
        notification still always follows each delivery's commit. Returns
        how many were queued."""
        fresh: list[tuple[str, bytes, str | None]] = []
        for recipient, body, account in rows:
            if account is not None:
                key = _own_lines_removed(body)
                waiting = _UNTRIED.rows(conn, {"recipient": recipient, "account": account, "mail_from": mail_from})
                if any(_own_lines_removed(bytes(w.body)) == key for w in waiting):
                    continue
            fresh.append((recipient, body, account))
        self.add_rows(conn, "notification", mail_from, fresh)
        return len(fresh)

    def claim_due(self, limit: int = 20) -> list[QueuedMail]:
        """Rows due now, each leased to the caller (see module docstring)."""
        stamp = self.clock()
        with self._sessions() as s:
            # A plain read first: the worker polls every few seconds, and an
            # empty queue must not take SQLite's write lock each time.
            if s.connection().scalar(_ANY_DUE, {"now": stamp}) is None:
                return []
        with unit_of_work(self._sessions) as s:
            conn = s.connection()
            rows = conn.execute(_DUE, {"now": stamp, "limit": limit}).all()
            if not rows:
                return []
            # One conditional UPDATE leases them all: a row another worker
            # leased meanwhile has a next_attempt_at past ``stamp`` and is
            # left out (on SQLite, BEGIN IMMEDIATE already serializes us).
            leased = set(conn.scalars(_LEASE, {"ids": [r.id for r in rows], "now": stamp, "until": stamp + LEASE}))
        return [QueuedMail(r.id, r.kind, r.account, r.mail_from, r.recipient, r.body, r.attempts + 1,
                           _aware(r.give_up_at)) for r in rows if r.id in leased]

    def mark_sent(self, item: QueuedMail, reply: str = "") -> None:
        self.record_outcomes([(item, "sent", reply, None)])

    def mark_failed(self, item: QueuedMail, reason: str, code: int | None = None) -> None:
        self.record_outcomes([(item, "permanent", reason, code)])

    def mark_temporary(self, item: QueuedMail, reason: str, code: int | None = None) -> bool:
        """Schedule a retry; or, past ``give_up_at``, fail the row. Returns
        True if it will be retried."""
        return self.record_outcomes([(item, "temporary", reason, code)]) == ["retry"]

    def record_outcomes(self, outcomes: Sequence[tuple[QueuedMail, str, str, int | None]]) -> list[str]:
        """The outcomes (item, "sent" | "permanent" | "temporary", reply or
        reason, reply code) of a worker's pass, in ONE write transaction:
        final rows lose their body and get one audit event each; temporary
        failures are scheduled for a retry (exponential backoff) or, past
        ``give_up_at``, fail for good. Returns per item "sent", "failed",
        "retry" or "gave-up"."""
        stamp = self.clock()
        done: list[str] = []
        finals: list[dict[str, object]] = []
        retries: list[dict[str, object]] = []
        events: list[audit.Event] = []
        for item, status, reason, code in outcomes:
            gave_up = status == "temporary" and stamp >= item.give_up_at
            if status == "temporary" and not gave_up:
                # The last try lands on the deadline itself rather than past it.
                nxt = min(stamp + self.backoff.delay(item.attempts), item.give_up_at)
                retries.append({"row": item.id, "next": nxt, "error": reason[:1000]})
                done.append("retry")
                continue
            state = "sent" if status == "sent" else "failed"
            if gave_up:
                reason = f"gave up after {item.attempts} attempt(s); last: {reason}"
            # The body goes (see module docstring); the row stays as a
            # record of what happened until an admin prunes it.
            finals.append({"row": item.id, "state": state, "finished": stamp, "error": reason[:1000]})
            detail = f"kind={item.kind} attempts={item.attempts}"
            if code is not None and state == "failed":  # a failure's reply code; a sent row's is 250
                detail += f" reply={code}"
            if gave_up:
                detail += " gave-up"
            events.append(audit.Event(f"outbound.{state}", actor="postvault", account=item.account, detail=detail))
            done.append("gave-up" if gave_up else state)
        if not outcomes:
            return done
        with unit_of_work(self._sessions) as s:
            conn = s.connection()
            if finals:
                conn.execute(_FINISH, finals)
            if retries:
                conn.execute(_RETRY, retries)
            audit.record_many(conn, events)
        return done

    def entries(self, state: str | None = None) -> list[QueueEntry]:
        with self._sessions() as s:
            q = select(OutboundMail).order_by(OutboundMail.id)
            if state is not None:
                q = q.where(OutboundMail.state == state)
            return [
                QueueEntry(r.id, r.kind, r.account, r.recipient, r.state, r.attempts, _aware(r.next_attempt_at),
                           _aware(r.give_up_at), r.last_error, bool(r.body))
                for r in s.scalars(q)
            ]

    def body(self, entry_id: int) -> bytes:
        """The stored bytes of one row (empty once final)."""
        with self._sessions() as s:
            row = s.get(OutboundMail, entry_id)
            return b"" if row is None else row.body
