"""The schema of ``conf/postvault.toml``: frozen dataclasses, one per table.

Each key is a dataclass field whose metadata carries everything the rest of
``postvault.conf`` needs to know about it (the idea of mox's struct tags): its
documentation (``doc``), its TOML type and default, the parser that turns the
raw TOML value into the typed value, and the inverse that turns it back. So
this one module drives validation, the rendered default file and
``postvault config show``; :func:`keys` flattens it into :class:`KeySpec` rows.

Parsers raise :class:`Expected` with only the expectation; the loader adds the
file (or environment variable), the dotted key and the value it got, so every
message has the same shape.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# A raw value as TOML gives it for a key of this schema (only strings and
# integers and booleans occur; booleans are deliberately not integers here).
Raw = str | int | bool
Parser = Callable[[Any, Path], Any]
Shower = Callable[[Any], Raw]


class Expected(ValueError):
    """A raw value is invalid; the text says what was expected instead.

    ``detail`` optionally says why (e.g. which file is missing), appended
    after the value that was given.
    """

    def __init__(self, expected: str, detail: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.detail = detail


# --- value types -----------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A listening or connecting address; ``host`` is an IP or a DNS name
    (an IPv6 address without its brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        # Brackets keep an IPv6 address's colons apart from the port's.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Relay:
    """The smarthost that notifications go through, with optional login."""

    host: str
    port: int
    username: str | None = None
    # repr=False: a Config gets logged and printed; the password must not.
    password: str | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    def __str__(self) -> str:
        # Masked: str() ends up in log lines and in `config show`.
        if self.username is None:
            return str(self.endpoint)
        return f"{self.username}:***@{self.endpoint}"


# --- parsers: raw TOML value (and the absolute home) -> typed value --------

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")

DNS_NAME = "a DNS name such as \"mail.example.test\""
HOST_PORT = '"host:port" (IPv6 as "[::1]:993")'
BLOBS_IN_DATABASE = "database"
LOG_LEVELS = ("debug", "info", "warning", "error")
STORE_SCHEMES = ("sqlite", "postgresql+psycopg")


def is_dns_name(text: str) -> bool:
    """Whether ``text`` is a host name: LDH labels, at most 253 characters,
    and a last label that is not all digits (so an IPv4 address is not one)."""
    if not text or len(text) > 253:
        return False
    labels = text.split(".")
    if labels[-1].isdigit():
        return False
    return all(_LABEL.match(label) for label in labels)


def is_address(text: str) -> bool:
    """Whether ``text`` is a plain mail address ``local@domain`` (no display
    name: notifications need an envelope sender, not a header)."""
    local, at, domain = text.rpartition("@")
    return bool(at) and len(text) <= 254 and bool(_LOCAL_PART.match(local)) and is_dns_name(domain)


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return is_dns_name(text)
    return True


def parse_hostname(raw: str, home: Path) -> str:
    if not is_dns_name(raw):
        raise Expected(DNS_NAME)
    return raw


def _split_host_port(raw: str) -> Endpoint:
    if raw.startswith("["):
        host, bracket, port = raw[1:].partition("]:")
        if not bracket:
            raise Expected(HOST_PORT)
        try:
            is_v6 = ipaddress.ip_address(host).version == 6
        except ValueError:
            is_v6 = False
        if not is_v6:
            raise Expected(f"{HOST_PORT} with an IPv6 address inside the brackets")
    else:
        host, colon, port = raw.rpartition(":")
        if not colon:
            raise Expected(HOST_PORT)
        if ":" in host:
            # A bare IPv6 address: its last group would be read as the port.
            raise Expected(HOST_PORT)
        if not _is_host(host):
            raise Expected(f"{HOST_PORT} with an IP address or host name")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise Expected('"host:port" with a port 1-65535')
    return Endpoint(host, int(port))


def parse_listen(raw: str, home: Path) -> Endpoint | None:
    # The empty string disables the listener (documented in the file).
    return None if raw == "" else _split_host_port(raw)


def show_endpoint(value: Endpoint | None) -> str:
    return "" if value is None else str(value)


def parse_relay(raw: str, home: Path) -> Relay | None:
    if raw == "":
        return None
    # rpartition: a login name may itself be an address with an "@".
    userinfo, at, hostport = raw.rpartition("@")
    endpoint = _split_host_port(hostport)
    if not at:
        return Relay(endpoint.host, endpoint.port)
    username, colon, password = userinfo.partition(":")
    if not colon or not username:
        raise Expected('"host:port" or "user:password@host:port"')
    return Relay(endpoint.host, endpoint.port, username, password)


def show_relay(value: Relay | None) -> str:
    return "" if value is None else str(value)


def _absolute(raw: str, home: Path) -> Path:
    # abspath, not resolve(): certificate tools (certbot's live/) swap
    # symlinks on renewal, and a reload must follow the link, not its old target.
    return Path(os.path.abspath(home / raw))


def parse_pem_file(raw: str, home: Path) -> Path:
    expected = "a readable PEM file"
    if raw == "":
        raise Expected(expected)
    path = _absolute(raw, home)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Expected(expected, f"{path}: no such file") from None
    except IsADirectoryError:
        raise Expected(expected, f"{path}: is a folder") from None
    except PermissionError:
        raise Expected(expected, f"{path}: permission denied") from None
    except OSError as exc:
        raise Expected(expected, f"{path}: {exc.strerror}") from None
    # A cheap guard against DER files or a swapped-in wrong file; the certs
    # package does the real parsing when it builds the TLS context.
    if b"-----BEGIN " not in data:
        raise Expected(expected, f"{path}: no PEM block")
    return path


def show_path(value: Path) -> str:
    return str(value)


def parse_store_url(raw: str, home: Path) -> str:
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme not in STORE_SCHEMES:
        raise Expected('"sqlite:///PATH" or "postgresql+psycopg://USER:PASSWORD@HOST/DB"')
    if scheme == "postgresql+psycopg":
        if rest in ("", "/"):
            raise Expected('"postgresql+psycopg://USER:PASSWORD@HOST/DB"')
        return raw
    # sqlite:///relative/path has a third slash before a relative path and a
    # fourth before an absolute one (SQLAlchemy's convention).
    path, qmark, query = rest.partition("?")
    if not path.startswith("/") or path in ("/", "/:memory:"):
        raise Expected('"sqlite:///PATH" with a database file path (relative to the home folder)')
    absolute = _absolute(path[1:], home)
    return f"sqlite:///{absolute}{qmark}{query}"


def parse_blobs(raw: str, home: Path) -> Path | None:
    if raw == BLOBS_IN_DATABASE:
        return None
    if raw == "":
        raise Expected(f'a folder path, or "{BLOBS_IN_DATABASE}"')
    return _absolute(raw, home)


def show_blobs(value: Path | None) -> str:
    return BLOBS_IN_DATABASE if value is None else str(value)


def parse_address(raw: str, home: Path) -> str:
    if not is_address(raw):
        raise Expected('a mail address such as "no-reply@mail.example.test"')
    return raw


RELAY_TLS_MODES = ("starttls", "implicit")


def parse_relay_tls(raw: str, home: Path) -> str:
    if raw not in RELAY_TLS_MODES:
        raise Expected(" or ".join(f'"{mode}"' for mode in RELAY_TLS_MODES))
    return raw


def parse_optional_pem_file(raw: str, home: Path) -> Path | None:
    # Empty: the system's trust store (a public smarthost's certificate).
    return None if raw == "" else parse_pem_file(raw, home)


def parse_level(raw: str, home: Path) -> str:
    if raw not in LOG_LEVELS:
        raise Expected(" or ".join(f'"{level}"' for level in LOG_LEVELS))
    return raw


def parse_log_file(raw: str, home: Path) -> Path | None:
    return None if raw == "" else _absolute(raw, home)


def show_optional_path(value: Path | None) -> str:
    return "" if value is None else str(value)


def _identity(value: Any) -> Any:
    return value


def int_range(minimum: int, maximum: int) -> Parser:
    """A parser for an integer key bounded on both sides."""

    def parse(raw: int, home: Path) -> int:
        if not minimum <= raw <= maximum:
            raise Expected(f"an integer from {minimum} to {maximum}")
        return raw

    return parse


def mask_secret(text: str) -> str:
    """``text`` (a URL or ``user:password@host:port``) with any password
    replaced by ``***``: in the userinfo and in a ``password=`` query item."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    head, qmark, query = rest.partition("?")
    # The last "@" before the query ends the userinfo; masking too much of a
    # malformed value is harmless, leaking a password is not.
    userinfo, at, host = head.rpartition("@")
    if at and ":" in userinfo:
        head = userinfo.partition(":")[0] + ":***@" + host
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}{sep}{head}{qmark}{query}"


