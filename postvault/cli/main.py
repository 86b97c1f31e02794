"""Entry point of the ``postvault`` command: argument parsing and the one
place where our errors become a one-line message and an exit status."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import PostvaultError
from . import backup_cmd, commands, fsck_cmd, recovery_cmd
from .audit_cmd import add_audit_commands, audited

log = logging.getLogger("postvault.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postvault", description="Postvault secure mail server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_home(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--home", help="home folder (default: $POSTVAULT_HOME, then ./postvault-home)")
        return p

    p = with_home(sub.add_parser("init", help="create a home folder: config, development CA and certificates, database"))
    p.add_argument("--hostname", default="mail.example.test", help="the server's DNS name (default: %(default)s)")
    p.set_defaults(func=commands.cmd_init)

    p = with_home(sub.add_parser("serve", help="run every service until SIGTERM (SIGHUP reloads policy and certificates)"))
    p.set_defaults(func=commands.cmd_serve)

    p = sub.add_parser("demo", help="try Postvault: a demo home with two accounts on loopback ports, then serve")
    p.add_argument("--home", default=None, help="demo home folder (default: ./postvault-demo)")
    p.set_defaults(func=commands.cmd_demo)

    config = sub.add_parser("config", help="inspect the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    p = with_home(config_sub.add_parser("show", help="print the effective config (secrets masked)"))
    p.set_defaults(func=audited("config show", commands.cmd_config_show))

    member = sub.add_parser("member", help="manage member offices")
    member_sub = member.add_subparsers(dest="member_command", required=True, metavar="SUBCOMMAND")
    p = with_home(member_sub.add_parser("add", help="create a member account"))
    p.add_argument("email")
    p.add_argument("--practice", required=True, help="practice name")
    p.add_argument("--timezone", default="UTC", help="IANA time zone (default: %(default)s)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.set_defaults(func=audited("member add", commands.cmd_member_add))

    colleague = sub.add_parser("colleague", help="manage colleagues")
    colleague_sub = colleague.add_subparsers(dest="colleague_command", required=True, metavar="SUBCOMMAND")
    p = with_home(
        colleague_sub.add_parser("add", help="admin shortcut: invite and sign up a colleague in one step")
    )
    p.add_argument("email")
    p.add_argument("--member", required=True, help="the inviting member's address")
    p.add_argument("--practice", required=True, help="practice name")
    p.add_argument("--timezone", default="UTC", help="IANA time zone (default: %(default)s)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.set_defaults(func=audited("colleague add", commands.cmd_colleague_add))

    contacts = sub.add_parser("contacts", help="manage members' address books")
    contacts_sub = contacts.add_subparsers(dest="contacts_command", required=True, metavar="SUBCOMMAND")
    p = with_home(contacts_sub.add_parser(
        "import", help="import a PMS colleague export (CSV: name, practice, email) into a member's address book"))
    p.add_argument("file", metavar="FILE.csv", help="UTF-8 CSV, comma or semicolon separated, with a header row")
    p.add_argument("--member", required=True, help="the member whose address book it is")
    p.add_argument("--invite", action="store_true", help="invite every colleague in the file who has no account yet")
    p.set_defaults(func=audited("contacts import", commands.cmd_contacts_import))

    p = with_home(sub.add_parser("invite", help="invite a colleague: a pending account and a one-time sign-up link"))
    p.add_argument("email", help="the colleague's address")
    p.add_argument("--member", required=True, help="the inviting member's address")
    p.add_argument("--print-link", action="store_true",
                   help="print the sign-up link instead of emailing it (hand it over yourself; it is a secret)")
    p.add_argument("--member-password-stdin", action="store_true",
                   help="read the member's password from stdin: needed to issue a new link to a colleague "
                        "invited before, so that mail waiting for them carries over")
    p.add_argument("--discard-waiting-mail", action="store_true",
                   help="issue a new link without the member's password: a new key pair, and the mail "
                        "waiting for the colleague is deleted")
    p.set_defaults(func=audited("invite", commands.cmd_invite))

    policy = sub.add_parser("policy", help="check the policy file")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    p = with_home(policy_sub.add_parser("check", help="validate the policy file, listing every problem with its line"))
    p.add_argument("file", nargs="?", metavar="FILE", help="policy file (default: HOME/conf/policy.toml)")
    p.set_defaults(func=commands.cmd_policy_check)

    backup_cmd.add_parsers(sub)
    fsck_cmd.add_parser(sub)
    add_audit_commands(sub, with_home)
    recovery_cmd.add_parsers(sub, with_home)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Everything Postvault writes (database, blobs, keys, logs) is for its
    # own user only.
    os.umask(0o077)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PostvaultError as exc:
        print(f"postvault: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("postvault: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
