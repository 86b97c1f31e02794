"""``postvault demo``: everything a new user needs to try Postvault with a
real mail client, in one command.

It makes a home folder (default ``./postvault-demo``) if there is none, with
every service on an unprivileged loopback port, a demo member and a demo
colleague with generated passwords, prints the settings to type into
Thunderbird, and runs the server until Ctrl-C.

The generated passwords are kept in ``demo-accounts.txt`` (mode 0600) in the
home folder so that a second run can print them again: that is for a demo
only; real accounts are made with ``postvault member add``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .conf.load import load_config
from .conf.schema import Config
from .home import init_home, open_store

DEFAULT_HOME = "postvault-demo"
HOSTNAME = "localhost"
PORTS = {
    "listen.imaps": "127.0.0.1:10993",
    "listen.imap": "127.0.0.1:10143",
    "listen.submissions": "127.0.0.1:10465",
    "listen.submission": "127.0.0.1:10587",
    "listen.https": "127.0.0.1:10443",
}
MEMBER = ("office@demo-dental.test", "Demo Dental Office")
COLLEAGUE = ("doctor@demo-ortho.test", "Demo Orthodontics")
ACCOUNTS_FILE = "demo-accounts.txt"


def _password() -> str:
    # Four groups of random letters: long, unguessable, easy to type.
    return "-".join(secrets.token_urlsafe(6).replace("-", "x").replace("_", "y") for _ in range(4))


def prepare(home: Path) -> tuple[Config, list[tuple[str, str, str]]]:
    """The demo home (made if missing) and its accounts: (role, email, password)."""
    accounts_file = home / ACCOUNTS_FILE
    if not (home / "conf" / "postvault.toml").exists():
        config = init_home(home, HOSTNAME, PORTS)
        store = open_store(config)
        try:
            member_pw, colleague_pw = _password(), _password()
            store.create_account(MEMBER[0], "member", MEMBER[1], member_pw, actor="demo")
            store.create_account(COLLEAGUE[0], "colleague", COLLEAGUE[1], colleague_pw, invited_by=MEMBER[0],
                                 actor="demo")
        finally:
            store.close()
        fd = os.open(accounts_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"member {MEMBER[0]} {member_pw}\ncolleague {COLLEAGUE[0]} {colleague_pw}\n")
    accounts = []
    if accounts_file.exists():
        for line in accounts_file.read_text("utf-8").splitlines():
            role, email, password = line.split(" ", 2)
            accounts.append((role, email, password))
    return load_config(home), accounts


def instructions(home: Path, config: Config, accounts: list[tuple[str, str, str]]) -> str:
    """The exact settings to type into Thunderbird (and other clients)."""
    listen = config.listen
    lines = [
        "Postvault demo",
        "",
        f"Home folder: {home}",
        "Accounts:",
        *(f"  {role:<9} user name {email}   password {password}" for role, email, password in accounts),
        "",
        "Thunderbird: Account Settings > Account Actions > Add Mail Account, then 'Configure manually':",
    ]
    if listen.imaps:
        lines.append(f"  Incoming  IMAP  server {HOSTNAME}  port {listen.imaps.port}  SSL/TLS   "
                     "Normal password  user name = the address")
    elif listen.imap:
        lines.append(f"  Incoming  IMAP  server {HOSTNAME}  port {listen.imap.port}  STARTTLS  Normal password")
    if listen.submissions:
        lines.append(f"  Outgoing  SMTP  server {HOSTNAME}  port {listen.submissions.port}  SSL/TLS   "
                     "Normal password  user name = the address")
    elif listen.submission:
        lines.append(f"  Outgoing  SMTP  server {HOSTNAME}  port {listen.submission.port}  STARTTLS  Normal password")
    ca = home / "certs" / "ca.pem"
    lines += [
        "",
        f"The server's certificate comes from a development CA made for this demo: {ca}",
        "Trust it once in Thunderbird: Settings > Privacy & Security > Certificates > Manage Certificates >",
        f"Authorities > Import..., choose {ca}, tick 'This certificate can identify websites'.",
        f"Other clients: curl --cacert {ca} ...; swaks --tls-ca-path {ca} ...",
        "",
        "The member can write to the colleague; the colleague can only reply. Stop with Ctrl-C.",
    ]
    return "\n".join(lines)