# --- the dataclasses -------------------------------------------------------

REQUIRED: Any = object()  # default of a key that the file must give


_NO_VALUE: Any = object()  # a key whose dataclass field has no Python default


def text_key(doc: str, default: Any, parse: Parser, show: Shower = str, *, toml: str | None = None,
             secret: bool = False, value: Any = _NO_VALUE) -> Any:
    """A string key. ``default`` is the raw TOML default, a callable of the
    hostname (for defaults derived from it), or ``REQUIRED``. ``value``, if
    given, is the parsed default as a Python default of the field (keys added
    later carry one, so code that builds a section by hand keeps working)."""
    metadata = {
        "doc": doc, "type": str, "default": default, "parse": parse, "show": show,
        "toml": toml, "secret": secret,
    }
    if value is _NO_VALUE:
        return field(repr=not secret, metadata=metadata)
    return field(default=value, repr=not secret, metadata=metadata)


def int_key(doc: str, default: int, minimum: int, maximum: int, *, python_default: bool = False) -> Any:
    """An integer key with its bounds (``python_default``: see ``text_key``'s ``value``)."""
    metadata = {
        "doc": doc, "type": int, "default": default, "parse": int_range(minimum, maximum),
        "show": _identity, "toml": None, "secret": False,
    }
    return field(default=default, metadata=metadata) if python_default else field(metadata=metadata)


