"""The change bus across processes: PostgreSQL LISTEN/NOTIFY.

Several ``postvault serve`` nodes on one PostgreSQL database act as one
server only if an IMAP session in IDLE on node B hears what node A just
committed. ``PgChangeBus`` is the ``notify.ChangeBus`` for that (issue 9
item 2): ``publish`` delivers to this process's subscribers, as before, and
also sends a ``NOTIFY`` on the channel ``CHANNEL``; a listening thread with
a connection of its own ``LISTEN``s there and delivers other processes'
changes to the local subscribers. Subscribers (IMAP sessions) don't change.

What a notice says (``encode``/``decode``): JSON with the sending node's id,
the account id, the mailbox name, the kind and the UIDs as ranges
("1:40,42"): what the database shows in the clear anyway, never content.
PostgreSQL refuses a payload of 8000 bytes or more; a change whose notice
would not fit (a long, gappy UID list) is sent as ``resync`` of its mailbox
instead, which makes sessions re-read the mailbox's state from the database
(the path the 10 s IDLE poll takes for changes nobody announced).

Threads and connections: two psycopg connections of the node's own, outside
SQLAlchemy's pool, because a LISTEN must stay on one session for the life
of the process:

- the *sender* takes changes from a queue (``publish`` only enqueues, so the
  store's writer thread never waits on a NOTIFY) and sends what piled up in
  one statement, merged per (account, mailbox, kind);
- the *listener* waits for notices (``Connection.notifies`` with a timeout,
  so ``stop`` is heard within a second) and checks its connection with a
  ``SELECT 1`` when nothing came for a while.

If either connection drops, it is made again with backoff (0.2 s doubling
to 10 s). Notices sent while a listener was away are lost (PostgreSQL keeps
them only for listening sessions), so after it is back every local session
is told ``resync`` of all its mailboxes. Changes this node made while its
sender was away are kept (merged, bounded by ``MAX_PENDING``; past that,
one ``resync`` of everything replaces them) and sent when it is back.

Before ``start`` (the CLI, tests' own stores) and after ``stop``,
``publish`` sends its NOTIFY at once through the store's engine, so a
change made by ``postvault`` commands reaches the running nodes too.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any, get_args

from sqlalchemy import Engine, text

from .notify import Change, ChangeBus, ChangeKind

log = logging.getLogger(__name__)

CHANNEL = "postvault_changes"
# PostgreSQL's limit is "shorter than 8000 bytes" (NOTIFY, default build).
PAYLOAD_LIMIT = 7999
# Distinct (account, mailbox, kind) changes held while the sender is away.
MAX_PENDING = 10_000
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0
# How long the listener waits for a notice before looking at the stop flag,
# and how long it stays quiet before checking its connection.
WAIT_SECONDS = 0.5
CHECK_SECONDS = 30.0
VERSION = 1
# UIDs a received notice may name (ranges make far more fit in a payload);
# beyond, the mailbox is re-read instead.
MAX_UIDS = 100_000
# Notices per NOTIFY statement.
BATCH = 500


# -- the payload ----------------------------------------------------------------------------------


def uid_ranges(uids: Iterable[int]) -> str:
    """Ascending UIDs as IMAP-style ranges: ``1:3,7,9:10``."""
    out: list[str] = []
    ordered = sorted(set(uids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(out)


def parse_ranges(raw: str) -> tuple[int, ...] | None:
    """The UIDs of ``uid_ranges``; None if they are more than ``MAX_UIDS``
    (the receiver then resyncs the mailbox rather than hold them all)."""
    bounds: list[tuple[int, int]] = []
    total = 0
    for part in filter(None, raw.split(",")):
        first, _, last = part.partition(":")
        lo, hi = int(first), int(last or first)
        if lo < 1 or hi < lo:
            raise ValueError("bad UID range")
        total += hi - lo + 1
        bounds.append((lo, hi))
    if total > MAX_UIDS:
        return None
    return tuple(u for lo, hi in bounds for u in range(lo, hi + 1))


def encode(node: str, change: Change) -> str:
    """The NOTIFY payload of ``change``: the change itself, or its
    ``resync`` form if that would not fit in ``PAYLOAD_LIMIT`` bytes."""
    body = {"v": VERSION, "n": node, "a": change.account_id, "k": change.kind, "m": change.mailbox,
            "u": uid_ranges(change.uids)}
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    if len(payload.encode("utf-8")) <= PAYLOAD_LIMIT:
        return payload
    if change.kind == "logout":  # no UIDs: only an absurd mailbox name gets here; it has none
        body.update(m="", u="")
    else:
        body.update(k="resync", u="")
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    if len(payload.encode("utf-8")) <= PAYLOAD_LIMIT:
        return payload
    # A mailbox name too long to name: every mailbox of the account.
    body.update(m="")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def encode_resync_all(node: str) -> str:
    """Every session of every account re-reads (this node lost changes)."""
    return json.dumps({"v": VERSION, "n": node, "a": None, "k": "resync", "m": "", "u": ""},
                      separators=(",", ":"))


def decode(payload: str) -> tuple[str, Change | None]:
    """(sending node, change); the change is None for "every account
    resyncs". Raises ``ValueError``, ``KeyError`` or ``TypeError`` on a
    payload that is not ours."""
    body = json.loads(payload)
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise ValueError("unknown notice version")
    node, account, kind, mailbox = body["n"], body["a"], body["k"], body["m"]
    if not isinstance(node, str) or not isinstance(mailbox, str):
        raise TypeError("bad notice")
    if kind not in get_args(ChangeKind):
        raise ValueError("unknown change kind")
    if account is None:
        if kind != "resync":
            raise ValueError("only a resync may name every account")
        return node, None
    if not isinstance(account, int) or isinstance(account, bool):
        raise TypeError("bad account id")
    uids = parse_ranges(str(body["u"]))
    if uids is None:
        return node, Change(account, mailbox, "resync", ())
    return node, Change(account, mailbox, kind, uids)


# -- the bus --------------------------------------------------------------------------------------


def _connect_args(engine: Engine) -> tuple[list[Any], dict[str, Any]]:
    """What psycopg.connect needs for the engine's database (the dialect's
    own translation of the URL, so every URL option means the same)."""
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    kwargs = dict(kwargs)
    # A half-open TCP connection (a vanished host) is noticed in about 25 s
    # even if the listener is waiting, not only at its next check.
    kwargs.setdefault("keepalives", 1)
    kwargs.setdefault("keepalives_idle", 10)
    kwargs.setdefault("keepalives_interval", 5)
    kwargs.setdefault("keepalives_count", 3)
    kwargs.setdefault("connect_timeout", 10)
    kwargs["autocommit"] = True
    return list(args), kwargs


class PgChangeBus(ChangeBus):
    """``ChangeBus`` that also tells, and hears, other processes on the
    same PostgreSQL database (see the module docstring)."""

    def __init__(self, engine: Engine, *, node: str | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.node = node or secrets.token_hex(6)
        self._cond = threading.Condition()
        # (account, mailbox, kind) -> UIDs; dicts keep the order of first arrival.
        self._pending: dict[tuple[int, str, str], set[int]] = {}
        self._lost = False  # the pending changes overflowed: resync everything
        self._running = False
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listening = threading.Event()
        # Counters, for tests and metrics.
        self.reconnects = 0
        self.received = 0

    # -- publishing ------------------------------------------------------------------

    def publish(self, change: Change) -> None:
        """Deliver to this process's subscribers, then tell the others."""
        self.deliver(change)
        with self._cond:
            if self._running:
                self._enqueue(change)
                self._cond.notify()
                return
        self._send_now([change])

    def _enqueue(self, change: Change) -> None:
        # With _cond held.
        key = (change.account_id, change.mailbox, change.kind)
        if key not in self._pending and len(self._pending) >= MAX_PENDING:
            self._pending.clear()
            self._lost = True
            return
        if not self._lost:
            self._pending.setdefault(key, set()).update(change.uids)

    def _take(self) -> list[Change | None]:
        # With _cond held: everything pending (None: "every account resyncs").
        taken: list[Change | None] = [None] if self._lost else [
            Change(a, m, k, tuple(sorted(u))) for (a, m, k), u in self._pending.items()]  # type: ignore[arg-type]
        self._pending.clear()
        self._lost = False
        return taken

    def _payloads(self, changes: list[Change | None]) -> list[str]:
        return [encode_resync_all(self.node) if c is None else encode(self.node, c) for c in changes]

    def _send_now(self, changes: list[Change | None]) -> None:
        """Without the sender thread: through the engine's pool; never raises."""
        payloads = self._payloads(changes)
        try:
            with self.engine.begin() as conn:
                for i in range(0, len(payloads), BATCH):
                    conn.execute(text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
                                 {"channel": CHANNEL, "payloads": payloads[i:i + BATCH]})
        except Exception as exc:  # noqa: BLE001 - the change is committed whatever the notice does
            log.warning("could not announce a change to other nodes (%s)", type(exc).__name__)

    # -- the threads -----------------------------------------------------------------

    def start(self, wait: float = 10.0) -> bool:
        """Start the sender and the listener; wait up to ``wait`` seconds
        for the LISTEN to be in place. False if it is not yet (the listener
        keeps trying; meanwhile IDLE's poll still catches up)."""
        with self._cond:
            if self._running:
                return self._listening.is_set()
            self._running = True
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._sender, name="postvault-notify-send", daemon=True),
                         threading.Thread(target=self._listener, name="postvault-notify-listen", daemon=True)]
        for t in self._threads:
            t.start()
        return self._listening.wait(wait)

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is pending, stop both threads; later publishes are
        sent at once (the node is draining, its changes still count)."""
        with self._cond:
            if not self._running:
                return
            self._running = False
            self._cond.notify_all()
        self._stopping.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        self._listening.clear()
        # What the sender could not send (its connection was down).
        with self._cond:
            left = self._take() if (self._pending or self._lost) else []
        if left:
            self._send_now(left)

    @property
    def listening(self) -> bool:
        """Whether the LISTEN is in place right now."""
        return self._listening.is_set()

    def _connect(self, role: str) -> Any:
        import psycopg

        args, kwargs = _connect_args(self.engine)
        # Named, so pg_stat_activity shows which node's sender or listener it is.
        kwargs["application_name"] = f"postvault-{role}-{self.node}"
        return psycopg.connect(*args, **kwargs)

    def _backoff(self, delay: float) -> float:
        self._stopping.wait(delay)
        return min(delay * 2, BACKOFF_MAX)

    def _sender(self) -> None:
        conn = None
        delay = BACKOFF_FIRST
        while True:
            with self._cond:
                while self._running and not self._pending and not self._lost:
                    self._cond.wait()
                if not self._pending and not self._lost:
                    break  # stopping, nothing left
                changes = self._take()
            try:
                if conn is None:
                    conn = self._connect("send")
                while changes:
                    conn.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
                                 (CHANNEL, self._payloads(changes[:BATCH])))
                    del changes[:BATCH]
                delay = BACKOFF_FIRST
            except Exception as exc:  # noqa: BLE001 - any connection trouble: keep the changes, try again
                log.warning("could not announce changes to other nodes (%s); retrying", type(exc).__name__)
                with self._cond:
                    self._requeue(changes)
                self._close(conn)
                conn = None
                if self._stopping.is_set():
                    break  # stop sends what is left through the engine
                delay = self._backoff(delay)
        self._close(conn)

    def _requeue(self, changes: list[Change | None]) -> None:
        # With _cond held: put unsent changes back (merged with newer ones).
        for change in changes:
            if change is None:
                self._pending.clear()
                self._lost = True
            else:
                self._enqueue(change)

    @staticmethod
    def _close(conn: Any) -> None:
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001, S110 - already broken; nothing to keep
                pass

    def _listener(self) -> None:
        first = True
        delay = BACKOFF_FIRST
        while not self._stopping.is_set():
            conn = None
            try:
                conn = self._connect("listen")
                conn.execute(f"LISTEN {CHANNEL}")
                self._listening.set()
                delay = BACKOFF_FIRST
                if not first:
                    self.reconnects += 1
                    log.info("listening for other nodes' changes (again); every session re-reads")
                    self._resync_everyone()
                first = False
                quiet_since = time.monotonic()
                while not self._stopping.is_set():
                    heard = False
                    for notice in conn.notifies(timeout=WAIT_SECONDS):
                        heard = True
                        self._heard(notice.payload)
                    now = time.monotonic()
                    if heard:
                        quiet_since = now
                    elif now - quiet_since > CHECK_SECONDS:
                        conn.execute("SELECT 1")  # a dead connection raises here
                        quiet_since = now
            except Exception as exc:  # noqa: BLE001 - any connection trouble: connect again
                if self._stopping.is_set():
                    break
                self._listening.clear()
                # Sessions may have missed notices, even if this was the
                # first try (the node serves without waiting for it).
                first = False
                log.warning("lost the connection that hears other nodes (%s); reconnecting", type(exc).__name__)
                self._close(conn)
                conn = None
                delay = self._backoff(delay)
            finally:
                self._close(conn)
        self._listening.clear()

    def _heard(self, payload: str) -> None:
        try:
            node, change = decode(payload)
        except (ValueError, KeyError, TypeError) as exc:
            # Not the payload itself: it is someone else's text.
            log.warning("ignored a malformed change notice (%s)", type(exc).__name__)
            return
        if node == self.node:
            return
        self.received += 1
        if change is None:
            self._resync_everyone()
        else:
            self.deliver_remote(change)

    def _resync_everyone(self) -> None:
        for account_id in self.accounts():
            self.deliver(Change(account_id, "", "resync", ()))
