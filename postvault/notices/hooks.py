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
  acknowledged whatever happens to its notification. ``after_deliveries``
  does the same for many deliveries in one transaction (the SMTP server
  batches them on the store's writer thread).

Both are synchronous (database work); call them on the same worker thread
as ``store.deliver``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from ..conf.schema import Config
from ..outbound.message import build_invitation, build_notification, serialize
from ..outbound.queue import Clock, OutboundQueue, utc_now
from sqlalchemy.orm import Session

from ..store.accounts import InvitationResult, NotifyState, NotifyTarget, NotifyVerdict
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


def after_deliveries(
    store: Store, config: Config, deliveries: Sequence[tuple[DeliveryResult, str]], *, clock: Clock = utc_now
) -> list[int]:
    """``after_delivery`` for many deliveries (result, sender) at once: the
    senders read once, every claim and the emails in ONE transaction
    (``Store.claim_notifications``); the count queued per delivery, in
    order. Never raises."""
    counts = [0] * len(deliveries)
    try:
        senders = store.accounts({sender for _, sender in deliveries})
        at = clock()
        wanted = [(i, recipient, senders.get(sender.lower()))
                  for i, (result, sender) in enumerate(deliveries) for recipient, _uid in result.delivered]
        queue = outbound_queue(store, config, clock)

        def enqueue(session: Session, targets: list[NotifyTarget | None]) -> None:
            for (i, _recipient, sender), target in zip(wanted, targets):
                if target is None:
                    continue
                try:
                    msg = build_notification(
                        mail_from=config.notify.from_, to=target.address,
                        sender_practice=sender.practice_name if sender is not None else None,
                        route=sign_in_route(config), when=at,
                    )
                    queue.add(session, "notification", config.notify.from_, target.address, serialize(msg),
                              account=target.account)
                except Exception:  # noqa: BLE001 - one recipient's problem must not stop the others
                    log.exception("notices: notification for message %s not queued", deliveries[i][0].message_id)
                    continue
                counts[i] += 1

        # on_delivery decides on the preferences and times alone (only a
        # held notification's sweep asks whether mail is still unread), so
        # the INBOX, which grows with every message, is not counted.
        outcomes = store.claim_notifications([r for _, r, _ in wanted], at, schedule.on_delivery, then=enqueue,
                                             count_unread=False)
        for (i, _r, _s), outcome in zip(wanted, outcomes):
            if isinstance(outcome, Exception):
                log.error("notices: notification for message %s not queued (%s)", deliveries[i][0].message_id,
                          type(outcome).__name__)
    except Exception:  # noqa: BLE001 - see the docstring: never fail a stored message
        log.exception("notices: notifications for %d stored message(s) not queued", len(deliveries))
        return [0] * len(deliveries)
    return counts


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
    msg = build_notification(
        mail_from=config.notify.from_, to=target.address, sender_practice=practice, route=sign_in_route(config),
        when=at,
    )
    outbound_queue(store, config, clock).enqueue(
        "notification", config.notify.from_, target.address, serialize(msg), account=target.account
    )
    return 1
