"""Change notifications: the store tells whoever listens that a mailbox
changed, so an IMAP session in IDLE (RFC 2177) can announce ``* N EXISTS``,
``FETCH (FLAGS ...)`` or ``EXPUNGE`` without polling the database.

A ``Change`` carries only what the database already shows in the clear
(account id, mailbox name, UIDs): never content, so it may be logged.

The store publishes after a unit of work has committed, never before: a
listener that reacts at once (re-reads the mailbox) must find the change
there. Publishing happens on the thread that made the change, which is a
worker thread for the servers; callbacks must be quick and must not block
(the IMAP side hops to the reactor with its worker pool's
``call_from_thread``, in order with the workers' results).

This bus is in-process only. On PostgreSQL, ``pgnotify.PgChangeBus``
extends it across processes (LISTEN/NOTIFY): its ``publish`` also sends a
NOTIFY, and a listening thread calls ``deliver`` for the changes other
processes made. Subscribers do not change, except that they must take a
``resync``: "re-read this mailbox (or, with mailbox "", every mailbox of
the account) from the database", sent when a change was too big to name
or notices may have been lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

ChangeKind = Literal["exists", "flags", "expunge", "logout", "deleted", "renamed", "resync"]


@dataclass(frozen=True)
class Change:
    """One committed change to one mailbox of one account.

    ``exists``: messages with these UIDs were added; ``flags``: their flags
    changed; ``expunge``: they were removed. UIDs ascend.
    ``logout`` (mailbox "" and no UIDs): the account's password changed, so
    every open session of it must end (the web pages publish it; IMAP
    sessions say BYE and close).
    ``resync`` (no UIDs): something changed in this mailbox, or in every
    mailbox of the account if the name is "", that the bus can't name;
    read it again (only ever comes from another process, see pgnotify).
    ``deleted`` / ``renamed`` (no UIDs): the folder ``mailbox`` is gone, or
    now has another name; a session that has it selected must not go on
    writing to that name (IMAP sessions say BYE).
    """

    account_id: int
    mailbox: str
    kind: ChangeKind
    uids: tuple[int, ...]


Callback = Callable[[Change], None]


class ChangeBus:
    """Thread-safe publish/subscribe of ``Change``s, per account."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # account id -> {token: callback}; a token per subscription, so the
        # same callable subscribed twice is two subscriptions, each with its
        # own unsubscribe.
        self._subs: dict[int, dict[int, Callback]] = {}
        self._next = 0
        # Watchers of what other processes changed, any account (token -> callback).
        self._remote: dict[int, Callback] = {}

    def subscribe(self, account_id: int, callback: Callback) -> Callable[[], None]:
        """Call ``callback`` for every change to ``account_id``'s mailboxes;
        returns a function that ends the subscription (idempotent)."""
        with self._lock:
            token = self._next
            self._next += 1
            self._subs.setdefault(account_id, {})[token] = callback

        def unsubscribe() -> None:
            with self._lock:
                subs = self._subs.get(account_id)
                if subs is not None:
                    subs.pop(token, None)
                    if not subs:
                        del self._subs[account_id]

        return unsubscribe

    def subscribers(self, account_id: int) -> int:
        """How many subscriptions an account has (for tests and metrics)."""
        with self._lock:
            return len(self._subs.get(account_id, {}))

    def watch_remote(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback`` for every change another process made, to any
        account (the web pages end their sessions of an account whose
        password was changed on another node); returns the unsubscribe.
        This in-process bus hears no other process, so never calls it."""
        with self._lock:
            token = self._next
            self._next += 1
            self._remote[token] = callback

        def unwatch() -> None:
            with self._lock:
                self._remote.pop(token, None)

        return unwatch

    def accounts(self) -> list[int]:
        """The accounts that have subscribers now."""
        with self._lock:
            return list(self._subs)

    def publish(self, change: Change) -> None:
        """Announce a committed change to this process's subscribers."""
        self.deliver(change)

    def deliver(self, change: Change) -> None:
        """Run the subscribers of ``change.account_id``; never raises.

        Callbacks run outside the lock (a callback may subscribe or
        unsubscribe, e.g. a session that logs out), over a copy taken under
        it. A callback that raises is logged and skipped: a broken listener
        must not fail the store call that already committed its change.
        """
        self._run(change, self._subs.get)

    def deliver_remote(self, change: Change) -> None:
        """``deliver`` a change another process made; its watchers hear it too."""
        self._run(change, lambda _: self._remote)
        self.deliver(change)

    def _run(self, change: Change, pick: Callable[[int], dict[int, Callback] | None]) -> None:
        with self._lock:
            callbacks = list((pick(change.account_id) or {}).values())
        for callback in callbacks:
            try:
                callback(change)
            except Exception as exc:  # noqa: BLE001 - any listener bug, see above
                # The type only: an exception's text is the listener's and
                # could quote anything it held.
                log.warning(
                    "change listener failed (%s) for account %d, %s",
                    type(exc).__name__, change.account_id, change.kind,
                )