def _parse_bool(raw: bool, home: Path) -> bool:
    return raw


def bool_key(doc: str, default: bool) -> Any:
    """A boolean switch (TOML ``true``/``false``; ``true``/``false`` in the
    environment too), with a Python default like ``_smtp_key``'s."""
    metadata = {
        "doc": doc, "type": bool, "default": default, "parse": _parse_bool,
        "show": _identity, "toml": None, "secret": False,
    }
    return field(default=default, metadata=metadata)


def section(cls: type, doc: str) -> Any:
    """A TOML table, described by the dataclass ``cls``."""
    return field(metadata={"doc": doc, "section": cls})


@dataclass(frozen=True)
class ListenConfig:
    """Where the servers listen."""

    imaps: Endpoint | None = text_key(
        "IMAP with implicit TLS (port 993).", "0.0.0.0:993", parse_listen, show_endpoint)
    imap: Endpoint | None = text_key(
        "IMAP with STARTTLS, required before any login (port 143).",
        "0.0.0.0:143", parse_listen, show_endpoint)
    submissions: Endpoint | None = text_key(
        "SMTP submission with implicit TLS (port 465).", "0.0.0.0:465", parse_listen, show_endpoint)
    submission: Endpoint | None = text_key(
        "SMTP submission with STARTTLS, required before AUTH and MAIL (port 587).",
        "0.0.0.0:587", parse_listen, show_endpoint)
    https: Endpoint | None = text_key(
        "HTTPS for the sign-up and account pages (port 443).", "0.0.0.0:443", parse_listen, show_endpoint)


@dataclass(frozen=True)
class TLSConfig:
    """The server certificate; absolute paths once loaded."""

    cert: Path = text_key(
        "PEM certificate chain, server certificate first.", "certs/server.pem", parse_pem_file, show_path)
    key: Path = text_key(
        "PEM private key of that certificate; keep it readable only by Postvault.",
        "certs/server.key", parse_pem_file, show_path)


@dataclass(frozen=True)
class StoreConfig:
    """The database and the sealed (encrypted) message blobs."""

    # Loaded as an absolute URL, so the database does not move with the
    # working directory.
    url: str = text_key(
        'Database URL: "sqlite:///PATH" (a relative PATH is relative to the home folder) '
        'or "postgresql+psycopg://USER:PASSWORD@HOST/DB".',
        "sqlite:///data/postvault.db", parse_store_url, secret=True)
    # None: the blobs live in a database table.
    blobs: Path | None = text_key(
        'Folder for sealed message blobs, or "database" to keep them in a database table '
        '(write "./database" for a folder of that name).',
        "data/blobs", parse_blobs, show_blobs)
    kdf_memory_kib: int = int_key(
        "Argon2id memory per password hash, in KiB (at least 64 MiB).", 65536, 65536, 2**32 - 1)
    kdf_iterations: int = int_key("Argon2id passes over that memory.", 3, 1, 2**32 - 1)
    kdf_lanes: int = int_key("Argon2id parallel lanes.", 4, 1, 2**24 - 1)


