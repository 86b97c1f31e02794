"""Archive scanning in memory, with limits.

An archive is a way to carry a blocked file past a check that only reads the
attachment's own name, and a way to make a scanner (or the recipient's
computer) expand a few kilobytes into gigabytes.  This module opens zip, tar,
gzip, bzip2 and xz archives entirely in memory and checks what is inside
with the same rules as a top-level attachment, under hard limits:

* **Names.**  Every member name is checked by the caller's name rule (the one
  that checks MIME file names), plus zip's Info-ZIP Unicode Path extra field
  (0x7075), which 7-Zip and WinRAR show instead of the plain name, and the
  original file name stored in a gzip header (RFC 1952 section 2.3.1, FNAME).
  Path traversal (``..``) and absolute paths inside archives are refused too
  ("zip slip": an extractor writing outside the folder it was asked to use).
* **Contents.**  The first bytes of every member are sniffed: a program is
  refused, an archive is opened in turn, up to ``max_depth`` archives deep
  (deeper is refused: nesting is a classic way to outrun a scanner).
* **Encryption.**  A password-protected zip member (general purpose flag
  bit 0, APPNOTE.TXT section 4.4.4; also set for WinZip AES) cannot be
  checked, so it is refused when the policy says so.
* **Bombs.**  The sizes a zip declares in its central directory are checked
  before anything is decompressed: more than ``max_total`` in all, or more
  than ``max_ratio`` times the archive's own size, is refused without
  expanding a byte.  Decompression then runs in bounded pieces against a
  running budget, so a header that lies cannot make this process allocate
  more than the budget: :mod:`zipfile` never returns more than a member's
  declared size, and gzip, bzip2 and xz streams are decompressed with the
  incremental decompressors' ``max_length``.  Every decompressed byte, at
  every nesting level, is charged to one budget per attachment.
* **Everything else fails closed.**  A damaged archive, an unsupported
  compression method, or a 7z, RAR or cabinet archive (the standard library
  cannot open them) is reported, not skipped: what cannot be checked is not
  let through.

The module is pure: bytes in, a :class:`Finding` (or ``None``) out.  It
knows nothing about MIME or about which names are blocked; the caller passes
the name rule in.
"""

from __future__ import annotations

import bz2
import enum
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, Self

from postvault.policy.schema import AttachmentPolicy
from postvault.policy.sniff import (
    ARCHIVE_KINDS,
    EXECUTABLE_KINDS,
    SCANNABLE_ARCHIVE_KINDS,
    SNIFF_LEN,
    Kind,
    archive_kind_for_extension,
    sniff,
)

__all__ = [
    "MAX_MEMBERS",
    "RATIO_FLOOR",
    "Finding",
    "Limits",
    "NameCheck",
    "Problem",
    "scan_archive",
]

# Members per attachment, all nesting levels together.  Not a policy.toml
# setting: no legitimate attachment comes near it, and it bounds the work a
# zip with a huge central directory of empty entries can cause.
MAX_MEMBERS = 10_000
# The ratio limit only applies once an archive expands past this: a 300-byte
# zip of a 40 KB text file has ratio 130 and is harmless; bombs are about size.
RATIO_FLOOR = 1024 * 1024
# Decompression granularity: the most any single step allocates.
_PIECE = 64 * 1024


class Problem(enum.Enum):
    """Why an archive is refused."""

    NAME = "name"  # a member name breaks the name rules; detail: the caller's problem
    PATH = "path"  # a member path leaves the extraction folder ("..", absolute)
    EXECUTABLE = "executable"  # a member is a program; detail: its Kind
    TOO_DEEP = "too_deep"  # archives nested deeper than max_depth
    ENCRYPTED = "encrypted"  # a password-protected member
    BOMB = "bomb"  # expands past max_total, or more than max_ratio times its size
    DAMAGED = "damaged"  # cannot be parsed
    UNSUPPORTED = "unsupported"  # a format or method that cannot be opened; detail: Kind or None


@dataclass(frozen=True)
class Finding:
    """A reason to refuse an archive.

    ``members`` is the path to the member concerned, outermost first (the
    attachment itself is not included); it is empty when the archive as a
    whole is at fault.  Member names are the sender's text: callers must
    escape them before showing them.
    """

    problem: Problem
    members: tuple[str, ...] = ()
    detail: object = None


