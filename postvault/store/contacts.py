"""Address books: a member's contacts (usually from its PMS export) and,
seen from the other side, the members a colleague has as contacts.

An address-book entry is what the member's office knows about a colleague
(name, practice, the PMS's extra columns); it points at the colleague's
account once there is one (pending or active). A colleague's contacts are
the members whose address book points at it, so several members inviting
the same colleague give one account whose contacts list all of them.

Nothing here is message content; names and practices are the member's own
data and stay readable to the server, like account names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session, sessionmaker

from ..errors import InvalidInput, NoSuchAccount
from . import audit
from .db import unit_of_work
from .fastread import FastSelect, snapshot
from .models import Account, AddressBookEntry
from .types import normalize_email, now

ContactOutcome = Literal["added", "updated", "unchanged"]


# Built once (see ``contacts``).
_ACCOUNT_ROLE = FastSelect(select(Account.id, Account.role).where(func.lower(Account.email) == bindparam("email")))
_MEMBER_BOOK = FastSelect(select(AddressBookEntry.email).where(AddressBookEntry.member_id == bindparam("account")))
_INVITED_BY = FastSelect(select(Account.email).join(AddressBookEntry, AddressBookEntry.member_id == Account.id)
                         .where(AddressBookEntry.colleague_id == bindparam("account")))


@dataclass(frozen=True)
class ContactRow:
    """One contact to put in an address book (already validated)."""

    email: str
    name: str = ""
    practice: str = ""
    # Columns of the PMS export we keep as they came (phone, specialty...).
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContactChange:
    email: str
    outcome: ContactOutcome
    # State of the colleague's account: "none" (not invited yet), "pending"
    # (invited, not signed up), "active"; what --invite needs to know.
    account_state: str


@dataclass(frozen=True)
class Contact:
    email: str
    name: str
    practice: str
    extra: dict[str, str]
    account_state: str  # none | pending | active | disabled


def _extra_json(extra: dict[str, str]) -> str:
    # sort_keys: the same columns always give the same text, so a re-import
    # of an unchanged file reports "unchanged".
    return json.dumps(extra, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class ContactsStore:
    """The address-book half of ``AccountStore`` (and so of ``Store``)."""

    _sessions: sessionmaker[Session]
    _account: Callable[[Session, str], Account]  # from AccountStore

    @staticmethod
    def _upsert_contact(
        s: Session,
        member: Account,
        email: str,
        name: str,
        practice: str,
        colleague: Account | None,
        extra: dict[str, str] | None = None,
    ) -> ContactOutcome:
        """Add or update one entry; empty values never erase known ones
        (an export without a practice column must not wipe it)."""
        if member.role != "member":
            raise InvalidInput(f"{member.email} is not a member; only members have an address book")
        stamp = now()
        entry = s.scalar(
            select(AddressBookEntry).where(
                AddressBookEntry.member_id == member.id, func.lower(AddressBookEntry.email) == email.lower()
            )
        )
        outcome: ContactOutcome = "unchanged"
        if entry is None:
            entry = AddressBookEntry(member_id=member.id, email=email, extra="{}", created_at=stamp, name="", practice="")
            s.add(entry)
            outcome = "added"
        new_extra = _extra_json(extra) if extra else entry.extra
        new_values = (name or entry.name, practice or entry.practice, new_extra,
                      colleague.id if colleague is not None else entry.colleague_id)
        if new_values != (entry.name, entry.practice, entry.extra, entry.colleague_id):
            entry.name, entry.practice, entry.extra, entry.colleague_id = new_values
            outcome = "updated" if outcome == "unchanged" else outcome
        if outcome != "unchanged":
            entry.updated_at = stamp
        return outcome

    def add_contact(self, member_email: str, colleague_email: str, name: str = "", practice: str = "") -> None:
        """Put a colleague in a member's address book (idempotent)."""
        colleague_email = normalize_email(colleague_email)
        with unit_of_work(self._sessions) as s:
            colleague = s.scalar(select(Account).where(func.lower(Account.email) == colleague_email.lower()))
            self._upsert_contact(s, self._account(s, member_email), colleague_email, name, practice, colleague)

    def import_contacts(
        self, member_email: str, rows: Sequence[ContactRow], *, actor: str = "admin"
    ) -> list[ContactChange]:
        """Add or update many contacts in ONE transaction (a PMS import).

        All or nothing: rows were validated before (bad ones never get
        here), so a failure now is the database's, and a half-applied
        import would be harder to reason about than none; running the
        import again is safe either way, since it is idempotent.
        """
        changes: list[ContactChange] = []
        with unit_of_work(self._sessions) as s:
            member = self._account(s, member_email)
            for row in rows:
                email = normalize_email(row.email)
                colleague = s.scalar(select(Account).where(func.lower(Account.email) == email.lower()))
                outcome = self._upsert_contact(s, member, email, row.name, row.practice, colleague, row.extra)
                state = colleague.state if colleague is not None else "none"
                changes.append(ContactChange(email, outcome, state))
            counts = {k: sum(c.outcome == k for c in changes) for k in ("added", "updated", "unchanged")}
            audit.record(
                s, "contacts.import", actor=actor, account=member.email,
                detail=" ".join(f"{k}={v}" for k, v in counts.items()),
            )
        return changes

    def address_book(self, member_email: str) -> list[Contact]:
        """A member's address book with each colleague's account state."""
        with self._sessions() as s:
            member = self._account(s, member_email)
            rows = s.execute(
                select(AddressBookEntry, Account.state)
                .outerjoin(Account, Account.id == AddressBookEntry.colleague_id)
                .where(AddressBookEntry.member_id == member.id)
                .order_by(func.lower(AddressBookEntry.email))
            )
            return [
                Contact(e.email, e.name, e.practice, json.loads(e.extra or "{}"), state or "none") for e, state in rows
            ]

    def contacts(self, email: str) -> list[str]:
        """A member's address book, or the members who invited a colleague."""
        # Core, not the ORM: the SMTP server reads this for every message.
        # On SQLite on the sqlite3 connection itself (fastread.py).
        with snapshot(self.engine) as conn:  # type: ignore[attr-defined]
            rows = _ACCOUNT_ROLE.rows(conn, {"email": email.strip().lower()})
            if not rows:
                raise NoSuchAccount(f"no account for {email.strip()}")
            found = rows[0]
            query = _MEMBER_BOOK if found.role == "member" else _INVITED_BY
            return sorted(r[0] for r in query.rows(conn, {"account": found.id}))