@dataclass(frozen=True)
class NotifyConfig:
    """Outbound notifications and invitations (they never carry PHI)."""

    relay: Relay | None = text_key(
        'Smarthost as "host:port" or "user:password@host:port"; empty: deliver by MX lookup.',
        "", parse_relay, show_relay, secret=True)
    from_: str = text_key(
        "Envelope sender and From address of notifications.",
        lambda hostname: f"no-reply@{hostname}", parse_address, toml="from")
    # No "off" value: a smarthost or MX that cannot do TLS never gets our
    # mail (invitations carry a sign-up secret). RFC 3207, RFC 8314.
    relay_tls: str = text_key(
        'How TLS starts with the smarthost: "starttls" (STARTTLS is required, RFC 3207; '
        'usually port 587) or "implicit" (TLS from the first byte, RFC 8314; port 465). '
        "Mail is never sent in plaintext, and the certificate is always verified.",
        "starttls", parse_relay_tls, value="starttls")
    relay_ca: Path | None = text_key(
        "PEM file of the CA certificates that sign the smarthost's certificate; "
        "empty: the system's trust store.", "", parse_optional_pem_file, show_optional_path, value=None)
    retry_first_seconds: int = int_key(
        "Wait before the first retry after a temporary failure (4xx reply, no connection, "
        "no STARTTLS); each later wait doubles.", 60, 1, 86400, python_default=True)
    retry_max_seconds: int = int_key("Longest wait between two retries.", 3600, 1, 7 * 86400, python_default=True)
    give_up_hours: int = int_key(
        "Hours after which a message that still fails temporarily is given up and the "
        "failure is recorded in the audit log (a 5xx reply fails it at once).", 48, 1, 30 * 24, python_default=True)
    invitation_days: int = int_key(
        "Days a sign-up link stays valid; a new invitation replaces the old link.", 14, 1, 365, python_default=True)


@dataclass(frozen=True)
class LogConfig:
    """Logging. Logs never carry message content."""

    level: str = text_key('One of "debug", "info", "warning", "error".', "info", parse_level)
    file: Path | None = text_key(
        "Log file; empty: standard error.", "", parse_log_file, show_optional_path)


def _smtp_key(doc: str, default: int, minimum: int, maximum: int) -> Any:
    """An integer key of ``[smtp]``; unlike ``int_key`` it also carries a
    Python default, so that ``SmtpConfig()`` (and a ``Config`` built without
    this table, as older code does) gets the documented defaults."""
    spec = int_key(doc, default, minimum, maximum)
    return field(default=default, metadata=spec.metadata)


@dataclass(frozen=True)
class SmtpConfig:
    """Limits of the SMTP submission listeners (RFC 5321, 6409)."""

    max_recipients: int = _smtp_key(
        "Recipients per message; more get 452 4.5.3 and the client sends the rest in another "
        "message (RFC 5321 section 4.5.3.1.8 asks servers to accept at least 100).", 100, 1, 10_000)
    max_line_length: int = _smtp_key(
        "Longest line of a message, in octets including CR LF (RFC 5321 section 4.5.3.1.6: "
        "1000); a longer line refuses the message.", 1000, 1000, 65_536)
    max_commands: int = _smtp_key(
        "Commands per connection before it is closed with 421 4.7.0 (a client reconnects and "
        "carries on; this only bounds runaway sessions).", 10_000, 100, 10_000_000)
    max_errors: int = _smtp_key(
        "Refused commands (4xx and 5xx replies) per connection before it is closed with "
        "421 4.7.0.", 20, 1, 10_000)
    idle_timeout_seconds: int = _smtp_key(
        "Seconds a connection may wait between commands, or between pieces of a message, "
        "before it is closed with 421 4.4.2 (RFC 5321 section 4.5.3.2.7 suggests 300).",
        300, 1, 3600)
    max_connections_per_ip: int = _smtp_key(
        "Open connections from one client address at once; more get 421 4.7.0. A whole "
        "practice often shares one address.", 50, 1, 100_000)
    processes: int = _smtp_key(
        "Processes that serve the submission listeners: 1 serves them in the main process with "
        "everything else; N > 1 adds N - 1 worker processes that accept on the same listening "
        "sockets, so SMTP can use more than one CPU core (docs/scaling.md). max_connections_per_ip "
        "then counts per process.", 1, 1, 64)


