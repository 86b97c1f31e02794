"""The policy as plain, immutable data: what ``conf/policy.toml`` says,
after loading and validation (``load.py``). Decisions take these objects as
arguments; nothing here does I/O.

The schema drives the loader, as ``postvault.conf.schema`` drives the server
config: each key is a dataclass field whose metadata carries the parser that
turns the raw TOML value into the typed one (``parse``) and, where it differs
from the attribute, its TOML name (``toml``). Parsers raise
:class:`~postvault.conf.schema.Expected` with only the expectation; the loader
adds the file, line, dotted key and the value it got. A table with rules
that span several keys states them in ``invariants()``.

Where a table lives in the file is the ``path`` metadata of the
:class:`Policy` field that holds it (``[roles.colleague]`` holds
``Policy.colleague``).

The defaults here and ``default.toml`` must agree; a test loads the file and
compares it with ``Policy()``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from postvault.conf.schema import Expected, is_address

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# A parser takes the raw TOML value (any TOML type: the parser checks it)
# and returns the typed value, or raises Expected.
Parser = Callable[[Any], Any]

DEFAULT_BLOCKED_EXTENSIONS: frozenset[str] = frozenset(
    """ace ade adp ani apk app appref-ms appx appxbundle arj asp aspx asx bas bat cab cdxml cer chm cmd cnt com
    cpl crt csh deb der dex diagcab diagcfg diagpkg dll dmg docm elf ex ex_ exe fxp gadget grp hlp hpj hta htc
    img inf ins iso isp its jar jnlp js jse kext ksh lha lib library lnk lzh macho mad maf mag mam maq mar mas mat
    mau mav maw mcf mda mdb mde mdt mdw mdz mht mhtml mjs msc msh msh1 msh2 msh1xml msh2xml mshxml msi msix
    msixbundle msp mst nsh ops osd pcd pif pkg pl plg prf prg ps1 ps1xml ps2 ps2xml psc1 psc2 pssc pst py pyc pyo
    pyw pyz pyzw reg rpm scf scr sct shb shk shs sys tmp udl url vb vbe vbp vbs vhd vhdx vsmacros vsw vxd ws wsb
    wsc wsf wsh xbap xll xnk xz z""".split()
)

# The canonical folders besides INBOX, in the order the file lists them.
ALIASED_FOLDERS = ("Drafts", "Sent", "Trash")

# RFC 9051 §5.4: an inactivity autologout timer MUST be at least 30 minutes.
IMAP_MIN_IDLE_MINUTES = 30


# --- sizes -------------------------------------------------------------------

# Binary units only. "MB" means 10^6 bytes to a disk maker and 2^20 to most
# mail clients; an attachment limit that is off by 5% is a support call, so
# the ambiguous spellings are refused with the two exact ones to pick from.
SIZE_UNITS = {"b": 1, "kib": KiB, "mib": MiB, "gib": GiB}
# Ambiguous unit (lower case) -> (its binary twin, power of 2, power of 10).
_AMBIGUOUS_UNITS = {
    "k": ("KiB", 10, 3), "kb": ("KiB", 10, 3),
    "m": ("MiB", 20, 6), "mb": ("MiB", 20, 6),
    "g": ("GiB", 30, 9), "gb": ("GiB", 30, 9),
}
_SIZE_TEXT = re.compile(r"\s*(\d+)\s*([A-Za-z]+)\s*\Z")
SIZE_EXAMPLE = 'a size such as "15 MiB", "500 KiB" or an integer number of bytes'


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that states it exactly, as the
    policy file would write it: "15 MiB", "1536 KiB", "7 B"."""
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


def parse_size_value(raw: Any) -> int:
    """A size: a TOML integer of bytes, or a string "N B|KiB|MiB|GiB"."""
    # type() is, not isinstance: bool is a subclass of int, and `true` is not 1.
    if type(raw) is int:
        return raw
    match = _SIZE_TEXT.match(raw) if isinstance(raw, str) else None
    if not match:
        raise Expected(SIZE_EXAMPLE, _fraction_hint(raw))
    number, unit = int(match[1]), match[2]
    if unit.lower() in SIZE_UNITS:
        return number * SIZE_UNITS[unit.lower()]
    if unit.lower() in _AMBIGUOUS_UNITS:
        binary, two, ten = _AMBIGUOUS_UNITS[unit.lower()]
        raise Expected(SIZE_EXAMPLE, f'"{unit}" is ambiguous: write "{number} {binary}" for {number} x 2^{two} bytes,'
                                     f" or the integer {number * 10**ten} for {number} x 10^{ten} bytes")
    raise Expected(SIZE_EXAMPLE, f'unknown unit "{unit}"; use B, KiB, MiB or GiB')


