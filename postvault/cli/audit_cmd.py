"""``postvault audit ...``: verify the chain, export for compliance, prune
by retention, sign a checkpoint; and ``audited``, which records every admin
command that changes state in the audit log (``admin.command``).

Output never carries content: events hold ids, addresses, counts and rule
names only (see store/audit.py), and this module adds nothing else.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.exc import SQLAlchemyError

from ..conf.load import load_config
from ..errors import AuditChainBroken, InvalidInput, PostvaultError
from ..home import open_store, resolve_home
from ..progress import Progress
from ..store.api import Store
from ..store.auditlog import EXPORT_FIELDS
from ..store.auditsign import parse_checkpoint_line

log = logging.getLogger("postvault.cli")
Command = Callable[[argparse.Namespace], int]


def admin_actor() -> str:
    """Who ran the command, as far as the OS says ("admin" if it won't)."""
    try:
        return f"admin:{getpass.getuser()}"
    except (KeyError, OSError):
        return "admin"


def audited(name: str, func: Command) -> Command:
    """``func``, and then an ``admin.command`` event naming the command, the
    account it concerned and how it ended (never its file arguments)."""

    def run(args: argparse.Namespace) -> int:
        result = "error"
        try:
            code = int(func(args) or 0)
            result = "ok" if code == 0 else f"exit={code}"
            return code
        except PostvaultError as exc:
            result = f"error={type(exc).__name__}"
            raise
        finally:
            _record_command(args, name, result)

    run.__doc__ = func.__doc__
    return run


def _record_command(args: argparse.Namespace, name: str, result: str) -> None:
    account = next((getattr(args, a) for a in ("email", "member", "account") if getattr(args, a, None)), None)
    try:
        store = open_store(load_config(resolve_home(getattr(args, "home", None))))
    except PostvaultError:
        return  # no home to record in: the command said why it failed
    try:
        store.record_event("admin.command", actor=admin_actor(), account=account, protocol="cli",
                           detail=f"command={name} result={result}")
    except SQLAlchemyError:
        print(f"postvault: warning: could not record '{name}' in the audit log", file=sys.stderr)
    finally:
        store.close()


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[tuple[Path, Any, Store]]:
    home = resolve_home(args.home)
    config = load_config(home)
    store = open_store(config)
    try:
        yield home, config, store
    finally:
        store.close()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """One summary line and exit 0, or the first broken entry and exit 1."""
    anchors = []
    for name in args.anchor or ():
        path = Path(name)
        try:
            lines = path.read_text("utf-8").splitlines()
        except OSError as exc:
            raise InvalidInput(f"--anchor {path}: {exc.strerror}") from None
        anchors += [(f"{path.name} line {n}", parse_checkpoint_line(line, f"{path}:{n}"))
                    for n, line in enumerate(lines, 1) if line.strip()]
    with _store(args) as (home, _config, store):
        with Progress("audit verify", store.audit_count(), unit="events") as progress:
            report = store.audit_verify(home, anchors=anchors, progress=progress)
        if not report.ok:
            raise AuditChainBroken(report.summary())
        if args.checkpoint:
            store.audit_checkpoint(home, "manual", only_if_new=True)
    print(report.summary())
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    """Sign the chain's head now and print the checkpoint as one line: an
    auditor keeps it, and ``audit verify --anchor FILE`` checks it later."""
    with _store(args) as (home, _config, store):
        info = store.audit_checkpoint(home, "manual")
    assert info is not None
    print(info.line)
    return 0


def cmd_audit_prune(args: argparse.Namespace) -> int:
    with _store(args) as (home, config, store):
        days = args.older_than_days if args.older_than_days is not None else config.audit.retention_days
        if days < 0:
            raise InvalidInput("--older-than-days must be 0 or more")
        if days == 0:
            print("audit retention_days is 0: every event is kept, nothing pruned")
            return 0
        cutoff = datetime.now(timezone.utc) - timedelta(days=days)
        with Progress("audit prune: verify", store.audit_count(until=cutoff), unit="events") as progress:
            result = store.audit_prune(home, cutoff, actor=admin_actor(), protocol="cli", progress=progress)
    print(f"pruned {result.deleted} audit events older than {days} days; the chain still verifies")
    return 0


def parse_when(text: str, *, end: bool) -> datetime:
    """A date (YYYY-MM-DD: the start of that day, or with ``end`` the start
    of the next, so --until DATE includes that day) or an ISO date and time
    (UTC unless it says otherwise)."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=1 if end else 0), time(), timezone.utc)
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{text!r} is not a date (YYYY-MM-DD) or date and time (YYYY-MM-DDTHH:MM)") from None
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    # Spreadsheets run a cell that starts like a formula; client names and
    # addresses in events come from outside (OWASP "CSV injection").
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def write_export(rows: Iterator[dict[str, Any]], out: TextIO, fmt: str, progress: Progress | None = None) -> int:
    count = 0
    writer = csv.writer(out, lineterminator="\r\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(EXPORT_FIELDS)
    for row in rows:
        if writer is not None:
            writer.writerow([_cell(row[f]) for f in EXPORT_FIELDS])
        else:
            out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        count += 1
        if progress is not None:
            progress.advance()
    return count


def cmd_audit_export(args: argparse.Namespace) -> int:
    """Events as JSON lines or CSV (RFC 4180), to --out or standard output."""
    since = parse_when(args.since, end=False) if args.since else None
    until = parse_when(args.until, end=True) if args.until else None
    if since is not None and until is not None and until <= since:
        raise InvalidInput("--until is not after --since")
    with _store(args) as (_home, _config, store):
        rows = store.audit_events(since, until, args.account)
        if args.out is None:
            count = write_export(rows, sys.stdout, args.format)
            sys.stdout.flush()
            print(f"exported {count} audit events", file=sys.stderr)
            return 0
        total = store.audit_count(since, until, args.account)
        out_path = Path(args.out)
        try:
            # newline="": the csv module writes its own CRLF (RFC 4180).
            with open(out_path, "x" if not args.force else "w", encoding="utf-8", newline="") as out, \
                    Progress("audit export", total, unit="events") as progress:
                count = write_export(rows, out, args.format, progress)
        except FileExistsError:
            raise InvalidInput(f"{out_path} exists; pass --force to replace it") from None
        except OSError as exc:
            raise InvalidInput(f"cannot write {out_path}: {exc.strerror}") from None
    print(f"exported {count} audit events to {out_path}")
    return 0


def add_audit_commands(sub: Any, with_home: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """``postvault audit ...`` on the main parser's subcommands."""
    audit = sub.add_parser("audit", help="check, export and prune the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")

    p = with_home(audit_sub.add_parser(
        "verify", help="check the whole hash chain and its signed checkpoints; name the first broken entry"))
    p.add_argument("--anchor", action="append", metavar="FILE",
                   help="checkpoint lines kept elsewhere (from `audit checkpoint`) that the log must still hold")
    p.add_argument("--checkpoint", action="store_true", help="if intact, sign the current head afterwards")
    p.set_defaults(func=audited("audit verify", cmd_audit_verify))

    p = with_home(audit_sub.add_parser(
        "export", help="events as JSON lines or CSV for a compliance officer (never message content)"))
    p.add_argument("--since", metavar="DATE", help="from this date (YYYY-MM-DD) or time (YYYY-MM-DDTHH:MM, UTC)")
    p.add_argument("--until", metavar="DATE", help="up to and including this date, or before this time")
    p.add_argument("--account", metavar="EMAIL", help="only events about or by this account")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="default: %(default)s")
    p.add_argument("--out", metavar="FILE", help="write here (made readable by you only) instead of stdout")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=audited("audit export", cmd_audit_export))

    p = with_home(audit_sub.add_parser(
        "prune", help="delete events older than [audit] retention_days; the rest stays verifiable"))
    p.add_argument("--older-than-days", type=int, metavar="DAYS", help="instead of retention_days")
    p.set_defaults(func=audited("audit prune", cmd_audit_prune))

    p = with_home(audit_sub.add_parser(
        "checkpoint", help="sign the chain's head now and print it as one line for an auditor to keep"))
    p.set_defaults(func=audited("audit checkpoint", cmd_audit_checkpoint))
