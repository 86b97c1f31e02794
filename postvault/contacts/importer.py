"""``postvault contacts import``: a PMS export into a member's address book,
with one report line per row and, if asked, invitations for the colleagues
who have no account yet.

Store side, one transaction for all good rows (``Store.import_contacts``):
bad rows are refused while parsing, before anything is written, so they
cost nothing; what is written is all or nothing, and running the same
import again is safe since it is idempotent. Invitations come after that
commit, one by one (each is its own transaction plus a queued email), so a
failing invitation leaves the address book imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..conf.schema import Config
from ..errors import InvalidInput, PostvaultError
from ..notices.hooks import invite_and_send
from ..store.api import Store
from . import csvfile


@dataclass
class ImportReport:
    lines: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {"added": 0, "updated": 0, "unchanged": 0, "invited": 0, "refused": 0}
    )

    @property
    def ok(self) -> bool:
        return self.counts["refused"] == 0

    def summary(self, path: Path) -> str:
        c = self.counts
        rows = c["added"] + c["updated"] + c["unchanged"] + c["refused"]
        verdict = "imported" if self.ok else "imported with refusals"
        return (f"{path.name}: {verdict}: {rows} rows: {c['added']} added, {c['updated']} updated, "
                f"{c['unchanged']} unchanged, {c['invited']} invited, {c['refused']} refused")


def import_file(
    store: Store, config: Config, path: Path, member: str, *, invite: bool = False, actor: str = "admin"
) -> ImportReport:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    parsed = csvfile.parse(data)
    changes = {c.email.lower(): c for c in store.import_contacts(member, parsed.contacts, actor=actor)}
    report = ImportReport()
    lines: list[tuple[int, str]] = [(r.row, f"refused: row {r.row}: {r.reason}") for r in parsed.refused]
    report.counts["refused"] += len(parsed.refused)
    for good in parsed.rows:
        email = good.contact.email
        if good.same_as is not None:
            report.counts["unchanged"] += 1
            lines.append((good.row, f"unchanged: row {good.row}: {email} (same as row {good.same_as})"))
            continue
        change = changes[email.lower()]
        report.counts[change.outcome] += 1
        text = f"{change.outcome}: row {good.row}: {email}"
        if change.account_state == "pending":
            text += " (invited earlier, not signed up yet)"
        elif change.account_state == "active":
            text += " (has an account)"
        elif invite:
            try:
                result = invite_and_send(store, config, member, email, actor=actor)
            except PostvaultError as exc:
                report.counts["refused"] += 1
                text = f"refused: row {good.row}: {email} is in the address book, but the invitation failed: {exc}"
            else:
                report.counts["invited"] += 1
                until = f" (link valid until {result.expires_at:%Y-%m-%d})" if result.expires_at else ""
                text = f"invited: row {good.row}: {email}, {change.outcome} in the address book{until}"
        lines.append((good.row, text))
    report.lines = [text for _, text in sorted(lines, key=lambda item: item[0])]
    return report
