"""Security notices to an account's owner: their password was reset
(with or without the recovery escrow), or someone was given emergency
access to their mailbox. Queued on the outbound queue as kind "notice".

No PHI: the notice names the account, the time, and for emergency access
the person and until when; never a message, a subject or the grant's
reason (that is in the audit log, which the privacy officer can read).
It goes to the account's address and, if set, to its notification
address too: the owner must hear of it even if one of them is stale.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from email.message import EmailMessage

from ..conf.schema import Config
from ..outbound.message import _new_message, _set_body, body_text, serialize
from ..outbound.queue import Clock, utc_now
from ..store.api import Store
from .hooks import outbound_queue

_CONTACT = "If you did not expect this, contact your administrator or privacy officer at once."


def _when(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M} UTC"


def build_recovered(*, mail_from: str, to: str, account: str, hostname: str, when: datetime) -> EmailMessage:
    msg = _new_message(mail_from, to, "Your Secure Messaging password was reset", hostname, when)
    _set_body(msg, [
        f"The password of your Secure Messaging account {account} was reset by the administrator on "
        f"{_when(when)}, with the recovery key held by your practice's privacy officer.",
        "",
        "Your messages are all still there and readable with the new password, which your "
        "administrator gives you. Please change it to one of your own after you sign in.",
        "",
        _CONTACT,
    ])
    return msg


def build_reset(*, mail_from: str, to: str, account: str, hostname: str, when: datetime,
                deleted: int) -> EmailMessage:
    msg = _new_message(mail_from, to, "Your Secure Messaging password was reset", hostname, when)
    _set_body(msg, [
        f"The password of your Secure Messaging account {account} was reset by the administrator on "
        f"{_when(when)}, without a recovery key.",
        "",
        f"Messages stored before the reset could no longer be opened by anyone, so they were deleted "
        f"({deleted}). Senders still have their own copies and can send them again. New messages "
        "arrive as usual.",
        "",
        _CONTACT,
    ])
    return msg


def build_emergency(*, mail_from: str, to: str, account: str, hostname: str, when: datetime, person: str,
                    until: datetime) -> EmailMessage:
    msg = _new_message(mail_from, to, "Emergency access to your Secure Messaging mailbox", hostname, when)
    _set_body(msg, [
        f"On {_when(when)} the administrator gave {body_text(person) or 'a named person'} emergency, "
        f"read-only access to your Secure Messaging mailbox {account}, until {_when(until)}.",
        "",
        "Every message they open is recorded in the audit log under their name, and the reason for "
        "the access is on record with your privacy officer. Nothing in your mailbox can be changed "
        "or deleted through this access.",
        "",
        _CONTACT,
    ])
    return msg


def _recipients(store: Store, account: str) -> list[str]:
    out = [account]
    address = store.notification_settings(account).address
    if address.lower() != account.lower():
        out.append(address)
    return out


def notify_recovered(store: Store, config: Config, account: str, *, clock: Clock = utc_now) -> int:
    """Queue the "password reset with the escrow" notice; returns how many."""
    at = clock()
    return _enqueue(store, config, account, clock, lambda to: build_recovered(
        mail_from=config.notify.from_, to=to, account=account, hostname=config.hostname, when=at))


def notify_reset(store: Store, config: Config, account: str, deleted: int, *, clock: Clock = utc_now) -> int:
    """Queue the "password reset without escrow" notice."""
    at = clock()
    return _enqueue(store, config, account, clock, lambda to: build_reset(
        mail_from=config.notify.from_, to=to, account=account, hostname=config.hostname, when=at,
        deleted=deleted))


def notify_emergency(store: Store, config: Config, account: str, person: str, until: datetime, *,
                     clock: Clock = utc_now) -> int:
    """Queue the "emergency access granted" notice."""
    at = clock()
    return _enqueue(store, config, account, clock, lambda to: build_emergency(
        mail_from=config.notify.from_, to=to, account=account, hostname=config.hostname, when=at,
        person=person, until=until))


def _enqueue(store: Store, config: Config, account: str, clock: Clock,
             build: Callable[[str], EmailMessage]) -> int:
    queue = outbound_queue(store, config, clock)
    sent = 0
    for to in _recipients(store, account):
        queue.enqueue("notice", config.notify.from_, to, serialize(build(to)), account=account)
        sent += 1
    return sent