def _default_smtp() -> SmtpConfig:
    return SmtpConfig()


def _text_default(doc: str, default: str, parse: Parser, show: Shower) -> Any:
    """A string key with a Python default as well (see ``_smtp_key``)."""
    spec = text_key(doc, default, parse, show)
    return field(default=parse(default, Path(".")), metadata=spec.metadata)


_CAPABILITY = re.compile(r"[A-Z0-9][A-Z0-9+=.-]*\Z")
SWITCH_EXAMPLE = '"NAME: CAPABILITY CAPABILITY; NAME: CAPABILITY", e.g. "Outlook: IDLE MOVE"'
Switches = tuple[tuple[str, frozenset[str]], ...]


def parse_switches(raw: str, home: Path) -> Switches:
    """Capabilities to switch off: ``"who: CAP CAP; who: CAP"``."""
    out = []
    for item in raw.split(";"):
        if not item.strip():
            continue
        who, colon, caps = item.partition(":")
        names = caps.upper().replace(",", " ").split()
        if not colon or not who.strip() or not names or not all(_CAPABILITY.match(n) for n in names):
            raise Expected(SWITCH_EXAMPLE)
        out.append((who.strip().lower(), frozenset(names)))
    return tuple(out)


def show_switches(value: Switches) -> str:
    return "; ".join(f"{who}: {' '.join(sorted(caps))}" for who, caps in value)


@dataclass(frozen=True)
class ImapConfig:
    """Limits and compatibility switches of the IMAP listeners (RFC 3501, 9051)."""

    max_connections_per_ip: int = _smtp_key(
        "Open IMAP connections from one client address at once; more are refused with BYE. "
        "Thunderbird opens up to 5 per account, and a practice shares one address.", 50, 1, 100_000)
    max_line_length: int = _smtp_key(
        "Longest command line in octets, literals not counted; longer lines get BAD [TOOBIG] "
        "(clients send long UID sets on one line; RFC 7162 section 4 suggests at least 8192).",
        65_536, 8192, 1_048_576)
    max_literal_size: int = _smtp_key(
        "Largest literal in octets in any command but APPEND (whose limit is the policy's "
        "max_message_size, announced as APPENDLIMIT); a larger one is refused before the "
        "client sends it.", 65_536, 4096, 16_777_216)
    absolute_session_hours: int = _smtp_key(
        "Hours after which a connection is closed with BYE even if active; the client logs in "
        "again (the idle limit is [sessions] imap_idle_minutes in policy.toml).", 24, 1, 720)
    login_timeout_seconds: int = _smtp_key(
        "Seconds a connection may sit idle before logging in; then it is closed with BYE. "
        "Time the server spends checking a password does not count.", 60, 1, 3600)
    threads: int = _smtp_key(
        "Worker threads for store access, password checks and decryption.", 8, 2, 256)
    idle_poll_seconds: int = _smtp_key(
        "Seconds between an IDLE session's looks at its mailbox in the database, for changes "
        "no notice announced (on SQLite: those made by postvault commands; on PostgreSQL "
        "every process announces its changes, so this only backs up a lost notice).", 10, 1, 3600)
    disable_for_clients: Switches = _text_default(
        "Capabilities to switch off for clients whose ID name (RFC 2971) contains NAME, as "
        '"NAME: CAP CAP; NAME: CAP" (e.g. "Outlook: IDLE"); empty: none.', "", parse_switches, show_switches)
    disable_for_accounts: Switches = _text_default(
        'Capabilities to switch off for accounts, as "address: CAP CAP; address: CAP"; empty: none.',
        "", parse_switches, show_switches)
    index_on_login: bool = bool_key(
        "After a login (not an emergency access login), fill the account's sealed search index and "
        "header cache in the background, INBOX first, so that its first header SEARCH need not "
        "decrypt every message; it stops when the account's last session ends.", True)
    index_round_messages: int = _smtp_key(
        "Messages per round of that fill: one short write transaction each, with a pause "
        "between rounds for the sessions' own work.", 250, 1, 10_000)


def _default_imap() -> ImapConfig:
    return ImapConfig()


KEY_FILES = 'OpenPGP public key files, comma-separated, e.g. "conf/recovery/officer.asc"'


