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

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..conf.schema import NotifyConfig
from ..store import audit
from ..store.db import sessions, unit_of_work
from ..store.models import OutboundMail

Kind = Literal["invitation", "notification", "notice"]
Clock = Callable[[], datetime]
LEASE = timedelta(minutes=10)


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

    def claim_due(self, limit: int = 20) -> list[QueuedMail]:
        """Rows due now, each leased to the caller (see module docstring)."""
        stamp = self.clock()
        claimed: list[QueuedMail] = []
        due = select(OutboundMail.id).where(OutboundMail.state == "queued", OutboundMail.next_attempt_at <= stamp)
        with self._sessions() as s:
            # A plain read first: the worker polls every few seconds, and an
            # empty queue must not take SQLite's write lock each time.
            if s.scalar(due.limit(1)) is None:
                return claimed
        with unit_of_work(self._sessions) as s:
            rows = s.scalars(
                select(OutboundMail)
                .where(OutboundMail.state == "queued", OutboundMail.next_attempt_at <= stamp)
                .order_by(OutboundMail.next_attempt_at, OutboundMail.id)
                .limit(limit)
                # PostgreSQL: rows another process is claiming right now are
                # passed over rather than waited for (SQLite: one writer).
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                done = s.execute(
                    update(OutboundMail)
                    .where(OutboundMail.id == row.id, OutboundMail.next_attempt_at == row.next_attempt_at,
                           OutboundMail.state == "queued")
                    .values(next_attempt_at=stamp + LEASE, attempts=row.attempts + 1)
                    .execution_options(synchronize_session=False)
                )
                if done.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(QueuedMail(row.id, row.kind, row.account, row.mail_from, row.recipient, row.body,
                                              row.attempts + 1, _aware(row.give_up_at)))
        return claimed

    def mark_sent(self, item: QueuedMail, reply: str = "") -> None:
        self._finish(item, "sent", reply, "outbound.sent")

    def mark_failed(self, item: QueuedMail, reason: str, code: int | None = None) -> None:
        self._finish(item, "failed", reason, "outbound.failed", code)

    def mark_temporary(self, item: QueuedMail, reason: str, code: int | None = None) -> bool:
        """Schedule a retry; or, past ``give_up_at``, fail the row. Returns
        True if it will be retried."""
        stamp = self.clock()
        if stamp >= item.give_up_at:
            self._finish(item, "failed", f"gave up after {item.attempts} attempt(s); last: {reason}",
                         "outbound.failed", code, gave_up=True)
            return False
        # The last try lands on the deadline itself rather than past it.
        nxt = min(stamp + self.backoff.delay(item.attempts), item.give_up_at)
        with unit_of_work(self._sessions) as s:
            s.execute(
                update(OutboundMail).where(OutboundMail.id == item.id)
                .values(next_attempt_at=nxt, last_error=reason[:1000])
                .execution_options(synchronize_session=False)
            )
        return True

    def _finish(
        self, item: QueuedMail, state: str, reason: str, event: str, code: int | None = None, gave_up: bool = False
    ) -> None:
        stamp = self.clock()
        with unit_of_work(self._sessions) as s:
            s.execute(
                update(OutboundMail).where(OutboundMail.id == item.id)
                # The body goes (see module docstring); the row stays as a
                # record of what happened until an admin prunes it.
                .values(state=state, body=b"", finished_at=stamp, last_error=reason[:1000])
                .execution_options(synchronize_session=False)
            )
            detail = f"kind={item.kind} attempts={item.attempts}"
            if code is not None:
                detail += f" reply={code}"
            if gave_up:
                detail += " gave-up"
            audit.record(s, event, actor="postvault", account=item.account, detail=detail)

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
