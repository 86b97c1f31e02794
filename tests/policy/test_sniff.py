"""Tests of postvault.policy.sniff: magic-byte identification.

Each executable sample has a harmless twin that differs in the bytes that
matter, proving the rule is not broader than it should be.
"""

from __future__ import annotations

import io
import struct
import tarfile

import pytest

from postvault.policy.sniff import (
    ARCHIVE_KINDS,
    EXECUTABLE_KINDS,
    SCANNABLE_ARCHIVE_KINDS,
    SNIFF_LEN,
    Kind,
    archive_kind_for_extension,
    sniff,
)


def pe_file(e_lfanew: int = 0x80) -> bytes:
    """A minimal PE: DOS header, stub, "PE\\0\\0" and a COFF header."""
    dos = bytearray(64)
    dos[0:2] = b"MZ"
    dos[2:4] = struct.pack("<H", 0x90)  # bytes on last page
    dos[4:6] = struct.pack("<H", 3)  # pages
    struct.pack_into("<I", dos, 0x3C, e_lfanew)
    body = bytes(dos) + b"This program cannot be run in DOS mode.\r\n$".ljust(e_lfanew - 64, b"\x00")
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 0xF0, 0x22)
    return body + b"PE\x00\x00" + coff + bytes(256)


def elf_file() -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x401000, 64, 0, 0, 64, 56, 1, 64, 0, 0)


def macho_file(magic: bytes = b"\xcf\xfa\xed\xfe") -> bytes:
    return magic + struct.pack("<IIIIII", 0x01000007, 3, 2, 0, 0, 0) + bytes(64)


def fat_macho_file(count: int = 2) -> bytes:
    return b"\xca\xfe\xba\xbe" + struct.pack(">I", count) + bytes(40)


def java_class_file() -> bytes:
    return b"\xca\xfe\xba\xbe" + struct.pack(">HH", 0, 61) + bytes(40)