def parse_key_files(raw: str, home: Path) -> tuple[Path, ...]:
    """Comma-separated key files relative to the home folder; "" for none."""
    if raw.strip() == "":
        return ()
    out = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            raise Expected(KEY_FILES)
        path = _absolute(item, home)
        if not path.is_file():
            raise Expected(KEY_FILES, f"{path}: no such file")
        out.append(path)
    return tuple(out)


def show_key_files(value: tuple[Path, ...]) -> str:
    return ", ".join(str(p) for p in value)


def parse_folder(raw: str, home: Path) -> Path:
    if raw == "":
        raise Expected("a folder path")
    return _absolute(raw, home)


@dataclass(frozen=True)
class RecoveryConfig:
    """Key recovery escrow and emergency access (docs/recovery.md)."""

    keys: tuple[Path, ...] = text_key(
        "OpenPGP PUBLIC key files of the recovery officers (e.g. the practice's privacy officer, whose "
        "secret key is kept offline), relative to the home folder and comma-separated. When set, each "
        "account's private key is also encrypted to these keys, at creation, sign-up and the next login "
        "of existing accounts, so that `postvault recover` can reset a forgotten password without "
        "losing mail and `postvault emergency grant` can give break-glass access. Empty: no escrow; "
        "a password reset then loses the account's mail.", "", parse_key_files, show_key_files, value=())
    gnupg_home: Path = text_key(
        "Postvault's own GnuPG home, holding only the officers' public keys (made with mode 0700).",
        "data/gnupg", parse_folder, show_path, value=Path("data/gnupg"))
    emergency_max_hours: int = int_key(
        "Longest emergency (break-glass) access that `postvault emergency grant` may give, in hours.",
        72, 1, 720, python_default=True)


def _default_recovery() -> RecoveryConfig:
    return RecoveryConfig()


@dataclass(frozen=True)
class AuditConfig:
    """The audit log: retention and signed checkpoints (see store/auditlog.py)."""

    retention_days: int = int_key(
        "Days an audit event is kept; older ones are deleted daily by the server (or by "
        "`postvault audit prune`), leaving the rest verifiable. HIPAA asks for 6 years "
        "(45 CFR 164.316(b)(2)); 0 keeps everything.", 2190, 0, 36_500, python_default=True)
    checkpoint_events: int = int_key(
        "The server signs the head of the audit chain (a checkpoint) after this many new "
        "events; what happens after the newest checkpoint is not yet protected by a signature.",
        1000, 1, 10_000_000, python_default=True)
    checkpoint_seconds: int = int_key(
        "Or after this many seconds, if there are new events (whichever comes first).", 600, 1, 86_400,
        python_default=True)


def _default_audit() -> AuditConfig:
    return AuditConfig()


LISTENER_NAMES = ("imaps", "imap", "submissions", "submission", "https")
LISTENERS_EXAMPLE = 'listener names from [listen], comma-separated, e.g. "imaps, submissions"'
NETWORKS_EXAMPLE = 'IP addresses or networks, comma-separated, e.g. "10.0.0.5, 192.0.2.0/24"'
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_listener_names(raw: str, home: Path) -> frozenset[str]:
    names = [item.strip() for item in raw.split(",")] if raw.strip() else []
    if any(name not in LISTENER_NAMES for name in names):
        raise Expected(f"{LISTENERS_EXAMPLE} ({', '.join(LISTENER_NAMES)})")
    return frozenset(names)


def show_listener_names(value: frozenset[str]) -> str:
    return ", ".join(name for name in LISTENER_NAMES if name in value)


def parse_networks(raw: str, home: Path) -> tuple[Network, ...]:
    out = []
    for item in raw.split(",") if raw.strip() else []:
        try:
            # strict: "10.1.2.3/8" is a typo for an address or a network,
            # and silently trusting all of 10/8 is not the safe reading.
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError:
            raise Expected(NETWORKS_EXAMPLE) from None
    return tuple(out)


def show_networks(value: tuple[Network, ...]) -> str:
    return ", ".join(str(net) for net in value)