@dataclass(frozen=True)
class Limits:
    """The archive settings of an :class:`AttachmentPolicy`, in one place."""

    max_depth: int = 3
    max_ratio: int = 100
    max_total: int = 200 * 1024 * 1024
    block_encrypted: bool = True
    sniff_executables: bool = True
    max_members: int = MAX_MEMBERS

    @classmethod
    def from_policy(cls, policy: AttachmentPolicy) -> Limits:
        return cls(
            max_depth=policy.archive_max_depth,
            max_ratio=policy.archive_max_ratio,
            max_total=policy.archive_max_total,
            block_encrypted=policy.block_encrypted_archives,
            sniff_executables=policy.sniff_content,
        )


# The caller's name rule: a member name in, None if fine, else any object
# describing the problem (it is handed back in Finding.detail).
NameCheck = Callable[[str], object | None]


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Stop(Exception):
    """Internal: carries a Finding up through the nested scan."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.problem.value)
        self.finding = finding


# What the standard library raises on malformed archives.  zipfile, tarfile
# and the decompressors are not documented to raise only their own errors:
# hostile input reaches struct, codecs and seek arithmetic inside them.
# RuntimeError covers zipfile's "password required" (members we never open).
_DAMAGED_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    ValueError,
    struct.error,
    UnicodeError,
    IndexError,
    KeyError,
    OverflowError,
    RuntimeError,
)


def scan_archive(
    data: bytes,
    kind: Kind,
    limits: Limits,
    check_name: NameCheck,
) -> Finding | None:
    """Check the archive ``data`` of the given ``kind`` (from :func:`sniff`).

    The attachment itself counts as depth 1.  Returns ``None`` when every
    member passes, else the first :class:`Finding`.  Never raises for any
    content of ``data``.
    """
    scanner = _Scanner(limits, check_name)
    try:
        scanner.scan(data, kind, (), 1)
    except _Stop as stop:
        return stop.finding
    return None


# ------------------------------------------------------------------ helpers


def _read_up_to(f: _Readable, n: int) -> bytes:
    """Read up to ``n`` bytes, looping over short reads."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        piece = f.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _extension(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1].rstrip(" .")
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _unicode_path_extra(extra: bytes) -> str | None:
    """The Info-ZIP Unicode Path extra field (0x7075), if present.

    Layout (APPNOTE.TXT 4.6.9): version (1 byte, 1), CRC-32 of the plain
    header name (4 bytes), then the UTF-8 name.  Extractors that know the
    field show this name, whatever the plain one says, so both are checked.
    """
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + size]
        if tag == 0x7075 and len(body) >= 5:
            return body[5:].decode("utf-8", "replace")
        pos += 4 + size
    return None


def _gzip_fname(data: bytes) -> str | None:
    """The original file name stored in a gzip header (RFC 1952 2.3.1)."""
    if len(data) < 10:
        return None
    flags = data[3]
    pos = 10
    if flags & 0x04:  # FEXTRA: 2-byte length, then that many bytes
        if len(data) < 12:
            return None
        pos = 12 + int.from_bytes(data[10:12], "little")
    if not flags & 0x08:  # FNAME
        return None
    end = data.find(b"\x00", pos)
    if end < 0:
        return None
    # RFC 1952: "The name must consist of ISO 8859-1 (LATIN-1) characters".
    return data[pos:end].decode("latin-1")


def _path_escapes(name: str) -> bool:
    """True for a member path that would be written outside the folder it is
    extracted to: an absolute path, a drive letter, or a ".." component."""
    path = name.replace("\\", "/")
    drive = len(path) >= 2 and path[1] == ":" and path[0].isascii() and path[0].isalpha()
    if path.startswith("/") or drive:
        return True
    return ".." in path.split("/")


class _PieceReader:
    """A read-only file object over an iterator of byte pieces (for tarfile's
    stream mode and for sniffing decompressed data)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = b""
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buf[self._pos :]]
            parts.extend(self._pieces)
            self._buf, self._pos = b"", 0
            return b"".join(parts)
        while len(self._buf) - self._pos < n:
            piece = next(self._pieces, None)
            if piece is None:
                break
            # Keep only the unread tail: memory stays at about one piece.
            self._buf = self._buf[self._pos :] + piece
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out


class _StrictTarInfo(tarfile.TarInfo):
    """A TarInfo that turns a bad header after the first into an error.

    tarfile silently stops at a corrupt header once it has read one member,
    while GNU tar skips to the next valid header and goes on extracting:
    members after the corrupt block would reach the recipient unchecked.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:  # type: ignore[attr-defined]
            raise tarfile.ReadError("corrupt tar header") from exc


# ------------------------------------------------------------------ scanner


