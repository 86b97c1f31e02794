"""What the account pages change besides passwords and invitations: a
member office's own attachment allowances, account and mailbox details, and
address-book edits; and what a sign-up link says about itself before it is
used.

Office allowances (issue 6, "request this file be allowed"). The admin's
policy.toml sets what a member may lift: ``office_bounds`` is the blocked
list of ``[attachments]`` minus ``NEVER_ALLOWABLE``, the program and script
types that content sniffing exists to catch (PE/MZ, ELF, Mach-O, shebang
scripts, installers, shortcuts). A member picks from those bounds on its
office page; the rows here record the picks. The bounds are applied again
on every message (``conversation_allowances``), not only when a row is
written, so an admin who tightens policy.toml takes the lifted types away at
the next SIGHUP without touching the database. No allowance ever lifts
content sniffing: ``check_attachments`` refuses a program whatever its name.

Nothing here is message content; all of it stays readable to the server,
like account names (DESIGN.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal
from zoneinfo import available_timezones

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session, sessionmaker

from ..errors import InvalidInput, NoSuchAccount
from ..policy.schema import AttachmentPolicy, Policy
from . import audit
from .db import unit_of_work
from .fastread import FastSelect
from .models import Account, AddressBookEntry, Invitation, OfficeAllowance
from .types import normalize_email, now

# Types whose content is a program or a script: what sniff_content looks for
# (PE/MZ executables and libraries, ELF, Mach-O, "#!" scripts) and their
# installers and launchers. A member can never lift these, whatever
# policy.toml blocks; only the admin's own [offices."..."] table can name
# them, and even then sniffing refuses the content.
NEVER_ALLOWABLE: frozenset[str] = frozenset(
    """app appref-ms appx appxbundle apk bas bat bin cmd com cpl csh dex dll drv efi elf exe ex_ gadget hta inf
    jar jnlp js jse ksh lnk macho mjs msc msi msix msixbundle msp mst ocx pif pl ps1 ps1xml ps2 ps2xml psc1
    psc2 py pyc pyo pyw pyz pyzw reg scf scr sct sh shb shs so sys vb vbe vbs vxd ws wsc wsf wsh xbap xll""".split()
)
_EXTENSION = re.compile(r"[a-z0-9_-]{1,32}\Z")

LinkState = Literal["valid", "expired", "used", "revoked", "unknown"]


_ALLOWANCES = FastSelect(
    select(Account.email, OfficeAllowance.extension)
    .join(OfficeAllowance, OfficeAllowance.member_id == Account.id)
    .where(func.lower(Account.email).in_(bindparam("emails", expanding=True)), Account.role == "member")
)

@dataclass(frozen=True)
class SignupLink:
    """What a sign-up link is, without using it up."""

    state: LinkState
    colleague: str = ""  # the invited address (only for a link that exists)
    member: str = ""  # who to ask for a new link
    member_practice: str = ""
    expires_at: datetime | None = None


def office_bounds(attachments: AttachmentPolicy) -> frozenset[str]:
    """The extensions a member may allow for its conversations: what
    ``[attachments] blocked_extensions`` blocks (nothing else needs
    lifting), never a program type."""
    return frozenset(attachments.blocked_extensions) - NEVER_ALLOWABLE


def allowance_problem(extension: str, attachments: AttachmentPolicy) -> str | None:
    """Why a member may not allow ``extension`` (a sentence), or None."""
    if not _EXTENSION.match(extension):
        return f'"{extension}" is not a file extension (letters, digits, "_" and "-"; no dots)'
    if extension in NEVER_ALLOWABLE:
        return f'"{extension}" files are programs or scripts; they can never be allowed'
    if extension not in attachments.blocked_extensions:
        return f'"{extension}" files are not blocked by this server, so there is nothing to allow'
    return None


def parse_extensions(text: str) -> list[str]:
    """Extensions typed by a person: separated by commas, semicolons or
    spaces, with or without a leading dot, any case; order kept, no repeats."""
    out: list[str] = []
    for word in re.split(r"[\s,;]+", text.strip()):
        ext = word.strip().lower().removeprefix(".")
        if ext and ext not in out:
            out.append(ext)
    return out


def _aware(t: datetime) -> datetime:
    # SQLite returns naive datetimes; everything stored is UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _check_display(name: str, what: str) -> str:
    name = name.strip()
    if not name or not name.isprintable() or len(name) > 200:
        raise InvalidInput(f"{what} must be 1-200 printable characters")
    return name


class OfficesStore:
    """Mixed into ``Store``: see the module docstring."""

    _sessions: sessionmaker[Session]
    _account: Callable[[Session, str], Account]  # from AccountStore

    # -- office allowances --------------------------------------------------

    def office_allowances(self, members: Iterable[str]) -> dict[str, frozenset[str]]:
        """The stored allowances of ``members``, keyed by lower-cased
        address (members without any are left out). Not yet bounded by
        policy: see ``conversation_allowances``."""
        wanted = {m.strip().lower() for m in members}
        if not wanted:
            return {}
        out: dict[str, set[str]] = {}
        # Core, not the ORM: the SMTP server reads this for every message.
        # On SQLite on the sqlite3 connection itself (fastread.py).
        for email, ext in _ALLOWANCES.run(self.engine, {"emails": sorted(wanted)}):  # type: ignore[attr-defined]
            out.setdefault(email.lower(), set()).add(ext)
        return {k: frozenset(v) for k, v in out.items()}

    def conversation_allowances(self, members: Iterable[str], policy: Policy) -> frozenset[str]:
        """The extensions lifted for a message whose member offices are
        ``members``: each office's policy.toml exceptions, plus what it
        allowed itself on its office page within ``office_bounds``. What
        the SMTP handler passes to ``check_attachments``."""
        members = [m.lower() for m in members]
        bounds = office_bounds(policy.attachments)
        stored = self.office_allowances(members)
        lifted: set[str] = set()
        for member in members:
            lifted |= policy.office(member).allow_extensions
            lifted |= stored.get(member, frozenset()) & bounds
        return frozenset(lifted)

    def set_office_allowances(
        self, member: str, extensions: Iterable[str], *, actor: str, client_ip: str | None = None,
        protocol: str | None = None,
    ) -> tuple[frozenset[str], frozenset[str]]:
        """Replace a member's allowances with ``extensions`` (already
        checked against the bounds by the caller); audited. Returns
        (added, removed)."""
        wanted = frozenset(e.strip().lower().removeprefix(".") for e in extensions)
        for ext in wanted:
            if not _EXTENSION.match(ext) or ext in NEVER_ALLOWABLE:
                raise InvalidInput(f'"{ext}" cannot be allowed')
        with unit_of_work(self._sessions) as s:
            acct = self._account(s, member)
            if acct.role != "member" or acct.state != "active":
                raise InvalidInput("only an active member office has attachment settings")
            query = select(OfficeAllowance).where(OfficeAllowance.member_id == acct.id)
            rows = {r.extension: r for r in s.scalars(query)}
            added, removed = wanted - rows.keys(), rows.keys() - wanted
            for ext in removed:
                s.delete(rows[ext])
            for ext in sorted(added):
                s.add(OfficeAllowance(member_id=acct.id, extension=ext, created_at=now(), created_by=actor))
            if added or removed:
                # Extension names only: never a file name, never content.
                audit.record(
                    s, "office.allowances", actor=actor, account=acct.email, client_ip=client_ip, protocol=protocol,
                    detail=f"added={','.join(sorted(added)) or '-'} removed={','.join(sorted(removed)) or '-'} "
                           f"now={','.join(sorted(wanted)) or '-'}",
                )
            return frozenset(added), frozenset(removed)

    # -- account and mailbox details ------------------------------------------

    def update_account(
        self, email: str, *, practice_name: str | None = None, timezone_name: str | None = None, actor: str,
        client_ip: str | None = None, protocol: str | None = None,
    ) -> None:
        """Change an account's practice name and/or time zone; audited."""
        practice = _check_display(practice_name, "the practice name") if practice_name is not None else None
        if timezone_name is not None and timezone_name not in available_timezones():
            raise InvalidInput(f"unknown time zone {timezone_name!r}")
        with unit_of_work(self._sessions) as s:
            acct = self._account(s, email)
            changed = []
            if practice is not None and practice != acct.practice_name:
                acct.practice_name = practice
                changed.append("practice")
            if timezone_name is not None and timezone_name != acct.timezone:
                acct.timezone = timezone_name
                changed.append("timezone")
            if changed:
                acct.updated_at = now()
                audit.record(s, "account.update", actor=actor, account=acct.email, client_ip=client_ip,
                             protocol=protocol, detail="changed=" + ",".join(changed))

    def set_mailbox_name(
        self, email: str, name: str, *, actor: str, client_ip: str | None = None, protocol: str | None = None,
    ) -> None:
        """The display name others see for this mailbox; audited."""
        name = _check_display(name, "the mailbox name")
        with unit_of_work(self._sessions) as s:
            acct = self._account(s, email)
            if name != acct.mailbox_name:
                acct.mailbox_name = name
                acct.updated_at = now()
                audit.record(s, "account.mailbox-name", actor=actor, account=acct.email, client_ip=client_ip,
                             protocol=protocol)

    # -- address-book edits ---------------------------------------------------

    def edit_contact(self, member: str, email: str, *, name: str, practice: str, actor: str) -> None:
        """Set a contact's name and practice exactly (empty clears them,
        unlike an import, which never erases)."""
        for value in (name, practice):
            if len(value) > 200 or (value and not value.isprintable()):
                raise InvalidInput("names must be at most 200 printable characters")
        with unit_of_work(self._sessions) as s:
            entry = self._entry(s, member, email)
            entry.name, entry.practice, entry.updated_at = name.strip(), practice.strip(), now()
            audit.record(s, "contacts.edit", actor=actor, account=self._account(s, member).email)

    def remove_contact(self, member: str, email: str, *, actor: str) -> None:
        """Take a colleague out of a member's address book. The colleague's
        account stays (other members may know it; it keeps its mail)."""
        with unit_of_work(self._sessions) as s:
            entry = self._entry(s, member, email)
            s.delete(entry)
            audit.record(s, "contacts.remove", actor=actor, account=self._account(s, member).email)

    def _entry(self, s: Session, member: str, email: str) -> AddressBookEntry:
        acct = self._account(s, member)
        entry = s.scalar(
            select(AddressBookEntry).where(
                AddressBookEntry.member_id == acct.id,
                func.lower(AddressBookEntry.email) == normalize_email(email).lower(),
            )
        )
        if entry is None:
            raise NoSuchAccount(f"{email.strip()} is not in the address book")
        return entry

    # -- sign-up links ------------------------------------------------------------

    def signup_link(self, token: str) -> SignupLink:
        """What a sign-up link is (valid, expired, used, replaced, unknown)
        and whom to ask for a new one. Reads only; ``sign_up`` decides again
        when the form comes back."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, binascii.Error):
            return SignupLink("unknown")
        if len(raw) != 32:
            return SignupLink("unknown")
        with self._sessions() as s:
            inv = s.scalar(select(Invitation).where(Invitation.token_hash == hashlib.sha256(raw).digest()))
            if inv is None:
                return SignupLink("unknown")
            colleague = s.get(Account, inv.colleague_id)
            member = s.get(Account, inv.member_id)
            assert colleague is not None and member is not None
            expires = _aware(inv.expires_at)
            state: LinkState
            if inv.state == "used" or colleague.state != "pending":
                state = "used"
            elif inv.state != "pending":
                state = "revoked"
            elif expires <= now():
                state = "expired"
            else:
                state = "valid"
            return SignupLink(state, colleague.email, member.email, member.practice_name, expires)
