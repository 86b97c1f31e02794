"""The CLI's subcommands. Each takes parsed arguments, does one job through
the home/store API, prints one line on success and returns an exit status."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path

from ..conf.load import load_config, show_config
from ..errors import InvalidInput
from ..home import init_home, open_store, policy_path, resolve_home
from ..policy.load import check_policy_file
from ..policy.load import load_policy
from ..policy.passwords import password_problem
from ..policy.schema import Policy


def cmd_init(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    config = init_home(home, args.hostname)
    print(f"created {home} for {config.hostname}; trust {home / 'certs' / 'ca.pem'} in test clients")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import serve  # the servers' imports are not needed by other commands

    return serve(resolve_home(args.home))


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import DEFAULT_HOME, instructions, prepare
    from ..serve import serve

    home = Path(args.home or DEFAULT_HOME).absolute()
    config, accounts = prepare(home)
    print(instructions(home, config, accounts), flush=True)
    return serve(home)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(show_config(load_config(resolve_home(args.home))), end="")
    return 0


def read_password(from_stdin: bool, policy: Policy, user_inputs: Sequence[str]) -> str:
    """One line of stdin, or asked twice at the terminal; checked by policy
    (length, and not guessable from the address or practice name)."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise InvalidInput("the two passwords differ")
    else:
        raise InvalidInput("no terminal to ask for a password; pass --password-stdin and pipe it in")
    problem = password_problem(password, policy=policy.passwords, user_inputs=user_inputs)
    if problem:
        raise InvalidInput(problem)
    return password


def cmd_member_add(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    config = load_config(home)
    password = read_password(args.password_stdin, load_policy(policy_path(home)), [args.email, args.practice])
    store = open_store(config)
    try:
        info = store.create_account(args.email, "member", args.practice, password, args.timezone)
    finally:
        store.close()
    print(f"member {info.email} added ({info.practice_name}, {info.timezone})")
    return 0


def cmd_colleague_add(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    config = load_config(home)
    password = read_password(args.password_stdin, load_policy(policy_path(home)), [args.email, args.practice])
    store = open_store(config)
    try:
        member = store.get_account(args.member)
        info = store.create_account(
            args.email, "colleague", args.practice, password, args.timezone, invited_by=member.email
        )
    finally:
        store.close()
    print(f"colleague {info.email} added ({info.practice_name}), in the contacts of {member.email}")
    return 0


def cmd_contacts_import(args: argparse.Namespace) -> int:
    """One line per row, then one summary line; exit 1 if a row was refused."""
    from ..contacts.importer import import_file

    config = load_config(resolve_home(args.home))
    path = Path(args.file)
    store = open_store(config)
    try:
        report = import_file(store, config, path, args.member, invite=args.invite)
    finally:
        store.close()
    for line in report.lines:
        print(line)
    print(report.summary(path), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def cmd_invite(args: argparse.Namespace) -> int:
    from ..notices.hooks import invite_and_send

    config = load_config(resolve_home(args.home))
    store = open_store(config)
    try:
        session = None
        if args.member_password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
            # The member's own key opens the escrow of the pending key pair
            # (see store.accounts, invitations); the password is not kept.
            session = store.login(args.member, password, protocol="cli")
        result = invite_and_send(
            store, config, args.member, args.email, member_session=session,
            discard_waiting_mail=args.discard_waiting_mail, send_email=not args.print_link,
        )
    finally:
        store.close()
    until = f"{result.expires_at:%Y-%m-%d %H:%M} UTC" if result.expires_at else ""
    how = "printed below, not emailed" if args.print_link else "emailed"
    if result.status == "invited":
        print(f"invited {result.colleague} for {result.member}; the link is valid until {until} ({how})")
    elif result.status == "reinvited":
        mail = (f"{result.discarded} waiting message(s) deleted" if result.discarded
                else f"{result.waiting} waiting message(s) carried over")
        print(f"new link for {result.colleague}, valid until {until} ({how}); the old link no longer works; {mail}")
    elif result.status == "already_pending":
        print(f"{result.colleague} was invited already and has not signed up yet (link valid until {until}); "
              f"in the address book of {result.member}. For a new link (the old one stops working) run again "
              "with --member-password-stdin")
    else:
        print(f"{result.colleague} already has an account; in the address book of {result.member}")
    if args.print_link and result.token is not None:
        from ..notices.links import signup_link

        print(signup_link(config, result.token))
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Every problem as FILE:LINE: key: ..., one per line (so editors can
    jump to them), and exit 1; or one OK line."""
    path = Path(args.file) if args.file else policy_path(resolve_home(args.home))
    problems = check_policy_file(path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"policy OK: {path}")
    return 0
