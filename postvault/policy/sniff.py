"""Identify a file's type from its first bytes ("magic numbers").

The attachment policy trusts neither a file's name nor its Content-Type:
both are chosen by the sender.  What a recipient's computer will actually
*do* with a file is decided, for executables, by the bytes themselves (the
Windows loader looks for ``MZ``, the Linux kernel for ``\\x7fELF`` or ``#!``,
the macOS loader for a Mach-O magic), so those are recognised here whatever
the file is called.  Archive formats are recognised so that their members can
be checked too, and the common document and image formats so that tests and
logs can say what a file is.

Everything here is pure: :func:`sniff` looks at a ``bytes`` prefix (at most
:data:`SNIFF_LEN` bytes are ever needed) and returns a :class:`Kind`.

Order matters: executables are tested first.  A DICOM file, for instance,
starts with a 128-byte preamble that the standard leaves free for
applications, and "PE/DICOM" polyglots that put a Windows executable header
there are a known attack on medical imaging (CVE-2019-11687); such a file is
a PE first and a DICOM second.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "ARCHIVE_KINDS",
    "EXECUTABLE_KINDS",
    "SCANNABLE_ARCHIVE_KINDS",
    "SNIFF_LEN",
    "Kind",
    "archive_kind_for_extension",
    "sniff",
]

# Enough for every test below: the tar "ustar" magic sits at offset 257, the
# DICOM "DICM" at 128, and the PE signature is looked for at e_lfanew when it
# falls inside this prefix (it usually lies within the first few hundred bytes).
SNIFF_LEN = 4096


class Kind(enum.Enum):
    """What a file is, as far as its first bytes tell.  The value is a label
    a person understands, used in refusal texts."""

    # Executables: refused whatever the name, Content-Type or office exception.
    PE = "a Windows program (PE/MZ)"
    ELF = "a Linux program (ELF)"
    MACHO = "a macOS program (Mach-O)"
    JAVA_CLASS = "a Java program (class file)"
    SCRIPT = 'a script ("#!")'
    # Archives.
    ZIP = "a zip archive"
    GZIP = "a gzip archive"
    BZIP2 = "a bzip2 archive"
    XZ = "an xz archive"
    TAR = "a tar archive"
    SEVEN_ZIP = "a 7z archive"
    RAR = "a RAR archive"
    CAB = "a Windows cabinet archive"
    # Common documents and images (recognised, never refused for their kind).
    PDF = "a PDF document"
    JPEG = "a JPEG image"
    PNG = "a PNG image"
    GIF = "a GIF image"
    TIFF = "a TIFF image"
    HEIC = "a HEIC image"
    DICOM = "a DICOM image"
    UNKNOWN = "a file of unknown type"


EXECUTABLE_KINDS: frozenset[Kind] = frozenset({Kind.PE, Kind.ELF, Kind.MACHO, Kind.JAVA_CLASS, Kind.SCRIPT})
# Everything that holds other files.  Only the scannable ones can be opened
# with the standard library; the others can only be refused or let through.
ARCHIVE_KINDS: frozenset[Kind] = frozenset(
    {Kind.ZIP, Kind.GZIP, Kind.BZIP2, Kind.XZ, Kind.TAR, Kind.SEVEN_ZIP, Kind.RAR, Kind.CAB}
)
SCANNABLE_ARCHIVE_KINDS: frozenset[Kind] = frozenset({Kind.ZIP, Kind.GZIP, Kind.BZIP2, Kind.XZ, Kind.TAR})

_MACHO_MAGICS = (
    b"\xfe\xed\xfa\xce",  # 32-bit, big-endian
    b"\xfe\xed\xfa\xcf",  # 64-bit, big-endian
    b"\xce\xfa\xed\xfe",  # 32-bit, little-endian
    b"\xcf\xfa\xed\xfe",  # 64-bit, little-endian
)
# Universal ("fat") binaries share 0xCAFEBABE with Java class files; the next
# big-endian word is the number of architectures in a fat binary (a handful)
# and the class-file version in a Java class (major version >= 45).  file(1)
# splits them the same way.  Both are programs, so the split only changes
# the label.
_FAT_MAGICS = (b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf")
_JAVA_MIN_MAJOR = 45

_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif"})

# Extensions that make a mail client or desktop open a file as an archive even
# when its first bytes say otherwise: zip readers find the central directory
# from the end of the file, so a zip with anything prepended still opens as
# one; 7-Zip and WinRAR search for their signatures inside a file.
_ARCHIVE_EXTENSIONS: dict[str, Kind] = {
    "zip": Kind.ZIP,
    "zipx": Kind.ZIP,
    "7z": Kind.SEVEN_ZIP,
    "rar": Kind.RAR,
}


def archive_kind_for_extension(extension: str) -> Kind | None:
    """The archive kind a desktop would open a file with this (lower-case,
    dot-less) extension as, if any."""
    return _ARCHIVE_EXTENSIONS.get(extension)


def _is_pe(head: bytes) -> bool:
    """An MS-DOS/PE executable: ``MZ`` (or the rare ``ZM``) and a binary header.

    Two letters alone would also match a text file that happens to start with
    "MZ" (a CSV of country codes: Mozambique is MZ), so something binary is
    required as well: either the "PE\\0\\0" signature where the header's
    e_lfanew field points, or a NUL byte within the 64-byte DOS header.  The
    second test catches every real PE under 16 MiB whatever e_lfanew says,
    because the loader needs e_lfanew inside the file, so its top byte is 0.
    """
    if head[:2] not in (b"MZ", b"ZM") or len(head) < 64:
        return False
    (e_lfanew,) = struct.unpack_from("<I", head, 0x3C)
    if head[e_lfanew : e_lfanew + 4] == b"PE\x00\x00":
        return True
    return b"\x00" in head[2:64]


def _is_tar(head: bytes) -> bool:
    """POSIX/GNU tar ("ustar" at 257), or an old V7 tar recognised by its
    header checksum (which is what tarfile and GNU tar accept too)."""
    if len(head) < 512:
        return False
    if head[257:262] == b"ustar":
        return True
    field = head[148:156].rstrip(b"\x00 ")
    if not field or any(c not in b"01234567" for c in field.lstrip(b" ")):
        return False
    stored = int(field.lstrip(b" "), 8)
    # The checksum is the byte sum of the header with the field itself as spaces.
    computed = sum(head[:148]) + 8 * 0x20 + sum(head[156:512])
    # An all-zero block has checksum 256 and is an end marker, not a file.
    return stored == computed and head[:1] != b"\x00"


def sniff(head: bytes) -> Kind:
    """The kind of file whose content starts with ``head``.

    Pass at least :data:`SNIFF_LEN` bytes when the file is that long; fewer
    bytes can only make recognition less complete, never raise.
    """
    # Executables first (see the module docstring for why).
    if _is_pe(head):
        return Kind.PE
    if head[:4] == b"\x7fELF":
        return Kind.ELF
    if head[:4] in _MACHO_MAGICS:
        return Kind.MACHO
    if head[:4] in _FAT_MAGICS and len(head) >= 8:
        (count,) = struct.unpack_from(">I", head, 4)
        return Kind.MACHO if count < _JAVA_MIN_MAJOR else Kind.JAVA_CLASS
    # The kernel wants "#!" at byte 0; a UTF-8 byte-order mark in front is
    # refused too, since some script hosts skip it.
    if head[:2] == b"#!" or head[:5] == b"\xef\xbb\xbf#!":
        return Kind.SCRIPT
    # Archives.
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return Kind.ZIP
    if head[:3] == b"\x1f\x8b\x08":
        return Kind.GZIP
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":
        return Kind.BZIP2
    if head[:6] == b"\xfd7zXZ\x00":
        return Kind.XZ
    if head[:6] == b"7z\xbc\xaf\x27\x1c":
        return Kind.SEVEN_ZIP
    if head[:7] == b"Rar!\x1a\x07\x00" or head[:8] == b"Rar!\x1a\x07\x01\x00":
        return Kind.RAR
    if head[:8] == b"MSCF\x00\x00\x00\x00":
        return Kind.CAB
    if _is_tar(head):
        return Kind.TAR
    # Documents and images.
    if head[128:132] == b"DICM":  # after the 128-byte preamble
        return Kind.DICOM
    # Acrobat accepts the header anywhere in the first 1024 bytes.
    if b"%PDF-" in head[:1024]:
        return Kind.PDF
    if head[:3] == b"\xff\xd8\xff":
        return Kind.JPEG
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return Kind.PNG
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Kind.GIF
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return Kind.TIFF
    if head[4:8] == b"ftyp" and head[8:12] in _HEIC_BRANDS:
        return Kind.HEIC
    return Kind.UNKNOWN
