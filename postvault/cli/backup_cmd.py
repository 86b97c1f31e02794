"""``postvault backup`` and ``postvault restore``: argument handling and
the lines an admin reads; the work is in ``postvault.backup``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backup.make import make_backup
from ..backup.restore import restore_backup
from ..home import resolve_home


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``backup`` and ``restore`` on the main parser."""
    p = sub.add_parser("backup", help="write a consistent backup of the home folder while the server runs")
    p.add_argument("--home", help="home folder (default: $POSTVAULT_HOME, then ./postvault-home)")
    p.add_argument("--out", required=True, metavar="FILE", help="backup file to write (replaced if it exists)")
    p.add_argument("--encrypt-to", metavar="KEY",
                   help="encrypt the backup to this OpenPGP public key: a key file, or a fingerprint in the keyring")
    p.add_argument("--gnupg-home", metavar="DIR", help="GnuPG home of that keyring (default: $GNUPGHOME, ~/.gnupg)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="rebuild a home folder from a backup file (encrypted ones through gpg)")
    p.add_argument("file", metavar="FILE", help="the backup file")
    p.add_argument("--home", required=True, help="the folder to restore into; it must not exist or be empty")
    p.add_argument("--gnupg-home", metavar="DIR",
                   help="GnuPG home holding the secret key of an encrypted backup (default: $GNUPGHOME, ~/.gnupg)")
    p.set_defaults(func=cmd_restore)


def cmd_backup(args: argparse.Namespace) -> int:
    result = make_backup(resolve_home(args.home), Path(args.out), encrypt_to=args.encrypt_to,
                         gnupg_home=Path(args.gnupg_home) if args.gnupg_home else None)
    m = result.manifest
    for note in result.notes:
        print(f"note: {note}")
    how = "encrypted to the OpenPGP key" if result.encrypted else "not encrypted"
    blobs = "blobs inside the database" if m.blobs == "database" else f"{m.counts.get('blobs', 0)} blobs"
    print(f"backup written to {result.path}: {m.counts.get('accounts', 0)} accounts, "
          f"{m.counts.get('messages', 0)} messages, {blobs}, {m.counts.get('files', 0)} other files; {how}")
    status = 0
    if m.missing_blobs:
        print(f"warning: {len(m.missing_blobs)} blob(s) the database refers to were already missing from the store; "
              "run `postvault fsck`")
        status = 1
    if m.damaged_blobs:
        print(f"warning: {len(m.damaged_blobs)} blob(s) no longer match their SHA-256 id and were copied as found; "
              "run `postvault fsck`")
        status = 1
    return status


def cmd_restore(args: argparse.Namespace) -> int:
    result = restore_backup(Path(args.file), Path(args.home),
                            gnupg_home=Path(args.gnupg_home) if args.gnupg_home else None)
    m = result.manifest
    print(f"restored {result.home} from the backup of {m.created_at} ({m.hostname}): "
          f"{m.counts.get('accounts', 0)} accounts, {m.counts.get('messages', 0)} messages, {result.blobs} blobs"
          + (", decrypted with GnuPG" if result.encrypted else "")
          + f"; start it with `postvault serve --home {result.home}`")
    return 0
