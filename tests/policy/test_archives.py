"""Tests of postvault.policy.archives: archives opened in memory, with limits.

The archives are made here, byte for byte where a library would refuse to
make them (an encrypted zip without a password tool, a zip whose names
disagree, bombs that expand to hundreds of megabytes while the test holds
only a few hundred kilobytes).  Most tests go through check_attachments, as
a sender would; a few call scan_archive directly for its own limits.
"""

from __future__ import annotations

import bz2
import gzip
import io
import shutil
import struct
import subprocess
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest

from postvault.policy.archives import Finding, Limits, Problem, scan_archive
from postvault.policy.attachments import name_problem
from postvault.policy.decision import ALLOW
from postvault.policy.schema import DEFAULT_BLOCKED_EXTENSIONS, AttachmentPolicy, MiB
from postvault.policy.sniff import Kind
from tests.policy.test_attachments import (
    JPEG,
    PDF,
    assert_refused,
    attachment,
    check,
    make_zip,
    message,
    ooxml,
)
from tests.policy.test_sniff import elf_file, pe_file


def as_attachment(data: bytes, name: str, policy: AttachmentPolicy | None = None):  # type: ignore[no-untyped-def]
    return check(message(attachment(data, name, "application/octet-stream")), policy or AttachmentPolicy())


def names(n: str) -> object:
    return name_problem(n, DEFAULT_BLOCKED_EXTENSIONS)


