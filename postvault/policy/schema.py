"""The policy as plain, immutable data: what ``conf/policy.toml`` says,
after loading and validation (``load.py``). Decisions take these objects as
arguments; nothing here does I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

MiB = 1024 * 1024

DEFAULT_BLOCKED_EXTENSIONS: frozenset[str] = frozenset(
    """ace ade adp ani apk app appref-ms appx appxbundle arj asp aspx asx bas bat cab cdxml cer chm cmd cnt com
    cpl crt csh deb der dex diagcab diagcfg diagpkg dll dmg docm elf ex ex_ exe fxp gadget grp hlp hpj hta htc
    img inf ins iso isp its jar jnlp js jse kext ksh lha lib library lnk lzh macho mad maf mag mam maq mar mas mat
    mau mav maw mcf mda mdb mde mdt mdw mdz mht mhtml mjs msc msh msh1 msh2 msh1xml msh2xml mshxml msi msix
    msixbundle msp mst nsh ops osd pcd pif pkg pl plg prf prg ps1 ps1xml ps2 ps2xml psc1 psc2 pssc pst py pyc pyo
    pyw pyz pyzw reg rpm scf scr sct shb shk shs sys tmp udl url vb vbe vbp vbs vhd vhdx vsmacros vsw vxd ws wsb
    wsc wsf wsh xbap xll xnk xz z""".split()
)


@dataclass(frozen=True)
class AttachmentPolicy:
    max_size: int = 15 * MiB  # per attachment, decoded
    max_message_size: int = 50 * MiB  # SMTP SIZE, IMAP APPENDLIMIT
    blocked_extensions: frozenset[str] = DEFAULT_BLOCKED_EXTENSIONS
    sniff_content: bool = True
    scan_archives: bool = True
    archive_max_depth: int = 3
    archive_max_ratio: int = 100
    archive_max_total: int = 200 * MiB
    block_encrypted_archives: bool = True
    # MIME bomb limits.
    max_mime_depth: int = 20
    max_parts: int = 500
    max_headers: int = 1000


@dataclass(frozen=True)
class OfficeException:
    """A member's exception, applying to every message in its conversations."""

    allow_extensions: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ColleaguePolicy:
    reply_only: bool = True


@dataclass(frozen=True)
class MemberPolicy:
    may_write_address_book: bool = True
    may_write_members: bool = True


@dataclass(frozen=True)
class FolderPolicy:
    # Canonical folder -> other names that open it (compared case-insensitively).
    aliases: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType(
            {
                "Drafts": ("Draft", "Drafts"),
                "Sent": ("Sent Items", "Sent Messages", "Sent Mail"),
                "Trash": ("Deleted Items", "Deleted Messages", "Bin"),
            }
        )
    )
    allow_user_folders: bool = False


@dataclass(frozen=True)
class AuthPolicy:
    throttle_after: int = 5
    lockout_after: int = 10
    lockout_minutes: int = 15


@dataclass(frozen=True)
class SessionPolicy:
    imap_idle_minutes: int = 30
    web_idle_minutes: int = 30
    web_absolute_hours: int = 12


@dataclass(frozen=True)
class PasswordPolicy:
    min_length: int = 12
    refuse_common: bool = True


@dataclass(frozen=True)
class Policy:
    attachments: AttachmentPolicy = field(default_factory=AttachmentPolicy)
    # Member address (lower case) -> its exceptions.
    offices: Mapping[str, OfficeException] = field(default_factory=lambda: MappingProxyType({}))
    colleague: ColleaguePolicy = field(default_factory=ColleaguePolicy)
    member: MemberPolicy = field(default_factory=MemberPolicy)
    folders: FolderPolicy = field(default_factory=FolderPolicy)
    auth: AuthPolicy = field(default_factory=AuthPolicy)
    sessions: SessionPolicy = field(default_factory=SessionPolicy)
    passwords: PasswordPolicy = field(default_factory=PasswordPolicy)
