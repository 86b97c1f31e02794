"""The logged-in account (Twisted's ``IAccount`` avatar) and its folders.

Folder names go through ``policy.folders`` every time, so a client's
"Sent Items" opens Sent and policy.toml decides which user folders exist
(RFC 6154 special-use attributes mark the canonical ones).

Invariants:
- Every method that touches the store returns a Deferred from the
  service's thread pool; nothing here blocks the reactor. Twisted calls
  ``create``/``delete``/``rename``/``subscribe`` synchronously and treats a
  Deferred as success (twisted#7360-style gaps, see the guide), so our
  server calls the ``*_async`` variants instead and the synchronous
  interface methods only refuse.
- The ``AccountSession`` (with the unwrapped private key) lives in this
  object only, for the life of the connection; ``logout`` drops it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.mail import imap4
from zope.interface import implementer

from ..policy import folders
from ..store.types import AccountSession, ContentKeyCache, MailboxInfo, MailboxState
from .mailbox import SelectedMailbox

T = TypeVar("T")


class IMAPNo(Exception):
    """A tagged NO: ``code`` (RFC 5530, without brackets) and public text."""

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    @property
    def response(self) -> bytes:
        body = f"[{self.code}] {self.text}" if self.code else self.text
        return body.encode("utf-8", "replace")


def list_pattern(ref: str, pattern: str) -> re.Pattern[str]:
    """RFC 3501 §6.3.8: reference + pattern; ``*`` matches anything, ``%``
    anything but the delimiter. INBOX matches case-insensitively (§5.1)."""
    full = ref + pattern if not pattern.startswith(folders.DELIMITER) else pattern
    out = []
    for piece in re.split(r"([*%])", full):
        if piece == "*":
            out.append(".*")
        elif piece == "%":
            out.append(f"[^{re.escape(folders.DELIMITER)}]*")
        else:
            out.append(re.escape(piece))
    return re.compile("".join(out) + r"\Z", re.S)


def matches(pattern: re.Pattern[str], name: str) -> bool:
    if pattern.match(name):
        return True
    # "inbox" and "INBOX" are one mailbox.
    return name == folders.INBOX and bool(pattern.match("inbox") or pattern.match("Inbox"))


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class Account:
    """One logged-in account."""

    def __init__(self, session: AccountSession, service: Any) -> None:
        self.session = session
        self.service = service  # postvault.imapd.service.ServiceContext
        self.logged_out = False
        # Content keys this connection unwrapped (see ContentKeyCache for
        # why holding them beside the private key is no weaker).
        self.keys = ContentKeyCache()

    @property
    def email(self) -> str:
        return self.session.email

    @property
    def role(self) -> str:
        return self.session.role

    @property
    def store(self) -> Any:
        return self.service.store

    def run(self, f: Callable[..., T], *args: Any, **kw: Any) -> defer.Deferred[T]:
        return self.service.run(f, *args, **kw)

    def logout(self) -> None:
        self.logged_out = True
        self.keys.clear()

    # -- names --------------------------------------------------------------

    def resolve(self, name: str) -> folders.FolderName:
        return folders.resolve_folder(name, self.service.policy)

    def canonical(self, name: str) -> str:
        """The folder ``name`` opens, or IMAPNo with the policy's reason."""
        resolved = self.resolve(name)
        if not resolved.allowed:
            d = resolved.decision
            raise IMAPNo(d.text, d.imap_code or "NONEXISTENT")
        return resolved.name

    # -- the store, asynchronously ----------------------------------------------

    def mailboxes(self) -> defer.Deferred[list[MailboxInfo]]:
        return self.run(self.store.list_mailboxes, self.session)

    def state(self, canonical: str, with_flags: bool = False) -> defer.Deferred[MailboxState]:
        """The mailbox as SELECT and STATUS report it; the first UID that
        arrived since start-up is asked for only while no session of this
        process has claimed the mailbox's \\Recent (see RecentClaims).
        ``with_flags``: every message's flags too, from the same read."""
        claims = self.service.recent
        since = None if claims.claimed(self.session.account_id, canonical) else claims.started
        if with_flags:
            return self.run(self.store.mailbox_state, self.session, canonical, since, with_flags=True)
        return self.run(self.store.mailbox_state, self.session, canonical, since)

    async def open(self, canonical: str, writable: bool) -> SelectedMailbox:
        """SELECT/EXAMINE: one read of the mailbox's state, one recent claim.
        A read-only session (emergency access) gets EXAMINE whatever it
        asked for."""
        writable = writable and not self.session.read_only
        state = await self.state(canonical, with_flags=True)
        claims = self.service.recent
        if writable:
            first = claims.claim(self.session.account_id, state)
        else:
            first = claims.peek(self.session.account_id, state)
        box = SelectedMailbox(state, writable, first)
        if state.flags is not None:
            # Read with the UIDs: no second read of every row at the first
            # FETCH FLAGS, STORE or SEARCH.
            box.load_flags(state.flags)
        return box

    async def status(self, canonical: str, items: list[str]) -> list[tuple[str, int]]:
        """STATUS (RFC 3501 §6.3.10) plus APPENDLIMIT (RFC 7889 §3)."""
        state = await self.state(canonical)
        box = state.mailbox
        recent_from = self.service.recent.peek(self.session.account_id, state)
        out = []
        for item in items:
            if item == "MESSAGES":
                out.append((item, state.exists))
            elif item == "RECENT":
                out.append((item, state.exists - bisect.bisect_left(state.uids, recent_from)))
            elif item == "UIDNEXT":
                out.append((item, box.uidnext))
            elif item == "UIDVALIDITY":
                out.append((item, box.uidvalidity))
            elif item == "UNSEEN":
                out.append((item, state.unseen))
            elif item == "APPENDLIMIT":
                out.append((item, self.service.policy.attachments.max_message_size))
            else:
                raise imap4.IllegalClientResponse(item)
        return out

    # -- twisted.mail.imap4.IAccount ------------------------------------------
    # The server never calls these synchronously (see the module docstring);
    # they exist so the avatar satisfies the interface Twisted's cred expects.

    def addMailbox(self, name: str, mbox: object = None) -> None:
        raise imap4.MailboxException("Use CREATE.")

    def create(self, pathspec: str) -> bool:
        raise imap4.MailboxException("CREATE is handled asynchronously.")

    def select(self, name: str, rw: bool = True) -> defer.Deferred[SelectedMailbox]:
        return defer.Deferred.fromCoroutine(self.open(self.canonical(name), rw))

    def delete(self, name: str) -> None:
        raise imap4.MailboxException("DELETE is handled asynchronously.")

    def rename(self, oldname: str, newname: str) -> None:
        raise imap4.MailboxException("RENAME is handled asynchronously.")

    def isSubscribed(self, name: str) -> bool:
        # Answered from the store by LSUB (server.py); Twisted never asks.
        return True

    def subscribe(self, name: str) -> None:
        raise imap4.MailboxException("SUBSCRIBE is handled asynchronously.")

    def unsubscribe(self, name: str) -> None:
        raise imap4.MailboxException("UNSUBSCRIBE is handled asynchronously.")

    def listMailboxes(self, ref: str, wildcard: str) -> defer.Deferred[list[MailboxInfo]]:
        pattern = list_pattern(ref, wildcard)
        return self.mailboxes().addCallback(lambda boxes: [b for b in boxes if matches(pattern, b.name)])

    # -- INamespacePresenter (RFC 2342) ----------------------------------------

    def getPersonalNamespaces(self) -> list[list[str]]:
        return [["", folders.DELIMITER]]

    def getSharedNamespaces(self) -> None:
        return None

    def getOtherNamespaces(self) -> None:
        return None

    def getUserNamespaces(self) -> None:
        return None