@dataclass(frozen=True)
class ProxyConfig:
    """The PROXY protocol (HAProxy's send-proxy / send-proxy-v2) on listeners
    behind a TCP load balancer, so that the audit log, login throttling and
    connection limits see the client's address (docs/scaling.md)."""

    listeners: frozenset[str] = text_key(
        "Listeners whose connections must start with a PROXY protocol header (v1 or v2), as "
        f"{LISTENERS_EXAMPLE}; empty: none. Such a listener takes connections only from the "
        "proxies in trusted, and never without a header: give the load balancer listeners of "
        "its own, apart from those that clients reach directly.",
        "", parse_listener_names, show_listener_names, value=frozenset())
    trusted: tuple[Network, ...] = text_key(
        f"The load balancers allowed to send PROXY headers, as {NETWORKS_EXAMPLE}.",
        "", parse_networks, show_networks, value=())
    timeout_seconds: int = int_key(
        "Seconds a connection has to send its whole PROXY header before it is closed "
        "(the protocol suggests at least 3, to cover a TCP retransmit).", 5, 1, 60, python_default=True)


def _default_proxy() -> ProxyConfig:
    return ProxyConfig()


@dataclass(frozen=True)
class Config:
    """The whole of ``conf/postvault.toml``, validated and typed."""

    hostname: str = text_key(
        "The name clients and DNS use for this server; it must match the certificate.",
        REQUIRED, parse_hostname)
    listen: ListenConfig = section(
        ListenConfig, 'Listeners, each "host:port" (IPv6 as "[::1]:993"); an empty string disables one.')
    tls: TLSConfig = section(TLSConfig, "TLS certificate and key, relative to the home folder.")
    store: StoreConfig = section(StoreConfig, "Storage. Everything stored is encrypted.")
    notify: NotifyConfig = section(NotifyConfig, "Notifications and invitations.")
    log: LogConfig = section(LogConfig, "Logging.")
    # Last, and with a default, so that a Config built without it (as code
    # written before the [smtp] table was) still works.
    smtp: SmtpConfig = field(default_factory=_default_smtp, metadata={
        "doc": "SMTP submission limits (ports 465 and 587).", "section": SmtpConfig})
    imap: ImapConfig = field(default_factory=_default_imap, metadata={
        "doc": "IMAP limits and per-client compatibility switches (ports 993 and 143).", "section": ImapConfig})
    audit: AuditConfig = field(default_factory=_default_audit, metadata={
        "doc": "The audit log (who did what, never content).", "section": AuditConfig})
    recovery: RecoveryConfig = field(default_factory=_default_recovery, metadata={
        "doc": "Key recovery with OpenPGP escrow, and emergency access (see docs/recovery.md).",
        "section": RecoveryConfig})
    proxy: ProxyConfig = field(default_factory=_default_proxy, metadata={
        "doc": "PROXY protocol from a load balancer such as HAProxy (see docs/scaling.md).",
        "section": ProxyConfig})


# --- the flattened view the loader and renderer use ------------------------


@dataclass(frozen=True)
class KeySpec:
    """One key of the schema, as the loader sees it."""

    section: str | None  # TOML table name; None for a top-level key
    name: str            # TOML key name
    attr: str            # Python attribute name
    doc: str
    type: type           # str or int: the TOML type of the raw value
    default: Any         # raw default, callable(hostname) -> raw, or REQUIRED
    parse: Parser
    show: Shower
    secret: bool         # the raw value may hold a password

    @property
    def dotted(self) -> str:
        return self.name if self.section is None else f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return "POSTVAULT_" + self.dotted.replace(".", "_").upper()

    def default_for(self, hostname: str) -> Any:
        return self.default(hostname) if callable(self.default) else self.default


@dataclass(frozen=True)
class SectionSpec:
    """One TOML table of the schema."""

    name: str
    attr: str
    doc: str
    cls: type


def sections() -> Iterator[SectionSpec]:
    """The tables of :class:`Config`, in file order."""
    for f in fields(Config):
        if "section" in f.metadata:
            yield SectionSpec(f.name, f.name, f.metadata["doc"], f.metadata["section"])


def _spec(f: Any, section_name: str | None) -> KeySpec:
    m = f.metadata
    return KeySpec(section_name, m["toml"] or f.name, f.name, m["doc"], m["type"], m["default"],
                   m["parse"], m["show"], m["secret"])


def keys() -> Iterator[KeySpec]:
    """Every key of :class:`Config`, top-level keys first, in file order."""
    for f in fields(Config):
        if "section" not in f.metadata:
            yield _spec(f, None)
    for sec in sections():
        for f in fields(sec.cls):
            yield _spec(f, sec.name)
