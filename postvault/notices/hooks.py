"""What the servers and the CLI call: invite a colleague (and queue the
email), notify recipients after a delivery, and send held notifications.

For the SMTP side:

- Before delivering to an address in the sender's address book that has no
  account yet, call ``invite_and_send(store, config, sender, rcpt,
  actor=sender)``: it makes the pending account (so ``store.deliver`` can
  seal to its key) and queues the invitation; for a colleague who is
  already pending or active it only links the address book.
- After ``store.deliver`` returned, call ``after_delivery(store, config,
  result, sender)``. It never raises: the message is stored and must be
  acknowledged whatever happens to its notification. ``notify_filed`` does
  the same inside the transaction that files the message (the SMTP server
  hands it to ``Store.submit_delivery`` as its ``then`` hook), so the
  message and its notifications cost one commit.

Both are synchronous (database work); call them on the same worker thread
as ``store.deliver``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from ..conf.schema import Config
from sqlalchemy import Connection

from ..outbound.message import build_invitation, notification_bytes, serialize
from ..outbound.queue import Clock, OutboundQueue, utc_now
from ..store.accounts import InvitationResult, NotifyState, NotifyVerdict, claim_notifications_in
from ..store.api import Store
from ..store.types import AccountSession, DeliveryResult
from . import schedule
from .links import sign_in_route, signup_link

log = logging.getLogger("postvault.notices")


def outbound_queue(store: Store, config: Config, clock: Clock = utc_now) -> OutboundQueue:
    return OutboundQueue.for_config(store.engine, config.notify, clock)


def enqueue_invitation(store: Store, config: Config, result: InvitationResult, clock: Clock = utc_now) -> int:
    """Queue the sign-up email for a result that carries a new token."""
    if result.token is None or result.expires_at is None:
        raise ValueError("this invitation made no new link; there is nothing to send")
    msg = build_invitation(
        mail_from=config.notify.from_, to=result.colleague, member_practice=result.member_practice,
        link=signup_link(config, result.token), expires_at=result.expires_at, route=sign_in_route(config),
        when=clock(),
    )
    return outbound_queue(store, config, clock).enqueue(
        "invitation", config.notify.from_, result.colleague, serialize(msg), account=result.colleague
    )


def invite_and_send(
    store: Store,
    config: Config,
    member: str,
    colleague: str,
    *,
    actor: str = "admin",
    member_session: AccountSession | None = None,
    discard_waiting_mail: bool = False,
    send_email: bool = True,
    clock: Clock = utc_now,
) -> InvitationResult:
    """``store.invite_colleague`` with the configured link lifetime, then
    the email when a new link was made (``send_email`` False: the caller
    hands the link over itself, e.g. ``postvault invite --print-link``).

    The invitation commits before the email is queued; if the process dies
    in between, the member re-invites (a new link; the key carries over).
    """
    result = store.invite_colleague(
        member, colleague, ttl=timedelta(days=config.notify.invitation_days), actor=actor,
        member_session=member_session, discard_waiting_mail=discard_waiting_mail,
    )
    if result.token is not None and send_email:
        enqueue_invitation(store, config, result, clock)
    return result


def after_delivery(
    store: Store, config: Config, result: DeliveryResult, sender: str, *, clock: Clock = utc_now
) -> int:
    """Queue new-mail notifications for the recipients of a delivery, by
    their preferences; returns how many were queued. Never raises."""
    queued = 0
    try:
        practice: str | None = store.get_account(sender).practice_name
    except Exception:  # noqa: BLE001 - see the docstring: never fail a stored message
        log.exception("notices: cannot look up the sender of message %s", result.message_id)
        practice = None
    for recipient, _uid in result.delivered:
        try:
            queued += _notify(store, config, recipient, practice, schedule.on_delivery, clock)
        except Exception:  # noqa: BLE001 - one recipient's problem must not stop the others
            log.exception("notices: notification for message %s not queued", result.message_id)
    return queued


def notify_filed(
    conn: Connection, config: Config, queue: OutboundQueue, result: DeliveryResult, sender_practice: str | None,
    *, clock: Clock = utc_now,
) -> int:
    """``after_delivery`` inside the transaction that files the message
    (``Store.submit_delivery(prepared, then=...)``): the claims
    (``claim_notifications_in``, Core) and the queued emails
    (``notification_bytes``, one multi-row insert) commit with the message,
    for one commit instead of two. Returns how many were queued. It may
    raise: the store runs it in a SAVEPOINT and logs a failure, so the
    message stays stored (and acknowledged) either way."""
    at = clock()
    targets = claim_notifications_in(conn, [recipient for recipient, _uid in result.delivered], at,
                                     schedule.on_delivery)
    route = sign_in_route(config)
    rows = []
    for target in targets:
        if isinstance(target, Exception):  # the account went away meanwhile
            log.error("notices: notification for message %s not queued (%s)", result.message_id,
                      type(target).__name__)
            continue
        if target is None:
            continue
        body = notification_bytes(mail_from=config.notify.from_, to=target.address, sender_practice=sender_practice,
                                  route=route, when=at)
        rows.append((target.address, body, target.account))
    # One still waiting untried that says the same makes another redundant
    # (OutboundQueue.add_notifications).
    return queue.add_notifications(conn, config.notify.from_, rows)


def sweep_held(store: Store, config: Config, *, clock: Clock = utc_now) -> int:
    """Send the held "batched" notifications whose interval is over (the
    outbound worker runs this every pass); returns how many were queued."""
    queued = 0
    for account in store.held_notifications():
        queued += _notify(store, config, account, None, schedule.on_sweep, clock)
    return queued


def _notify(
    store: Store,
    config: Config,
    account: str,
    practice: str | None,
    decide: Callable[[NotifyState, datetime], NotifyVerdict],
    clock: Clock,
) -> int:
    at = clock()
    target = store.claim_notification(account, at, decide)
    if target is None:
        return 0
    body = notification_bytes(
        mail_from=config.notify.from_, to=target.address, sender_practice=practice, route=sign_in_route(config),
        when=at,
    )
    outbound_queue(store, config, clock).enqueue(
        "notification", config.notify.from_, target.address, body, account=target.account
    )
    return 1