def _fraction_hint(raw: Any) -> str:
    """For "1.5 MiB": the same size in whole units, if it is whole bytes."""
    match = re.fullmatch(r"\s*(\d+\.\d+)\s*([A-Za-z]+)\s*", raw) if isinstance(raw, str) else None
    if not match or match[2].lower() not in SIZE_UNITS:
        return ""
    exact = Decimal(match[1]) * SIZE_UNITS[match[2].lower()]
    if exact != exact.to_integral_value():
        return "whole numbers only"
    return f'whole numbers only: write "{format_size(int(exact))}"'


# --- parsers -------------------------------------------------------------------


def size_range(minimum: int, maximum: int) -> Parser:
    def parse(raw: Any) -> int:
        value = parse_size_value(raw)
        if not minimum <= value <= maximum:
            raise Expected(f"a size from {format_size(minimum)} to {format_size(maximum)}")
        return value

    return parse


def count_range(minimum: int, maximum: int, why: str = "") -> Parser:
    """An integer with bounds; ``why`` cites the reason for them in the message."""

    def parse(raw: Any) -> int:
        if type(raw) is not int or not minimum <= raw <= maximum:
            raise Expected(f"an integer from {minimum} to {maximum}", why)
        return raw

    return parse


def parse_flag(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise Expected("true or false")
    return raw


class ExpectedItem(Expected):
    """An item of an array is invalid; ``got`` says which (the loader
    otherwise describes the whole value)."""

    def __init__(self, expected: str, got: str, detail: str = "") -> None:
        super().__init__(expected, detail)
        self.got = got


def _item(raw: list[Any], index: int) -> str:
    item = raw[index]
    shown = f'"{item}"' if isinstance(item, str) else repr(item).lower()
    return f"{shown} (item {index + 1} of the array)"


_EXTENSION = re.compile(r"[a-z0-9_-]{1,32}\Z")
EXTENSIONS_EXAMPLE = 'an array of file extensions such as ["stl", "dcm"]'
EXTENSION_ITEM = 'each item one file extension such as "stl" (letters, digits, "_" and "-"; no dots)'


def parse_extensions(raw: Any) -> frozenset[str]:
    """File extensions, lower-cased; a leading dot is allowed and dropped."""
    if not isinstance(raw, list):
        raise Expected(EXTENSIONS_EXAMPLE)
    out = set()
    for index, item in enumerate(raw):
        ext = item.lower().removeprefix(".") if isinstance(item, str) else ""
        # No inner dots: the attachment check compares each dot-separated
        # part of a file name, so "tar.gz" could never match anything.
        if not _EXTENSION.match(ext):
            raise ExpectedItem(EXTENSION_ITEM, _item(raw, index))
        out.add(ext)
    return frozenset(out)


FOLDER_NAMES_EXAMPLE = 'an array of folder names such as ["Sent Items", "Sent Messages"]'
FOLDER_NAME_ITEM = "each item a folder name: printable, not empty, without the IMAP wildcards * and %"


def parse_folder_names(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise Expected(FOLDER_NAMES_EXAMPLE)
    out: list[str] = []
    for index, item in enumerate(raw):
        if not isinstance(item, str) or not item.strip() or not item.isprintable() or any(c in item for c in "*%"):
            raise ExpectedItem(FOLDER_NAME_ITEM, _item(raw, index))
        # INBOX is one name, case-insensitive (RFC 3501 §5.1); it can't
        # stand for another folder.
        if item.upper() == "INBOX":
            raise ExpectedItem("names other than INBOX, which is always its own folder", _item(raw, index))
        out.append(item)
    return tuple(out)


def parse_office_address(raw: str) -> str:
    """The key of an ``[offices."..."]`` table: a member's address."""
    if not is_address(raw):
        raise Expected('a member\'s mail address such as [offices."office@example.test"]')
    return raw.lower()


# --- keys ----------------------------------------------------------------------


def key(default: Any, parse: Parser, *, toml: str | None = None) -> Any:
    """A key of a policy table, with its default and parser."""
    return field(default=default, metadata={"parse": parse, "toml": toml})


def size_key(default: int, minimum: int, maximum: int) -> Any:
    return key(default, size_range(minimum, maximum))


def count_key(default: int, minimum: int, maximum: int, why: str = "") -> Any:
    return key(default, count_range(minimum, maximum, why))


def flag_key(default: bool) -> Any:
    return key(default, parse_flag)


@dataclass(frozen=True)
class Invalid:
    """A rule across keys that a table breaks, blamed on one ``key``; or,
    when the file doesn't write that key (its default stands), on the key
    of ``instead``, which the file must have written."""

    key: str
    message: str  # "expected ..., got ..."
    instead: Invalid | None = None


@dataclass(frozen=True)
class AttachmentPolicy:
    max_size: int = size_key(15 * MiB, 1, GiB)  # per attachment, decoded
    max_message_size: int = size_key(50 * MiB, KiB, GiB)  # SMTP SIZE, IMAP APPENDLIMIT
    blocked_extensions: frozenset[str] = key(DEFAULT_BLOCKED_EXTENSIONS, parse_extensions)
    sniff_content: bool = flag_key(True)
    scan_archives: bool = flag_key(True)
    archive_max_depth: int = count_key(3, 1, 10)
    archive_max_ratio: int = count_key(100, 1, 10_000)
    archive_max_total: int = size_key(200 * MiB, KiB, 16 * GiB)
    block_encrypted_archives: bool = flag_key(True)
    # MIME bomb limits.
    max_mime_depth: int = count_key(20, 1, 100)
    max_parts: int = count_key(500, 1, 100_000)
    max_headers: int = count_key(1000, 10, 100_000)

    def invariants(self) -> list[Invalid]:
        if self.max_size > self.max_message_size:
            return [Invalid("max_size", f"expected at most max_message_size ({format_size(self.max_message_size)})"
                                        f", got {format_size(self.max_size)}",
                            Invalid("max_message_size", f"expected at least max_size ({format_size(self.max_size)})"
                                                        f", got {format_size(self.max_message_size)}"))]
        return []


@dataclass(frozen=True)
class OfficeException:
    """A member's exception, applying to every message in its conversations.

    Any extension may be listed; an executable is still refused by content
    sniffing (``[attachments] sniff_content``), which no exception lifts.
    """

    allow_extensions: frozenset[str] = key(frozenset(), parse_extensions)


@dataclass(frozen=True)
class ColleaguePolicy:
    reply_only: bool = flag_key(True)


@dataclass(frozen=True)
class MemberPolicy:
    may_write_address_book: bool = flag_key(True)
    may_write_members: bool = flag_key(True)


def _default_aliases() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({
        "Drafts": ("Draft", "Drafts"),
        "Sent": ("Sent Items", "Sent Messages", "Sent Mail"),
        "Trash": ("Deleted Items", "Deleted Messages", "Bin"),
    })


@dataclass(frozen=True)
class FolderPolicy:
    # Canonical folder -> other names that open it (compared case-insensitively).
    # "spread": each canonical folder is its own key of [folders]
    # (Drafts = [...]); a folder the file leaves out keeps its default names.
    aliases: Mapping[str, tuple[str, ...]] = field(
        default_factory=_default_aliases, metadata={"parse": parse_folder_names, "spread": ALIASED_FOLDERS})
    allow_user_folders: bool = flag_key(False)

    def invariants(self) -> list[Invalid]:
        problems = []
        owner: dict[str, str] = {}
        for canonical in ALIASED_FOLDERS:
            owner[canonical.lower()] = canonical
        for canonical in ALIASED_FOLDERS:
            for alias in self.aliases.get(canonical, ()):
                other = owner.setdefault(alias.lower(), canonical)
                if other != canonical:
                    problems.append(Invalid(canonical, f'expected names no other folder uses, got "{alias}",'
                                                       f" which opens {other}"))
        return problems


@dataclass(frozen=True)
class AuthPolicy:
    # Failed logins of one account within window_minutes before each further
    # attempt is delayed (delay_seconds, doubling up to max_delay_seconds).
    throttle_after: int = count_key(5, 1, 1000)
    # Failed logins of one account within window_minutes that lock it.
    lockout_after: int = count_key(10, 1, 1000)
    lockout_minutes: int = count_key(15, 1, 7 * 24 * 60)
    # How long a failure counts.
    window_minutes: int = count_key(60, 1, 7 * 24 * 60)
    # Failed logins from one client address (any accounts) before its
    # attempts are delayed; higher, as a practice shares one address (NAT).
    ip_throttle_after: int = count_key(20, 1, 100_000)
    delay_seconds: int = count_key(1, 1, 3600)
    max_delay_seconds: int = count_key(60, 1, 3600)

    def invariants(self) -> list[Invalid]:
        if self.delay_seconds > self.max_delay_seconds:
            return [Invalid("delay_seconds", f"expected at most max_delay_seconds ({self.max_delay_seconds})"
                                             f", got {self.delay_seconds}",
                            Invalid("max_delay_seconds", f"expected at least delay_seconds ({self.delay_seconds})"
                                                         f", got {self.max_delay_seconds}"))]
        return []


@dataclass(frozen=True)
class SessionPolicy:
    imap_idle_minutes: int = count_key(
        30, IMAP_MIN_IDLE_MINUTES, 24 * 60,
        "RFC 9051 §5.4: an IMAP inactivity autologout timer must be at least 30 minutes")
    web_idle_minutes: int = count_key(30, 1, 24 * 60)
    web_absolute_hours: int = count_key(12, 1, 7 * 24)

    def invariants(self) -> list[Invalid]:
        if self.web_idle_minutes > self.web_absolute_hours * 60:
            return [Invalid("web_idle_minutes",
                            f"expected at most web_absolute_hours in minutes ({self.web_absolute_hours * 60})"
                            f", got {self.web_idle_minutes}",
                            Invalid("web_absolute_hours",
                                    f"expected at least web_idle_minutes in hours "
                                    f"({-(-self.web_idle_minutes // 60)}), got {self.web_absolute_hours}"))]
        return []


@dataclass(frozen=True)
class PasswordPolicy:
    # NIST SP 800-63B: at least 8 characters, ever; 12 by default.
    min_length: int = count_key(12, 8, 64, "NIST SP 800-63B asks for at least 8")
    # Refuse passwords that zxcvbn can guess (common passwords, names, the
    # user's own address or practice name, keyboard patterns, years).
    refuse_common: bool = flag_key(True)
    # zxcvbn's score from 0 (too guessable) to 4 (very unguessable) that a
    # password must reach; 3 is "safely unguessable" (about 10^8 guesses).
    min_score: int = count_key(3, 1, 4)


def section(path: tuple[str, ...], cls: type, factory: Callable[[], Any]) -> Any:
    """A table of the file at ``path``, described by the dataclass ``cls``."""
    return field(default_factory=factory, metadata={"path": path, "section": cls})


def _no_offices() -> Mapping[str, OfficeException]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Policy:
    attachments: AttachmentPolicy = section(("attachments",), AttachmentPolicy, AttachmentPolicy)
    # Member address (lower case) -> its exceptions. "table_of": one table
    # per member, [offices."office@example.test"], its key parsed by "key".
    offices: Mapping[str, OfficeException] = field(
        default_factory=_no_offices,
        metadata={"path": ("offices",), "table_of": OfficeException, "key": parse_office_address})
    colleague: ColleaguePolicy = section(("roles", "colleague"), ColleaguePolicy, ColleaguePolicy)
    member: MemberPolicy = section(("roles", "member"), MemberPolicy, MemberPolicy)
    folders: FolderPolicy = section(("folders",), FolderPolicy, FolderPolicy)
    auth: AuthPolicy = section(("auth",), AuthPolicy, AuthPolicy)
    sessions: SessionPolicy = section(("sessions",), SessionPolicy, SessionPolicy)
    passwords: PasswordPolicy = section(("passwords",), PasswordPolicy, PasswordPolicy)

    def office(self, member: str) -> OfficeException:
        """The exceptions of ``member`` (any case), or none."""
        return self.offices.get(member.lower(), OfficeException())