class _Scanner:
    """One attachment's scan: the budget and member count span all levels."""

    def __init__(self, limits: Limits, check_name: NameCheck) -> None:
        self.limits = limits
        self.check_name = check_name
        self.remaining = limits.max_total
        self.members = 0

    # -- bookkeeping

    def _bomb(self, members: tuple[str, ...]) -> _Stop:
        return _Stop(Finding(Problem.BOMB, members))

    def _ratio_limit(self, compressed: int) -> int:
        return max(self.limits.max_ratio * compressed, RATIO_FLOOR)

    def _count(self, n: int, path: tuple[str, ...]) -> None:
        self.members += n
        if self.members > self.limits.max_members:
            raise self._bomb(path)

    def _charge_declared(self, declared: int, compressed: int, path: tuple[str, ...]) -> None:
        if declared > self.remaining or declared > self._ratio_limit(compressed):
            raise self._bomb(path)
        self.remaining -= declared

    def _check_member_name(self, names: list[str], path: tuple[str, ...]) -> None:
        for name in names:
            if _path_escapes(name):
                raise _Stop(Finding(Problem.PATH, path + (name,)))
            problem = self.check_name(name)
            if problem is not None:
                raise _Stop(Finding(Problem.NAME, path + (name,), problem))

    # -- dispatch

    def scan(self, data: bytes, kind: Kind, path: tuple[str, ...], depth: int) -> None:
        if depth > self.limits.max_depth:
            raise _Stop(Finding(Problem.TOO_DEEP, path))
        if kind not in SCANNABLE_ARCHIVE_KINDS:
            raise _Stop(Finding(Problem.UNSUPPORTED, path, kind))
        try:
            if kind is Kind.ZIP:
                self._zip(data, path, depth)
            elif kind is Kind.TAR:
                self._tar(io.BytesIO(data), "r:", path, depth)
            else:
                self._compressed(data, kind, path, depth)
        except NotImplementedError:
            # zipfile: a compression method or strong encryption it lacks.
            raise _Stop(Finding(Problem.UNSUPPORTED, path)) from None
        except _DAMAGED_ERRORS:
            raise _Stop(Finding(Problem.DAMAGED, path)) from None

    def _inspect(
        self,
        f: _Readable,
        path: tuple[str, ...],
        depth: int,
        name: str,
    ) -> None:
        """Sniff one member (``name``, at ``path``); open it if it is an
        archive, by its content or by a name that desktops open as one."""
        head = _read_up_to(f, SNIFF_LEN)
        kind = sniff(head)
        if self.limits.sniff_executables and kind in EXECUTABLE_KINDS:
            raise _Stop(Finding(Problem.EXECUTABLE, path, kind))
        inner = kind if kind in ARCHIVE_KINDS else archive_kind_for_extension(_extension(name))
        if inner is None:
            return
        if depth + 1 > self.limits.max_depth:
            raise _Stop(Finding(Problem.TOO_DEEP, path))
        if inner not in SCANNABLE_ARCHIVE_KINDS:
            raise _Stop(Finding(Problem.UNSUPPORTED, path, inner))
        parts = [head]
        got = len(head)
        while True:
            piece = f.read(_PIECE)
            if not piece:
                break
            got += len(piece)
            # zipfile stops at the declared size and streams are metered, so
            # this is a second fence, not the only one.
            if got > self.limits.max_total:
                raise self._bomb(path)
            parts.append(piece)
        self.scan(b"".join(parts), inner, path, depth + 1)

    # -- zip

    def _zip_entry_count(self, data: bytes) -> int | None:
        """Entries the end-of-central-directory record declares, before
        zipfile builds a ZipInfo for each (APPNOTE 4.3.16)."""
        eocd = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
        if eocd < 0 or eocd + 12 > len(data):
            return None
        (total,) = struct.unpack_from("<H", data, eocd + 10)
        return None if total == 0xFFFF else total  # 0xFFFF: see the Zip64 record

    def _zip(self, data: bytes, path: tuple[str, ...], depth: int) -> None:
        declared_entries = self._zip_entry_count(data)
        if declared_entries is not None and self.members + declared_entries > self.limits.max_members:
            raise self._bomb(path)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            self._count(len(infos), path)
            # Declared sizes first: a bomb is refused before anything expands.
            self._charge_declared(sum(i.file_size for i in infos), len(data), path)
            for info in infos:
                # orig_filename keeps what zipfile cuts at a NUL byte.
                names = [info.orig_filename, info.filename]
                unicode_name = _unicode_path_extra(info.extra)
                if unicode_name is not None:
                    names.append(unicode_name)
                self._check_member_name(list(dict.fromkeys(names)), path)
            if self.limits.block_encrypted:
                for info in infos:
                    if info.flag_bits & 0x1:
                        raise _Stop(Finding(Problem.ENCRYPTED, path + (info.filename,)))
            for info in infos:
                if info.is_dir() or info.flag_bits & 0x1:
                    # An encrypted member that the policy lets through cannot
                    # be read without its password; its name was checked.
                    continue
                # zf.open also compares the local header's name with the
                # central directory's and raises on a mismatch (a trick to
                # show one name to scanners and another to extractors).
                with zf.open(info) as f:
                    self._inspect(f, path + (info.filename,), depth, info.filename)

    # -- tar

    def _tar(self, fileobj: io.BytesIO | _Chain, mode: str, path: tuple[str, ...], depth: int) -> None:
        with tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_StrictTarInfo) as tf:  # type: ignore[call-overload]
            for member in tf:
                self._count(1, path)
                names = [member.name]
                if member.issym() or member.islnk():
                    # A link is only as safe as what it points at.
                    names.append(member.linkname)
                self._check_member_name(names, path)
                if member.isreg():
                    f = tf.extractfile(member)
                    if f is not None:
                        self._inspect(f, path + (member.name,), depth, member.name)
            # Whatever follows the end-of-archive blocks must be padding:
            # "tar --ignore-zeros" would find members hidden after them.
            rest = tf.fileobj
            if rest is not None:
                while True:
                    piece = rest.read(_PIECE)
                    if not piece:
                        break
                    if piece.strip(b"\x00"):
                        raise tarfile.ReadError("data after the end of the archive")

    # -- gzip, bzip2, xz

    def _compressed(self, data: bytes, kind: Kind, path: tuple[str, ...], depth: int) -> None:
        inner_name = _gzip_fname(data) if kind is Kind.GZIP else None
        if inner_name:
            self._check_member_name([inner_name], path)
        inner_path = path + (inner_name,) if inner_name else path
        limit = self._ratio_limit(len(data))
        produced = 0

        def metered() -> Iterator[bytes]:
            nonlocal produced
            for piece in _decompress(data, kind):
                produced += len(piece)
                self.remaining -= len(piece)
                if self.remaining < 0 or produced > limit:
                    raise self._bomb(path)
                yield piece

        reader = _PieceReader(metered())
        head = _read_up_to(reader, SNIFF_LEN)
        stream = _Chain(head, reader)
        if sniff(head) is Kind.TAR:
            # .tar.gz and friends: one archive to a person, so one level.
            self._tar(stream, "r|", path, depth)
        else:
            self._inspect(stream, inner_path, depth, inner_name or "")
        # Drain whatever is left, metered, so a bomb cannot hide behind an
        # innocent first few kilobytes.
        while reader.read(_PIECE):
            pass


