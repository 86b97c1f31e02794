"""The CLI of key recovery and emergency access (docs/recovery.md):

    postvault escrow status
    postvault escrow export EMAIL --out FILE
    postvault recover EMAIL --escrow-file FILE|- [--password-stdin]
    postvault recover EMAIL --reset-without-escrow [--yes] [--password-stdin]
    postvault emergency grant EMAIL --person NAME --reason TEXT --hours N --escrow-file FILE|-
    postvault emergency list
    postvault emergency revoke ID

A decrypted escrow file holds an account's private key. Postvault never
writes one; it reads it (``-``: from stdin, so that it need not touch a
disk at all: ``gpg --decrypt ... | postvault recover ...``) and says to
delete a file it was given.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from ..conf.load import load_config
from ..conf.schema import Config
from ..errors import InvalidInput
from ..home import open_store, policy_path, resolve_home
from ..notices.links import sign_in_route
from ..notices.security import notify_emergency, notify_recovered, notify_reset
from ..policy.load import load_policy
from ..policy.passwords import password_problem
from ..store.api import Store
from ..store.escrow import MAX_ESCROW_SIZE
from ..store.types import now

AddHome = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def add_parsers(sub: argparse._SubParsersAction, with_home: AddHome) -> None:  # type: ignore[type-arg]
    """Register ``escrow``, ``recover`` and ``emergency`` on the main parser."""
    escrow = sub.add_parser("escrow", help="recovery escrow: the accounts' keys, encrypted to the officers' keys")
    escrow_sub = escrow.add_subparsers(dest="escrow_command", required=True, metavar="SUBCOMMAND")
    p = with_home(escrow_sub.add_parser("status", help="which accounts have a current escrow"))
    p.set_defaults(func=cmd_escrow_status)
    p = with_home(escrow_sub.add_parser("export", help="write an account's escrow (OpenPGP, still encrypted) "
                                                       "for the recovery officer"))
    p.add_argument("email")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (not overwritten); - for stdout")
    p.set_defaults(func=cmd_escrow_export)

    p = with_home(sub.add_parser(
        "recover", help="reset a forgotten password: with the officer's decrypted escrow (mail stays "
                        "readable) or without (the account's mail is lost)"))
    p.add_argument("email")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--escrow-file", metavar="FILE",
                     help="the escrow as the officer decrypted it with gpg; - reads it from stdin (recommended: "
                          "nothing lands on disk)")
    how.add_argument("--reset-without-escrow", action="store_true",
                     help="new key pair: every message of the account becomes unreadable and is deleted")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the new password from stdin (after the escrow line, with --escrow-file -)")
    p.add_argument("--yes", action="store_true", help="with --reset-without-escrow: do not ask to confirm")
    p.set_defaults(func=cmd_recover)

    emergency = sub.add_parser("emergency", help="break-glass: time-limited read-only access for a named person")
    emergency_sub = emergency.add_subparsers(dest="emergency_command", required=True, metavar="SUBCOMMAND")
    p = with_home(emergency_sub.add_parser("grant", help="give a named person read access to one account"))
    p.add_argument("email")
    p.add_argument("--person", required=True, help="who gets access (name and/or address), for the audit log")
    p.add_argument("--reason", required=True,
                   help="why, for the audit log (no patient details: the audit log holds no PHI)")
    p.add_argument("--hours", required=True, type=float, help="how long ([recovery] emergency_max_hours at most)")
    p.add_argument("--escrow-file", required=True, metavar="FILE", help="the decrypted escrow; - for stdin")
    p.set_defaults(func=cmd_emergency_grant)
    p = with_home(emergency_sub.add_parser("list", help="every emergency grant and its state"))
    p.set_defaults(func=cmd_emergency_list)
    p = with_home(emergency_sub.add_parser("revoke", help="end an emergency grant now"))
    p.add_argument("grant_id", metavar="ID")
    p.set_defaults(func=cmd_emergency_revoke)


# -- helpers ------------------------------------------------------------------


def _open(args: argparse.Namespace) -> tuple[Path, Config, Store]:
    home = resolve_home(args.home)
    config = load_config(home)
    return home, config, open_store(config)


def read_escrow(arg: str) -> bytes:
    """The decrypted escrow: a file, or the first line of stdin for ``-``."""
    if arg == "-":
        data = sys.stdin.buffer.readline(MAX_ESCROW_SIZE + 1)
        if not data.strip():
            raise InvalidInput("no escrow on stdin; pipe in the output of gpg --decrypt")
        return data
    path = Path(arg)
    try:
        if path.stat().st_size > MAX_ESCROW_SIZE:
            raise InvalidInput(f"{path} is not a decrypted Postvault escrow file (too large)")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror}") from None


def _terminal_line(prompt: str) -> str:
    """One line typed at the controlling terminal (not stdin, which may
    carry the escrow or a password)."""
    try:
        with open("/dev/tty", "r+", encoding="utf-8") as tty:
            tty.write(prompt)
            tty.flush()
            return tty.readline().rstrip("\r\n")
    except OSError:
        raise InvalidInput("no terminal to confirm at; pass --yes to confirm in a script") from None


def read_new_password(from_stdin: bool, home: Path, user_inputs: list[str]) -> str:
    """The new password: a line of stdin, or asked twice at the terminal;
    checked by the password policy of policy.toml."""
    if from_stdin:
        password = sys.stdin.buffer.readline().decode("utf-8", "replace").rstrip("\r\n")
    else:
        try:
            open("/dev/tty").close()
        except OSError:
            raise InvalidInput("no terminal to ask for the new password; pass --password-stdin") from None
        password = getpass.getpass("New password: ")
        if getpass.getpass("New password again: ") != password:
            raise InvalidInput("the two passwords differ")
    problem = password_problem(password, policy=load_policy(policy_path(home)).passwords, user_inputs=user_inputs)
    if problem:
        raise InvalidInput(problem)
    return password


# -- escrow -------------------------------------------------------------------


def cmd_escrow_status(args: argparse.Namespace) -> int:
    _home, _config, store = _open(args)
    try:
        states = store.escrow_states()
        keys = store.recovery_keys
    finally:
        store.close()
    for email, state in states.items():
        print(f"{email}\t{state}")
    counts = {s: sum(1 for v in states.values() if v == s) for s in ("current", "stale", "missing")}
    if keys is None:
        print(f"[recovery] keys is not set: no escrow is made; {counts['current'] + counts['stale']} "
              f"older escrow(s) kept")
    else:
        print(f"escrow to {keys.recipients}: {counts['current']} current, {counts['stale']} stale, "
              f"{counts['missing']} missing (made at each account's next login)")
    return 0


def cmd_escrow_export(args: argparse.Namespace) -> int:
    _home, _config, store = _open(args)
    try:
        export = store.export_escrow(args.email)
    finally:
        store.close()
    if args.out == "-":
        sys.stdout.buffer.write(export.blob)
        sys.stdout.flush()
        return 0
    try:
        with open(args.out, "xb") as f:  # the escrow is encrypted; still, never overwrite
            f.write(export.blob)
    except FileExistsError:
        raise InvalidInput(f"{args.out} already exists; choose another file") from None
    except OSError as exc:
        raise InvalidInput(f"{args.out}: cannot write: {exc.strerror}") from None
    note = "" if export.current else " (NOTE: made for other keys or an older key pair; it may not help)"
    print(f"escrow of {export.account} written to {args.out}, encrypted to {', '.join(export.recipients)}"
          f"{note}; give it to the recovery officer")
    return 0


# -- recover ------------------------------------------------------------------


def _delete_hint(arg: str) -> str:
    if arg == "-":
        return ""
    return (f"\nthe decrypted escrow file {arg} holds the account's private key: delete it now "
            f"(shred -u {arg})")


def cmd_recover(args: argparse.Namespace) -> int:
    home, config, store = _open(args)
    try:
        info = store.get_account(args.email)
        if args.escrow_file is not None:
            escrow = read_escrow(args.escrow_file)
            # Check the escrow before asking for a password, so a wrong file
            # fails at once; recover_account checks it again.
            store.check_escrow(info.email, escrow)
            password = read_new_password(args.password_stdin, home, [info.email, info.practice_name])
            store.recover_account(info.email, escrow, password)
            queued = notify_recovered(store, config, info.email)
            print(f"password of {info.email} reset with the recovery escrow; its mail stays readable; "
                  f"{queued} notice(s) to the owner queued{_delete_hint(args.escrow_file)}")
            return 0
        count = store.message_count(info.email)
        had = store.has_escrow(info.email)
        print(f"WARNING: resetting {info.email} without its recovery escrow makes a new key pair. "
              f"The {count} message(s) in its mailbox are encrypted to the old key, which nobody can open "
              "any more: they will be DELETED. Senders keep their own copies. This cannot be undone."
              + (" This account HAS an escrow: ask the recovery officer and use --escrow-file instead "
                 "to keep its mail." if had else ""), file=sys.stderr)
        if not args.yes:
            typed = _terminal_line(f"Type the account's address ({info.email}) to confirm: ")
            if typed.strip().lower() != info.email.lower():
                raise InvalidInput("not confirmed; nothing was changed")
        password = read_new_password(args.password_stdin, home, [info.email, info.practice_name])
        result = store.reset_account_keys(info.email, password)
        queued = notify_reset(store, config, info.email, result.deleted)
    finally:
        store.close()
    print(f"password of {info.email} reset with a new key pair; {result.deleted} message(s) deleted; "
          f"{queued} notice(s) to the owner queued")
    return 0


# -- emergency ----------------------------------------------------------------


def cmd_emergency_grant(args: argparse.Namespace) -> int:
    _home, config, store = _open(args)
    try:
        escrow = read_escrow(args.escrow_file)
        if not 0 < args.hours <= config.recovery.emergency_max_hours:
            raise InvalidInput(f"--hours must be more than 0 and at most {config.recovery.emergency_max_hours} "
                               "([recovery] emergency_max_hours)")
        cred = store.grant_emergency_access(
            args.email, escrow, person=args.person, reason=args.reason, duration=timedelta(hours=args.hours),
            max_duration=timedelta(hours=config.recovery.emergency_max_hours))
        queued = notify_emergency(store, config, cred.account, cred.person, cred.expires_at)
    finally:
        store.close()
    route = sign_in_route(config)
    server = f"IMAP server {route.hostname}" + (f" port {route.imap_port} ({route.imap_tls})" if route.imap_port else "")
    print(f"emergency access {cred.grant_id} granted to {cred.person}: read-only, {cred.account}, "
          f"until {cred.expires_at:%Y-%m-%d %H:%M:%S} UTC; {queued} notice(s) to the owner queued")
    print(f"{server}; user name: {cred.username}")
    print(f"password (shown once, not stored anywhere): {cred.password}")
    print(f"end it early with: postvault emergency revoke {cred.grant_id}{_delete_hint(args.escrow_file)}")
    return 0


def cmd_emergency_list(args: argparse.Namespace) -> int:
    _home, _config, store = _open(args)
    try:
        grants = store.emergency_grants()
    finally:
        store.close()
    at = now()
    for g in grants:
        used = f"first used {g.first_used_at:%Y-%m-%d %H:%M}" if g.first_used_at else "never used"
        print(f"{g.grant_id}\t{g.state(at)}\t{g.account}\t{g.person}\tuntil {g.expires_at:%Y-%m-%d %H:%M} UTC"
              f"\t{used}\tby {g.created_by}")
    if not grants:
        print("no emergency grants")
    return 0


def cmd_emergency_revoke(args: argparse.Namespace) -> int:
    _home, _config, store = _open(args)
    try:
        info = store.revoke_emergency_access(args.grant_id)
    finally:
        store.close()
    print(f"emergency access {info.grant_id} of {info.person} to {info.account} revoked")
    return 0