def make_tar(files: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def nested_zip(levels: int, inner: bytes = PDF) -> bytes:
    """``levels`` zips, each holding the next; the innermost holds a PDF."""
    data = make_zip({"scan.pdf": inner})
    for level in range(levels - 1):
        data = make_zip({f"level{levels - 1 - level}.zip": data})
    return data


# ---------------------------------------------------------------- bombs, made small


def deflate_zeros(total: int, block: int = 1 << 20) -> tuple[bytes, int]:
    """A raw deflate stream of ``total`` zero bytes, and its CRC-32, built
    without ever holding more than one block: after a full flush the
    compressor has no history, so every block compresses to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(block)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    count = total // block
    stream = first + again * (count - 1) + c.flush()
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    return stream, crc


def zip_from_deflate(name: bytes, stream: bytes, crc: int, size: int, declared: int | None = None) -> bytes:
    """A one-member zip around a raw deflate stream (APPNOTE 4.3.7, 4.3.12, 4.3.16);
    ``declared`` may lie about the uncompressed size."""
    usize = size if declared is None else declared
    local = (
        struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(stream), usize, len(name), 0) + name
    )
    central = (
        struct.pack(
            "<4s6H3I5HII",
            b"PK\x01\x02",
            20,
            20,
            0,
            8,
            0,
            0,
            crc,
            len(stream),
            usize,
            len(name),
            0,
            0,
            0,
            0,
            0,
            0,
        )
        + name
    )
    eocd = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(stream), 0)
    return local + stream + central + eocd


def gzip_from_deflate(stream: bytes, crc: int, size: int) -> bytes:
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + stream + struct.pack("<II", crc, size & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def zeros_300mb() -> tuple[bytes, int, int]:
    size = 300 * 1024 * 1024
    stream, crc = deflate_zeros(size)
    return stream, crc, size


def peak_memory(fn):  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zip_bomb_refused_from_its_declared_sizes(zeros_300mb: tuple[bytes, int, int]) -> None:
    stream, crc, size = zeros_300mb
    bomb = zip_from_deflate(b"zeros.bin", stream, crc, size)
    assert len(bomb) < 400_000  # 300 MiB of zeros in about 300 KB
    start = time.perf_counter()
    d, peak = peak_memory(lambda: as_attachment(bomb, "backup.zip"))
    assert time.perf_counter() - start < 1.0
    assert_refused(d, "attachment.archive_bomb", 552, "5.3.4")
    assert "backup.zip" in d.text
    assert peak < 20 * MiB  # nothing was expanded
    # The same bytes, declared honestly but small enough: still a bomb by ratio.
    assert scan_archive(bomb, Kind.ZIP, Limits(), names) == Finding(Problem.BOMB)


def overlapping_zip_bomb(entries: int = 180, block: int = 2 * MiB) -> bytes:
    """A zip of a few kilobytes that really expands to ``entries * block``
    bytes: every central directory entry points at the same compressed
    member (the "overlapping files" construction, Fifield 2019)."""
    stream, crc = deflate_zeros(block)
    name = b"zeros.bin"
    local = (
        struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(stream), block, len(name), 0) + name
    )
    entry = (
        struct.pack(
            "<4s6H3I5HII",
            b"PK\x01\x02",
            20,
            20,
            0,
            8,
            0,
            0,
            crc,
            len(stream),
            block,
            len(name),
            0,
            0,
            0,
            0,
            0,
            0,
        )
        + name
    )
    central = entry * entries
    eocd = struct.pack(
        "<4s4H2IH", b"PK\x05\x06", 0, 0, entries, entries, len(central), len(local) + len(stream), 0
    )
    return local + stream + central + eocd


def test_ten_kilobyte_zip_bomb_is_refused_without_expanding() -> None:
    bomb = overlapping_zip_bomb()
    assert len(bomb) < 16_000
    with zipfile.ZipFile(io.BytesIO(bomb)) as zf:  # what any extractor would write out
        assert sum(i.file_size for i in zf.infolist()) == 360 * MiB
    start = time.perf_counter()
    d, peak = peak_memory(lambda: as_attachment(bomb, "scans.zip"))
    assert time.perf_counter() - start < 0.5
    assert_refused(d, "attachment.archive_bomb", 552, "5.3.4")
    assert peak < 5 * MiB
    # Its honest twin: one of the entries alone, 2 MiB of zeros from 2 KB, is
    # still refused by ratio; with a generous ratio it passes.
    single = overlapping_zip_bomb(entries=1)
    assert_refused(as_attachment(single, "scans.zip"), "attachment.archive_bomb")
    assert as_attachment(single, "scans.zip", AttachmentPolicy(archive_max_ratio=10_000)) == ALLOW


def test_zip_that_lies_about_its_size_is_not_expanded(zeros_300mb: tuple[bytes, int, int]) -> None:
    stream, crc, size = zeros_300mb
    # Declares 1 KB; a nested ".zip" member is read in full, so this is the
    # path where a lying header could make the scanner allocate.
    liar = zip_from_deflate(b"inner.zip", stream, crc, size, declared=1024)
    d, peak = peak_memory(
        lambda: as_attachment(make_zip({"outer.zip": liar}, zipfile.ZIP_STORED), "records.zip")
    )
    assert not d.allowed
    assert d.rule in ("attachment.archive_damaged", "attachment.archive_bomb")
    assert peak < 20 * MiB


def test_gzip_bomb_refused_by_ratio_while_streaming(zeros_300mb: tuple[bytes, int, int]) -> None:
    stream, crc, size = zeros_300mb
    bomb = gzip_from_deflate(stream, crc, size)
    start = time.perf_counter()
    d, peak = peak_memory(lambda: as_attachment(bomb, "log.txt.gz"))
    assert time.perf_counter() - start < 2.0
    assert_refused(d, "attachment.archive_bomb", 552, "5.3.4")
    assert peak < 20 * MiB


def test_gzip_bomb_refused_by_total_when_ratio_allows() -> None:
    stream, crc = deflate_zeros(64 * MiB)
    bomb = gzip_from_deflate(stream, crc, 64 * MiB)
    policy = AttachmentPolicy(archive_max_ratio=1_000_000, archive_max_total=16 * MiB)
    d, peak = peak_memory(lambda: as_attachment(bomb, "log.txt.gz", policy))
    assert_refused(d, "attachment.archive_bomb")
    assert peak < 20 * MiB
    assert as_attachment(gzip.compress(PDF), "log.pdf.gz", policy) == ALLOW


@pytest.mark.parametrize(
    "size,allowed",
    [
        pytest.param(5 * MiB, False, id="5MiB-zeros-ratio-1000"),
        pytest.param(512 * 1024, True, id="512KiB-zeros-under-floor"),
    ],
)
def test_ratio_limit(size: int, allowed: bool) -> None:
    data = make_zip({"blank.bmp": bytes(size)})
    d = as_attachment(data, "blank.zip")
    assert d.allowed is allowed, d
    if not allowed:
        assert_refused(d, "attachment.archive_bomb")


def test_incompressible_archive_passes_the_ratio_limit() -> None:
    import random

    rnd = random.Random(7).randbytes(3 * MiB)
    assert as_attachment(make_zip({"photo.jpg": JPEG + rnd}), "photos.zip") == ALLOW


def test_member_count_limit() -> None:
    data = make_zip({f"f{i}.txt": b"x" for i in range(5)})
    assert scan_archive(data, Kind.ZIP, Limits(max_members=5), names) is None
    assert scan_archive(data, Kind.ZIP, Limits(max_members=4), names) == Finding(Problem.BOMB)


# ---------------------------------------------------------------- nesting


@pytest.mark.parametrize("levels,allowed", [(1, True), (3, True), (4, False)])
def test_nested_zips_up_to_the_depth_limit(levels: int, allowed: bool) -> None:
    d = as_attachment(nested_zip(levels), "records.zip")
    if allowed:
        assert d == ALLOW
    else:
        assert_refused(d, "attachment.archive_depth", 554, "5.6.0")


def test_depth_limit_follows_the_policy() -> None:
    assert as_attachment(nested_zip(4), "r.zip", AttachmentPolicy(archive_max_depth=4)) == ALLOW
    assert_refused(
        as_attachment(nested_zip(2), "r.zip", AttachmentPolicy(archive_max_depth=1)),
        "attachment.archive_depth",
    )


def test_program_deep_inside_is_found() -> None:
    d = as_attachment(nested_zip(3, inner=pe_file()), "records.zip")
    assert_refused(d, "attachment.executable", 550, "5.7.1")
    assert "level1.zip / level2.zip / scan.pdf" in d.text


def test_tar_gz_is_one_level() -> None:
    tgz = make_tar({"records.zip": nested_zip(2)}, "w:gz")
    assert as_attachment(tgz, "records.tar.gz") == ALLOW  # gzip+tar, zip, zip: 3 levels
    tgz = make_tar({"records.zip": nested_zip(3)}, "w:gz")
    assert_refused(as_attachment(tgz, "records.tar.gz"), "attachment.archive_depth")


# ---------------------------------------------------------------- members

# (id, archive builder, name, the rule it breaks, its harmless twin)
MEMBER_CASES = [
    (
        "zip-exe",
        lambda: make_zip({"docs/setup.exe": b"data"}),
        "docs.zip",
        "attachment.extension",
        lambda: make_zip({"docs/setup.pdf": PDF}),
    ),
    (
        "zip-double",
        lambda: make_zip({"scan.exe.pdf": PDF}),
        "docs.zip",
        "attachment.extension",
        lambda: make_zip({"scan.v2.pdf": PDF}),
    ),
    (
        "zip-bidi",
        lambda: make_zip({"xray\u202egnp.exe": PDF}),
        "docs.zip",
        "attachment.name_bidi",
        lambda: make_zip({"xray-gnp.png": PDF}),
    ),
    (
        "zip-pe-as-pdf",
        lambda: make_zip({"scan.pdf": pe_file()}),
        "docs.zip",
        "attachment.executable",
        lambda: make_zip({"scan.pdf": PDF}),
    ),
    (
        "zip-script-as-txt",
        lambda: make_zip({"readme.txt": b"#!/bin/sh\nid\n"}),
        "docs.zip",
        "attachment.executable",
        lambda: make_zip({"readme.txt": b"# read me\n"}),
    ),
    (
        "zip-slip",
        lambda: make_zip({"../../Startup/notes.pdf": PDF}),
        "docs.zip",
        "attachment.archive_path",
        lambda: make_zip({"Startup/notes.pdf": PDF}),
    ),
    (
        "zip-absolute",
        lambda: make_zip({"/etc/cron.d/job.txt": b"x"}),
        "docs.zip",
        "attachment.archive_path",
        lambda: make_zip({"etc/cron.d/job.txt": b"x"}),
    ),
    (
        "docx-with-program",
        lambda: _docx_with({"word/embeddings/oleObject1.bin": pe_file()}),
        "letter.docx",
        "attachment.executable",
        lambda: _docx_with({"word/embeddings/oleObject1.bin": bytes(100)}),
    ),
    (
        "tar-elf",
        lambda: make_tar({"tools/backup.sh": elf_file()}),
        "tools.tar",
        "attachment.executable",
        lambda: make_tar({"tools/notes.txt": b"notes"}),
    ),
    (
        "tgz-exe",
        lambda: make_tar({"setup.exe": b"x"}, "w:gz"),
        "tools.tgz",
        "attachment.extension",
        lambda: make_tar({"setup.pdf": PDF}, "w:gz"),
    ),
    (
        "tbz2-pe",
        lambda: make_tar({"x.jpg": pe_file()}, "w:bz2"),
        "photos.tar.bz2",
        "attachment.executable",
        lambda: make_tar({"x.jpg": JPEG}, "w:bz2"),
    ),
    (
        "tar-symlink",
        lambda: _tar_with_link("notes.pdf", "payload.exe"),
        "links.tar",
        "attachment.extension",
        lambda: _tar_with_link("notes.pdf", "payload.pdf"),
    ),
    (
        "gzip-pe",
        lambda: gzip.compress(pe_file()),
        "scan.pdf.gz",
        "attachment.executable",
        lambda: gzip.compress(PDF),
    ),
    (
        "bzip2-elf",
        lambda: bz2.compress(elf_file()),
        "scan.pdf.bz2",
        "attachment.executable",
        lambda: bz2.compress(PDF),
    ),
    (
        "gzip-fname",
        lambda: _gzip_named(PDF, "payload.exe"),
        "notes.pdf.gz",
        "attachment.extension",
        lambda: _gzip_named(PDF, "notes.pdf"),
    ),
    (
        "zip-in-gzip",
        lambda: gzip.compress(make_zip({"a.exe": b"x"})),
        "a.zip.gz",
        "attachment.extension",
        lambda: gzip.compress(make_zip({"a.pdf": PDF})),
    ),
]


def _docx_with(extra: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(io.BytesIO(ooxml("docx"))) as zf:
        files = {i.filename: zf.read(i) for i in zf.infolist()}
    return make_zip({**files, **extra})


def _tar_with_link(name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        tf.addfile(info)
    return buf.getvalue()


def _gzip_named(data: bytes, fname: str) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename=fname, mode="wb", fileobj=buf, mtime=0) as g:
        g.write(data)
    return buf.getvalue()


@pytest.mark.parametrize(
    "build,name,rule,twin",
    [pytest.param(b, n, r, t, id=i) for i, b, n, r, t in MEMBER_CASES],
)
def test_members_are_checked_like_attachments(build, name: str, rule: str, twin) -> None:  # type: ignore[no-untyped-def]
    d = as_attachment(build(), name)
    assert_refused(d, rule)
    assert name in d.text
    assert as_attachment(twin(), name) == ALLOW


def test_member_refusal_text() -> None:
    d = as_attachment(make_zip({"docs/setup.exe": b"data"}), "docs.zip")
    assert d.text == (
        'Files of type .exe are not allowed (docs/setup.exe inside the archive "docs.zip"). '
        "Ask the office you are writing with to allow this type if it is safe."
    )


def _patch(data: bytes, old: bytes, new: bytes, count: int = -1) -> bytes:
    assert len(old) == len(new) and old in data
    return data.replace(old, new, count)


def test_zip_names_with_nul_are_refused() -> None:
    # zipfile cuts names at NUL ("a virus trick", says its source); the
    # original is checked too.
    data = _patch(make_zip({"scan.pdfX.exe": PDF}), b"scan.pdfX.exe", b"scan.pdf\x00.exe")
    assert_refused(as_attachment(data, "scans.zip"), "attachment.name_nul")


def test_zip_local_and_central_names_must_agree() -> None:
    data = make_zip({"scan.pdf": PDF})
    cd = data.rindex(b"PK\x01\x02")
    lying = data[:cd] + _patch(data[cd:], b"scan.pdf", b"scan.png")
    assert_refused(as_attachment(lying, "scans.zip"), "attachment.archive_damaged", 554, "5.6.0")
    assert as_attachment(data, "scans.zip") == ALLOW


def _with_unicode_path(plain: str, shown: str) -> bytes:
    """A zip whose Info-ZIP Unicode Path field (0x7075) names the member
    differently from its plain name."""
    utf8 = shown.encode()
    field = (
        struct.pack("<HHB", 0x7075, 5 + len(utf8), 1) + struct.pack("<I", zlib.crc32(plain.encode())) + utf8
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo(plain)
        info.extra = field
        zf.writestr(info, PDF)
    return buf.getvalue()


def test_zip_unicode_path_field_is_checked() -> None:
    assert_refused(
        as_attachment(_with_unicode_path("scan.pdf", "scan.exe"), "scans.zip"), "attachment.extension"
    )
    assert as_attachment(_with_unicode_path("scan.pdf", "Röntgen.pdf"), "scans.zip") == ALLOW


# ---------------------------------------------------------------- encryption


def encrypt_flag(data: bytes) -> bytes:
    """Set general purpose bit 0 (encrypted) in every local and central header."""
    out = bytearray(data)
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = out.find(sig)
        while pos >= 0:
            out[pos + offset] |= 0x01
            pos = out.find(sig, pos + 4)
    return bytes(out)


def test_encrypted_zip_is_refused() -> None:
    data = encrypt_flag(make_zip({"results.pdf": PDF}))
    d = as_attachment(data, "results.zip")
    assert_refused(d, "attachment.archive_encrypted", 550, "5.7.1")
    assert "password-protected" in d.text and "results.pdf" in d.text
    # The twin: the same archive without the flag.
    assert as_attachment(make_zip({"results.pdf": PDF}), "results.zip") == ALLOW


def test_encrypted_zip_when_the_policy_allows_it() -> None:
    policy = AttachmentPolicy(block_encrypted_archives=False)
    assert as_attachment(encrypt_flag(make_zip({"results.pdf": PDF})), "results.zip", policy) == ALLOW
    # Names are still checked, even though the contents cannot be.
    d = as_attachment(encrypt_flag(make_zip({"setup.exe": b"x"})), "results.zip", policy)
    assert_refused(d, "attachment.extension")


@pytest.mark.skipif(shutil.which("zip") is None, reason="Info-ZIP zip is not installed")
def test_encrypted_zip_made_by_zip_e(tmp_path: Path) -> None:
    (tmp_path / "results.pdf").write_bytes(PDF)
    subprocess.run(
        ["zip", "-q", "-P", "secret", "out.zip", "results.pdf"], cwd=tmp_path, check=True, timeout=30
    )
    assert_refused(
        as_attachment((tmp_path / "out.zip").read_bytes(), "out.zip"), "attachment.archive_encrypted"
    )


# ---------------------------------------------------------------- what cannot be checked


@pytest.mark.parametrize(
    "data,name,label",
    [
        pytest.param(b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(100), "files.7z", "7z", id="7z"),
        pytest.param(b"Rar!\x1a\x07\x01\x00" + bytes(100), "files.rar", "RAR", id="rar"),
        pytest.param(b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(100), "files.dat", "7z", id="7z-renamed"),
        pytest.param(PDF, "files.7z", "7z", id="named-7z"),
    ],
)
def test_unsupported_archives_are_refused(data: bytes, name: str, label: str) -> None:
    d = as_attachment(data, name)
    assert_refused(d, "attachment.archive_unsupported", 550, "5.7.1")
    assert label in d.text
    assert as_attachment(data, name, AttachmentPolicy(scan_archives=False)) == ALLOW


def test_unsupported_compression_method_is_refused() -> None:
    data = make_zip({"scan.pdf": PDF})
    # Method 99 (WinZip AES) without the encryption flag: zipfile cannot read it.
    out = bytearray(data)
    out[8:10] = struct.pack("<H", 99)
    cd = data.rindex(b"PK\x01\x02")
    out[cd + 10 : cd + 12] = struct.pack("<H", 99)
    assert_refused(as_attachment(bytes(out), "scans.zip"), "attachment.archive_unsupported")


@pytest.mark.parametrize(
    "data,name",
    [
        pytest.param(make_zip({"scan.pdf": PDF})[:-30], "scans.zip", id="truncated-zip"),
        pytest.param(PDF, "scans.zip", id="pdf-named-zip"),
        pytest.param(gzip.compress(PDF * 50)[:-20], "scan.pdf.gz", id="truncated-gzip"),
        pytest.param(make_tar({"a.pdf": PDF}) + b"hidden" + bytes(506), "a.tar", id="data-after-tar-end"),
    ],
)
def test_damaged_archives_are_refused(data: bytes, name: str) -> None:
    assert_refused(as_attachment(data, name), "attachment.archive_damaged", 554, "5.6.0")


def test_tar_with_corrupt_second_header_is_refused() -> None:
    good = make_tar({"a.pdf": PDF, "b.exe": b"x"})
    # Break the checksum of the second header: tarfile would stop there,
    # GNU tar would skip to the next header and extract b.exe.
    second = 512 + (len(PDF) + 511) // 512 * 512
    bad = bytearray(good)
    bad[second + 148 : second + 156] = b"0000000\x00"
    assert_refused(as_attachment(bytes(bad), "a.tar"), "attachment.archive_damaged")


def test_scan_archive_never_raises_on_junk() -> None:
    for kind in (Kind.ZIP, Kind.TAR, Kind.GZIP, Kind.BZIP2, Kind.XZ, Kind.SEVEN_ZIP):
        for data in (b"", b"\x00" * 1024, b"PK\x03\x04" + bytes(100), b"\x1f\x8b\x08" + bytes(20)):
            finding = scan_archive(data, kind, Limits(), names)
            assert finding is None or isinstance(finding, Finding)