class _Chain:
    """Already-read bytes followed by the rest of a reader."""

    def __init__(self, head: bytes, rest: _PieceReader) -> None:
        self._head = head
        self._pos = 0
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if self._pos < len(self._head):
            if n is None or n < 0:
                out = self._head[self._pos :] + self._rest.read()
                self._pos = len(self._head)
                return out
            out = self._head[self._pos : self._pos + n]
            self._pos += len(out)
            return out
        return self._rest.read(n)


def _decompress(data: bytes, kind: Kind) -> Iterator[bytes]:
    """Decompressed pieces of at most _PIECE bytes each, across concatenated
    members/streams (gzip(1), bzip2(1) and xz(1) all read those as one)."""
    if kind is Kind.GZIP:
        yield from _gunzip(data)
        return
    pending = data
    while True:
        if kind is Kind.BZIP2:
            d: bz2.BZ2Decompressor | lzma.LZMADecompressor = bz2.BZ2Decompressor()
        else:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        out = d.decompress(pending, _PIECE)
        while True:
            if out:
                yield out
            if d.eof:
                break
            if d.needs_input:
                raise EOFError("compressed stream is truncated")
            out = d.decompress(b"", _PIECE)
        rest = d.unused_data
        if kind is Kind.XZ:
            rest = rest.lstrip(b"\x00")  # xz stream padding (xz file format 2.2)
        magic = b"BZh" if kind is Kind.BZIP2 else b"\xfd7zXZ\x00"
        if not rest.startswith(magic):
            return  # trailing garbage is ignored, as the command-line tools do
        pending = rest


def _gunzip(data: bytes) -> Iterator[bytes]:
    pending: bytes = data
    while True:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        buf = pending
        while not d.eof:
            out = d.decompress(buf, _PIECE)
            progressed = bool(out) or len(d.unconsumed_tail) < len(buf)
            buf = d.unconsumed_tail
            if out:
                yield out
            elif not buf or not progressed:
                if d.eof:
                    break
                raise EOFError("gzip stream is truncated")
        rest = d.unused_data
        if not rest.startswith(b"\x1f\x8b"):
            return  # gzip(1): "trailing garbage ignored"
        pending = rest
