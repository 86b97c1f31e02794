"""``postvault fsck``: one line per problem (ids only, never content), a
summary line, exit 1 while a problem is left; the checks are in
``postvault.store.fsck``."""

from __future__ import annotations

import argparse

from ..conf.load import load_config
from ..home import open_store, resolve_home
from ..store.fsck import fsck


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``fsck`` on the main parser."""
    p = sub.add_parser("fsck", help="check every sealed blob and the message index (no keys, no content)")
    p.add_argument("--home", help="home folder (default: $POSTVAULT_HOME, then ./postvault-home)")
    p.add_argument("--quick", action="store_true",
                   help="check blobs' presence and layout only, not their SHA-256 (reads no blob in full)")
    p.add_argument("--repair", action="store_true",
                   help="delete orphan blobs and stale temporary files older than an hour; report the rest")
    p.set_defaults(func=cmd_fsck)


def cmd_fsck(args: argparse.Namespace) -> int:
    config = load_config(resolve_home(args.home))
    store = open_store(config)
    try:
        report = fsck(store, config.store.blobs, quick=args.quick, repair=args.repair)
        if report.findings:
            store.record_event("admin.fsck", actor="admin", protocol="cli",
                               detail=f"problems={sum(not f.repaired for f in report.findings)} "
                                      f"repaired={sum(f.repaired for f in report.findings)}")
    finally:
        store.close()
    for finding in report.findings:
        print(finding.line())
    for note in report.notes:
        print(f"note: {note}")
    print(report.summary())
    return 0 if report.ok else 1