def tar_file(name: str = "notes.txt", data: bytes = b"hello\n", fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def dicom_file(preamble: bytes = bytes(128)) -> bytes:
    # Preamble, "DICM", then a File Meta Information Group Length element.
    return preamble + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", 0) + bytes(64)


EXECUTABLES = [
    ("pe", pe_file(), Kind.PE),
    ("pe-far-header", pe_file(0x1000), Kind.PE),  # PE signature outside the sniffed prefix
    ("elf", elf_file(), Kind.ELF),
    ("macho-64-le", macho_file(), Kind.MACHO),
    ("macho-32-be", macho_file(b"\xfe\xed\xfa\xce"), Kind.MACHO),
    ("macho-fat", fat_macho_file(), Kind.MACHO),
    ("java-class", java_class_file(), Kind.JAVA_CLASS),
    ("shebang", b"#!/bin/sh\nrm -rf ~\n", Kind.SCRIPT),
    ("shebang-env", b"#!/usr/bin/env python3\nprint(1)\n", Kind.SCRIPT),
    ("shebang-bom", b"\xef\xbb\xbf#!/bin/sh\necho hi\n", Kind.SCRIPT),
    # A PE/DICOM polyglot (CVE-2019-11687): the executable wins.
    ("pe-dicom-polyglot", pe_file()[:128].ljust(128, b"\x00") + dicom_file()[128:], Kind.PE),
]

# The twins: same first letters, not programs.
HARMLESS = [
    ("mz-text", b"MZ,Mozambique,Maputo\nZA,South Africa,Pretoria\n" * 4, Kind.UNKNOWN),
    ("mz-short", b"MZ", Kind.UNKNOWN),
    ("elf-text", b"ELF stands for executable and linkable format\n", Kind.UNKNOWN),
    ("hash-bang-spaced", b"# !/bin/sh is how a script starts\n", Kind.UNKNOWN),
    ("markdown-heading", b"# Referral notes\n\nPatient seen on...\n", Kind.UNKNOWN),
]

DOCUMENTS = [
    ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", Kind.PDF),
    ("jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01" + bytes(32), Kind.JPEG),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(20), Kind.PNG),
    ("gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", Kind.GIF),
    ("tiff-le", b"II*\x00\x08\x00\x00\x00" + bytes(16), Kind.TIFF),
    ("tiff-be", b"MM\x00*\x00\x00\x00\x08" + bytes(16), Kind.TIFF),
    ("heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(16), Kind.HEIC),
    ("dicom", dicom_file(), Kind.DICOM),
    ("stl-ascii", b"solid cube\n facet normal 0 0 1\n  outer loop\n", Kind.UNKNOWN),
    (
        "stl-binary",
        b"binary STL exported by CAD".ljust(80, b" ") + struct.pack("<I", 1) + bytes(50),
        Kind.UNKNOWN,
    ),
]

ARCHIVES = [
    ("zip", b"PK\x03\x04\x14\x00\x00\x00" + bytes(30), Kind.ZIP),
    ("zip-empty", b"PK\x05\x06" + bytes(18), Kind.ZIP),
    ("gzip", b"\x1f\x8b\x08\x00" + bytes(12), Kind.GZIP),
    ("bzip2", b"BZh91AY&SY" + bytes(8), Kind.BZIP2),
    ("xz", b"\xfd7zXZ\x00\x00\x04" + bytes(8), Kind.XZ),
    ("7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(24), Kind.SEVEN_ZIP),
    ("rar4", b"Rar!\x1a\x07\x00" + bytes(16), Kind.RAR),
    ("rar5", b"Rar!\x1a\x07\x01\x00" + bytes(16), Kind.RAR),
    ("cab", b"MSCF\x00\x00\x00\x00" + bytes(32), Kind.CAB),
    ("tar-ustar", tar_file(), Kind.TAR),
]


@pytest.mark.parametrize(
    "data,kind",
    [pytest.param(d, k, id=i) for i, d, k in EXECUTABLES + HARMLESS + DOCUMENTS + ARCHIVES],
)
def test_sniff_table(data: bytes, kind: Kind) -> None:
    assert sniff(data[:SNIFF_LEN]) is kind


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d, _ in EXECUTABLES])
def test_executables_are_executable(data: bytes) -> None:
    assert sniff(data) in EXECUTABLE_KINDS


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d, _ in HARMLESS + DOCUMENTS + ARCHIVES])
def test_twins_are_not_executable(data: bytes) -> None:
    assert sniff(data) not in EXECUTABLE_KINDS


def test_v7_tar_needs_a_valid_checksum() -> None:
    good = bytearray(tar_file(fmt=tarfile.USTAR_FORMAT)[:512])
    good[257:265] = bytes(8)  # drop the ustar magic: an old V7 header
    # Recompute the checksum over the changed header.
    good[148:156] = b" " * 8
    good[148:156] = b"%06o\x00 " % sum(good)
    assert sniff(bytes(good)) is Kind.TAR
    bad = bytearray(good)
    bad[0] ^= 0x01  # the name changed, the checksum did not
    assert sniff(bytes(bad)) is Kind.UNKNOWN


def test_fat_binary_and_java_are_told_apart_by_the_second_word() -> None:
    assert sniff(fat_macho_file(1)) is Kind.MACHO
    assert sniff(fat_macho_file(44)) is Kind.MACHO
    assert sniff(java_class_file()) is Kind.JAVA_CLASS


@pytest.mark.parametrize("data", [b"", b"M", b"MZ\x00", b"\x7fEL", b"PK", b"\x00" * 600, b"\xff" * 5000])
def test_short_and_odd_inputs_never_raise(data: bytes) -> None:
    assert isinstance(sniff(data), Kind)


def test_kind_sets() -> None:
    assert SCANNABLE_ARCHIVE_KINDS <= ARCHIVE_KINDS
    assert not EXECUTABLE_KINDS & ARCHIVE_KINDS


@pytest.mark.parametrize(
    "ext,kind",
    [("zip", Kind.ZIP), ("7z", Kind.SEVEN_ZIP), ("rar", Kind.RAR), ("pdf", None), ("gz", None)],
)
def test_archive_kind_for_extension(ext: str, kind: Kind | None) -> None:
    assert archive_kind_for_extension(ext) is kind
