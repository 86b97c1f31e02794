"""When an account gets a new-mail notification: pure decisions over
``NotifyState`` (no I/O), applied by the store in one transaction.

Preferences: "every" message; "batched", at most one per N minutes while
mail is unread; "off". Batched works like this: a delivery notifies at once
unless a notification went out less than N minutes ago; then it is held,
and when the N minutes are over the held notification goes out only if the
account still has unread mail in its INBOX (if they read it meanwhile,
there is nothing to tell). Accounts that are not active (invited, not
signed up yet) get no notifications: their invitation says mail waits.
"""

from __future__ import annotations

from datetime import datetime

from ..store.accounts import NotifyState, NotifyVerdict


def _interval_over(state: NotifyState, at: datetime) -> bool:
    return state.last_sent_at is None or at - state.last_sent_at >= state.interval


def on_delivery(state: NotifyState, at: datetime) -> NotifyVerdict:
    """A message has just landed in the INBOX."""
    if state.account_state != "active" or state.mode == "off":
        return "skip"
    if state.mode == "every" or _interval_over(state, at):
        return "send"
    return "hold"


def on_sweep(state: NotifyState, at: datetime) -> NotifyVerdict:
    """A held notification, looked at again later."""
    if state.account_state != "active" or state.mode == "off" or state.held_since is None:
        return "skip"
    if state.unread == 0:
        return "skip"
    if state.mode == "every" or _interval_over(state, at):
        return "send"
    return "hold"
