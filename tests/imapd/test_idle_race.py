"""IDLE's start against a change that commits at the wrong moment (found by
bench/soak.py: one wake-up in 7,963 came only at the next poll).

The protocol object over Twisted's ``StringTransport`` on a real store
(SQLite file, sealed blobs) and its real change bus; the store runs in this
thread, and the test holds the IDLE catch-up's read in the middle to
deliver a message by SMTP's store call at exactly that moment, the window
a loaded server leaves open by chance."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer

from postvault.conf.schema import ImapConfig
from postvault.imapd.account import Account
from postvault.imapd.indexfill import IndexFiller
from postvault.imapd.mailbox import RecentClaims
from postvault.policy.schema import Policy
from postvault.store.api import Store

from ..conftest import PASSWORD
from .test_server_unit import make


class HeldService:
    """The IMAP service's session-facing part on a real store; ``hold``
    names a store call whose answer waits for the test."""

    def __init__(self, store: Store) -> None:
        # A long poll: only the change bus can wake the idler in time.
        self.limits = ImapConfig(idle_poll_seconds=3600)
        self.policy = Policy()
        self.store = store
        self.bus = store.bus
        self.recent = RecentClaims()
        self.portal = None
        self.indexer = IndexFiller(store, enabled=False, round_messages=250)
        self.hold = ""
        self.held: list[tuple[defer.Deferred[Any], Any]] = []

    def disabled_for(self, client: str, account: str) -> set[str]:
        return set()

    def run(self, f: Any, *a: Any, **kw: Any) -> defer.Deferred[Any]:
        if getattr(f, "__name__", "") == self.hold:
            # The read is done now; its answer arrives when the test says.
            self.hold = ""
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append((d, f(*a, **kw)))
            return d
        return defer.maybeDeferred(f, *a, **kw)


@pytest.mark.parametrize("behind", [False, True], ids=["view-current", "view-behind"])
def test_a_delivery_during_the_idle_catch_up_wakes_the_idler(store: Store, people: dict[str, str],
                                                             behind: bool) -> None:
    """IDLE first looks whether the mailbox changed (``mailbox_marks``) and,
    if the view is behind, reads the changes (``mailbox_changes``); a
    delivery committing during either read must reach the idler at once.
    "view-behind" fails on the old code (the change came at the next poll,
    an hour here); "view-current" passed there too, and guards the fix."""
    member, sender = people["member"], people["colleague"]
    store.deliver(b"Subject: first\r\n\r\none\r\n", sender, [member])
    proto, transport, _ = make()
    service = HeldService(store)
    proto.service = service
    session = store.login(member, PASSWORD)
    proto.account = Account(session, service)
    proto.state = "auth"
    # As the IMAP service subscribes a logged-in session (here on this
    # thread, where the store's calls run).
    unsubscribe = store.bus.subscribe(session.account_id, proto.on_change)
    try:
        proto.dataReceived(b"s SELECT INBOX\r\n")
        assert b"* 1 EXISTS" in transport.value()
        assert transport.value().endswith(b"s OK [READ-WRITE] SELECT completed\r\n"), transport.value()
        transport.clear()
        count = 1
        if behind:
            # Heard of on the bus while not idling: the view is marked behind.
            store.deliver(b"Subject: between\r\n\r\nmid\r\n", sender, [member])
            count += 1
            assert transport.value() == b""

        service.hold = "mailbox_changes" if behind else "mailbox_marks"
        proto.dataReceived(b"i IDLE\r\n")
        assert len(service.held) == 1, "the catch-up did not read"
        # The catch-up has read; now a message commits, and the bus tells
        # the session before the catch-up's answer is back.
        store.deliver(b"Subject: second\r\n\r\ntwo\r\n", sender, [member])
        d, result = service.held.pop()
        d.callback(result)
        assert transport.value().startswith(b"+ idling\r\n"), transport.value()
        assert b"* %d EXISTS\r\n" % (count + 1) in transport.value(), transport.value()

        # And the session still idles as it should: DONE ends it.
        proto.dataReceived(b"DONE\r\n")
        assert transport.value().endswith(b"i OK IDLE terminated\r\n"), transport.value()
    finally:
        unsubscribe()
        proto.connectionLost(Exception("test over"))  # type: ignore[arg-type]


def test_a_failed_idle_catch_up_leaves_no_idle_behind(store: Store, people: dict[str, str]) -> None:
    """If the catch-up's read fails, IDLE answers with an error and the
    session reads commands again (it is not left waiting for DONE)."""
    member = people["member"]
    proto, transport, _ = make()
    service = HeldService(store)
    proto.service = service
    proto.account = Account(store.login(member, PASSWORD), service)
    proto.state = "auth"
    proto.dataReceived(b"s SELECT INBOX\r\n")
    assert transport.value().endswith(b"s OK [READ-WRITE] SELECT completed\r\n"), transport.value()
    # Something for the catch-up to read: the view is behind the store.
    store.deliver(b"Subject: x\r\n\r\nx\r\n", people["colleague"], [member])
    proto.mbox.dirty = True
    transport.clear()
    service.hold = "mailbox_changes"
    proto.dataReceived(b"i IDLE\r\n")
    d, _ = service.held.pop()
    d.errback(OSError("disk I/O error"))
    out = transport.value()
    assert out.startswith(b"+ idling\r\n") and b"i NO" in out or b"i BAD" in out, out
    transport.clear()
    proto.dataReceived(b"n NOOP\r\n")
    assert transport.value().endswith(b"n OK NOOP completed\r\n"), transport.value()
    proto.connectionLost(Exception("test over"))  # type: ignore[arg-type]
