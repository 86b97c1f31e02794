"""Property tests of the attachment policy on hostile input.

1. check_attachments never raises: not on arbitrary bytes, not on
   structured MIME with random headers, bodies, line endings and broken
   boundaries, not on valid messages with bytes spliced in; nor does
   scan_archive on damaged zip, tar, gzip, bzip2 and xz archives.  It allows or
   refuses, always with a one-line printable reply.
2. The fast path is faithful: parsing the message with long body runs
   elided (postvault.policy.attachments._parse) gives the same MIME tree,
   the same defects and, once the runs are put back, the same leaf bodies
   as the email package parsing the whole message.  The property runs with
   elision of every run however short, so every elision decision is
   exercised.

Examples are bounded so that the module runs in about 10 seconds; deadlines
are off because the first examples pay for imports and a shared CI machine
is noisy.
"""

from __future__ import annotations

import email.policy
import re
from email.message import Message
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from postvault.policy import attachments
from postvault.policy.archives import Finding, Limits, scan_archive
from postvault.policy.attachments import check_attachments, name_problem
from postvault.policy.decision import Decision
from postvault.policy.schema import DEFAULT_BLOCKED_EXTENSIONS, AttachmentPolicy
from postvault.policy.sniff import Kind
from tests.policy.test_attachments import PDF, attachment, message
from tests.policy.test_sniff import pe_file

P = AttachmentPolicy()
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BOUNDARIES = ["b0", "b1", "b2", "b0b"]

# Lines chosen to sit on every decision the parser and the elision make:
# boundaries (and near misses), header-like lines, blank lines, "From ".
SPECIAL_LINES = [
    "",
    "--",
    "-- ",
    "-",
    "--b0",
    "--b0--",
    "--b0 \t",
    "--b0--x",
    "--b1",
    "--b1--",
    "--b0b",
    "--b2--",
    "From someone",
    "Subject: hello",
    "X-A: 1",
    " folded",
    "\tfolded",
    "Content-Type: multipart/mixed; boundary=b1",
    "Content-Type: message/rfc822",
    "content-type: text/plain",
    "AAAA",
    "QUJDRA==",
    "http://x.test/a:b",
    "a: b",
    ":",
]

lines = st.one_of(
    st.sampled_from(SPECIAL_LINES),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.from_regex(r"[A-Za-z0-9+/]{4,76}={0,2}", fullmatch=True),
    st.text(st.characters(min_codepoint=128, max_codepoint=0x2FFF), max_size=8),
)

CONTENT_TYPES = [
    "text/plain",
    'text/plain; charset="utf-8"',
    'application/pdf; name="a.pdf"',
    'application/octet-stream; name="x.exe"',
    "image/jpeg",
    "message/rfc822",
    "message/delivery-status",
    "multipart/mixed; boundary=b1",
    'multipart/alternative; boundary="b2"',
    "multipart/mixed",
    "text/plain; name*0=a; name*1*=%2Eexe",
    "application/pdf; name==?utf-8?q?x=2Eexe?=",
]
OTHER_HEADERS = [
    ("Content-Disposition", 'attachment; filename="a.pdf"'),
    ("Content-Disposition", "inline"),
    ("Content-Disposition", "attachment; filename*=utf-8''x%E2%80%AE.pdf"),
    ("Content-Transfer-Encoding", "base64"),
    ("Content-Transfer-Encoding", "quoted-printable"),
    ("Content-Transfer-Encoding", "7bit"),
    ("Content-Transfer-Encoding", "x-unknown"),
    ("Subject", "=?utf-8?b?aGVsbG8=?="),
    ("X-Empty", ""),
]


@st.composite
def header_block(draw: st.DrawFn) -> list[str]:
    out: list[str] = []
    if draw(st.booleans()):
        out.append("Content-Type: " + draw(st.sampled_from(CONTENT_TYPES)))
    for name, value in draw(st.lists(st.sampled_from(OTHER_HEADERS), max_size=3)):
        out.append(f"{name}: {value}")
    if draw(st.integers(0, 9)) == 0:
        out.append(draw(lines))  # maybe not a header at all
    return out


@st.composite
def entity(draw: st.DrawFn, depth: int = 0) -> list[str]:
    """The lines of one MIME entity (headers, blank line, body)."""
    kind = draw(st.sampled_from(["leaf", "leaf", "multipart", "message"] if depth < 3 else ["leaf"]))
    if kind == "multipart":
        boundary = draw(st.sampled_from(BOUNDARIES))
        head = [f'Content-Type: multipart/mixed; boundary="{boundary}"'] + draw(header_block())[1:]
        body: list[str] = draw(st.lists(lines, max_size=2))  # preamble
        for child in draw(st.lists(entity(depth + 1), min_size=0, max_size=3)):
            body.append(f"--{boundary}")
            body.extend(child)
        if draw(st.integers(0, 4)):
            body.append(f"--{boundary}--")
        body.extend(draw(st.lists(lines, max_size=2)))  # epilogue
    elif kind == "message":
        head = ["Content-Type: message/rfc822"] + draw(header_block())[1:]
        body = draw(entity(depth + 1))
    else:
        head = draw(header_block())
        body = draw(st.lists(lines, max_size=8))
    separator = [""] if draw(st.integers(0, 9)) else []
    return head + separator + body


@st.composite
def mime_messages(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from(["\r\n", "\n", "\r", "mixed"]))
    out = ["From: a@b.test", "MIME-Version: 1.0"] + draw(entity())
    if eol == "mixed":
        ends = draw(st.lists(st.sampled_from(["\r\n", "\n", "\r"]), min_size=len(out), max_size=len(out)))
    else:
        ends = [eol] * len(out)
    if not draw(st.booleans()):
        ends[-1] = ""  # no final line break
    return "".join(line + end for line, end in zip(out, ends)).encode("utf-8", "surrogatepass")


def assert_decision(d: Decision) -> None:
    assert isinstance(d, Decision)
    if not d.allowed:
        assert d.rule and d.code >= 500
        assert d.text.isascii() and d.text.isprintable()


# ---------------------------------------------------------------- never raises


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert_decision(check_attachments(raw, P))


@settings(FUZZ, max_examples=100)
@given(mime_messages())
def test_structured_mime_never_raises(raw: bytes) -> None:
    assert_decision(check_attachments(raw, P))
    assert_decision(check_attachments(raw, P, frozenset({"exe", "iso"})))


SEEDS = [
    message(attachment(PDF, "a.pdf")),
    message(attachment(pe_file(), "a.pdf")),
    message(attachment(b"PK\x03\x04" + bytes(64), "a.zip")),
]


@settings(FUZZ, max_examples=150)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6),
)
def test_spliced_messages_never_raise(seed: bytes, splices: list[tuple[int, bytes]]) -> None:
    raw = bytearray(seed)
    for pos, data in splices:
        pos %= len(raw) + 1
        raw[pos : pos + len(data) // 2] = data
    assert_decision(check_attachments(bytes(raw), P))


@settings(FUZZ, max_examples=80)
@given(
    st.binary(min_size=0, max_size=2048),
    st.sampled_from(["a.zip", "a.tar", "a.gz", "a.pdf", "a.xz", "a.bz2"]),
)
def test_arbitrary_attachments_never_raise(data: bytes, name: str) -> None:
    for prefix in (b"", b"PK\x03\x04", b"\x1f\x8b\x08\x00", b"BZh9", b"\xfd7zXZ\x00"):
        raw = message(attachment(prefix + data, name))
        assert_decision(check_attachments(raw, P))


def _archive_seeds() -> list[tuple[bytes, Kind]]:
    import gzip
    import zipfile

    from tests.policy.test_archives import make_tar, nested_zip
    from tests.policy.test_attachments import make_zip

    return [
        (make_zip({"a.pdf": PDF, "d/b.txt": b"hello" * 50}), Kind.ZIP),
        (make_zip({"a.pdf": PDF}, zipfile.ZIP_BZIP2), Kind.ZIP),
        (make_zip({"a.pdf": PDF}, zipfile.ZIP_LZMA), Kind.ZIP),
        (nested_zip(3), Kind.ZIP),
        (make_tar({"a.pdf": PDF, "b.txt": b"x" * 700}), Kind.TAR),
        (make_tar({"a.pdf": PDF}, "w:gz"), Kind.GZIP),
        (make_tar({"a.pdf": PDF}, "w:bz2"), Kind.BZIP2),
        (make_tar({"a.pdf": PDF}, "w:xz"), Kind.XZ),
        (gzip.compress(PDF * 10), Kind.GZIP),
    ]


@settings(FUZZ, max_examples=150)
@given(
    st.sampled_from(_archive_seeds()),
    st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_damaged_archives_never_raise(seed: tuple[bytes, Kind], flips: list[tuple[int, int]]) -> None:
    data, kind = seed
    damaged = bytearray(data)
    for pos, value in flips:
        damaged[pos % len(damaged)] = value
    finding = scan_archive(
        bytes(damaged), kind, Limits(), lambda n: name_problem(n, DEFAULT_BLOCKED_EXTENSIONS)
    )
    assert finding is None or isinstance(finding, Finding)


# ---------------------------------------------------------------- the fast path is faithful


def _shape(msg: Message) -> list[tuple[object, ...]]:
    """What the walk depends on, node by node."""
    out: list[tuple[object, ...]] = []
    for part in msg.walk():
        out.append(
            (
                part.get_content_type(),
                list(part.raw_items()),
                sorted(type(d).__name__ for d in part.defects),
                part.is_multipart(),
            )
        )
    return out


def _leaf_bodies_full(msg: Message) -> list[bytes]:
    return [
        part._payload.encode("ascii", "surrogateescape")
        for part in msg.walk()
        if not part.is_multipart() and isinstance(part._payload, str)
    ]


def _leaf_bodies_elided(parsed: attachments._Parsed) -> list[bytes]:
    return [
        attachments._body(parsed, part).join()
        for part in parsed.message.walk()
        if not part.is_multipart() and isinstance(part._payload, str)
    ]


def assert_same_parse(raw: bytes) -> None:
    try:
        full = BytesParser(policy=email.policy.default).parsebytes(raw)
        full_shape = _shape(full)
    except (RecursionError, IndexError, ValueError, TypeError, AttributeError, LookupError):
        assume(False)
        return
    try:
        parsed = attachments._parse(raw, P, elide_min=1)
    except attachments._Refuse:
        assume(False)
        return
    assert _shape(parsed.message) == full_shape
    assert _leaf_bodies_elided(parsed) == _leaf_bodies_full(full)


@settings(FUZZ, max_examples=150)
@given(mime_messages())
def test_elided_parse_equals_full_parse(raw: bytes) -> None:
    assert_same_parse(raw)


def test_elision_happens_on_big_messages() -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2000
    raw = message(attachment(big, "a.png"), attachment(PDF * 2000, "b.pdf"))
    parsed = attachments._parse(raw, P)
    assert len(parsed.ranges) == 2
    assert_same_parse(raw)
    # Elision keeps the decision: refusals still name the right part.
    evil = message(attachment(big, "a.png"), attachment(pe_file() + bytes(200_000), "b.pdf"))
    assert check_attachments(evil, P).rule == "attachment.executable"


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
def test_elided_parse_equals_full_parse_examples(eol: bytes) -> None:
    raw = message(
        attachment(b"x" * 100_000, "a.txt", "text/plain", "7bit"),
        attachment(bytes(range(256)) * 500, "b.bin"),
        b"Content-Type: message/rfc822\r\n\r\n" + message(attachment(PDF * 1000, "c.pdf"), boundary="inner"),
    ).replace(b"\r\n", eol)
    assert_same_parse(raw)
    assert attachments._parse(raw, P).ranges


def test_hyphen_heavy_text_takes_the_dense_scan() -> None:
    # More hyphens than the one-at-a-time scan handles: the "\n--" scan
    # takes over and must find the same lines.
    text = b"".join(b"row-%d-a-b-c\r\n-- note %d\r\n" % (i, i) for i in range(15_000))
    raw = message(attachment(text, "a.txt", "text/plain", "7bit"), attachment(pe_file(), "b.pdf"))
    assert raw.count(b"-") > attachments._DENSE_HYPHENS
    expected = [m.start() + 1 for m in re.finditer(rb"[\r\n](?=--)", raw)]
    assert attachments._dash_lines(raw) == expected
    assert_same_parse(raw)
    assert check_attachments(raw, P).rule == "attachment.executable"


def test_delivery_status_is_parsed_whole() -> None:
    report = (
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=r\r\n\r\n"
        b"--r\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.test\r\n\r\nFinal-Recipient: rfc822; a@b.test\r\n"
        + b"X-Filler: "
        + b"A" * 100_000
        + b"\r\n"
        b"\r\n--r--\r\n"
    )
    raw = b"From: a@b.test\r\nMIME-Version: 1.0\r\n" + report
    assert attachments._parse(raw, P, elide_min=1).ranges == []
    assert_same_parse(raw)


# --- 3. The header-only path (attachments._single_part_without_file) --------------
#
# A message that is not multipart or message/* and carries no file is decided
# from its header section alone; every decision must be the whole message's.


def _decide(raw: bytes, fast: bool, allowed: frozenset[str] = frozenset()) -> tuple[object, ...]:
    saved = attachments._HEADER_FAST_PATH
    attachments._HEADER_FAST_PATH = fast
    try:
        d = check_attachments(raw, P, allowed)
    finally:
        attachments._HEADER_FAST_PATH = saved
    return (d.allowed, d.rule, d.code, d.smtp_reply)


@st.composite
def single_part_messages(draw: st.DrawFn) -> bytes:
    """Leaf-only messages, with headers and bodies from the lines above
    (bodies holding boundaries, header lines and blank lines)."""
    eol = draw(st.sampled_from(["\r\n", "\n", "\r", "mixed"]))
    out = ["From: a@b.test"] + draw(entity(depth=3))
    ends = (draw(st.lists(st.sampled_from(["\r\n", "\n", "\r"]), min_size=len(out), max_size=len(out)))
            if eol == "mixed" else [eol] * len(out))
    return "".join(line + end for line, end in zip(out, ends)).encode("utf-8", "surrogatepass")


@settings(FUZZ, max_examples=300)
@given(st.one_of(single_part_messages(), mime_messages()))
def test_header_only_path_decides_as_the_whole_message(raw: bytes) -> None:
    assert _decide(raw, True) == _decide(raw, False)


@settings(FUZZ, max_examples=150)
@given(st.binary(max_size=2048))
def test_header_only_path_on_arbitrary_bytes(raw: bytes) -> None:
    assert _decide(raw, True) == _decide(raw, False)


@pytest.mark.parametrize("raw", [
    b"From: a@b.test\r\nSubject: x\r\n\r\nhello\r\n--b0\r\nContent-Type: application/x-msdownload\r\n\r\nMZ\r\n",
    b"From: a@b.test\r\nContent-Type: application/pdf; name=a.exe\r\n\r\n%PDF-1.4\r\n",
    b"From: a@b.test\r\nContent-Disposition: attachment; filename=\"x.exe\"\r\n\r\nhello\r\n",
    b"From: a@b.test\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\n\r\nhello\r\n",
    b"From: a@b.test\r\nnot a header\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n--b0\r\n\r\nx\r\n--b0--\r\n",
    b"From: a@b.test\r\n\r\n",
    b"\r\n\r\nFrom: a@b.test\r\n",
    b"From: a@b.test\r\r\nX: y\r\n\r\nbody\r\n",
    b"From: a@b.test\rContent-Type: image/png\r\rbody",
    b"From: a@b.test\r\nContent-Type: message/rfc822\r\n\r\nContent-Type: application/x-msdownload\r\n\r\nMZ",
])
def test_header_only_path_examples(raw: bytes) -> None:
    assert _decide(raw, True) == _decide(raw, False)


def test_header_only_path_is_taken_for_plain_text() -> None:
    """The property above would hold trivially if the path were never
    taken: it is, for a plain-text message and not for one with a file."""
    text = b"From: a@b.test\r\nContent-Type: text/plain\r\n\r\n" + b"line\r\n" * 500
    assert attachments._single_part_without_file(text, P, frozenset())
    pdf = b"From: a@b.test\r\nContent-Type: application/pdf\r\n\r\n%PDF-1.4\r\n"
    assert not attachments._single_part_without_file(pdf, P, frozenset())
    multi = message(attachment(PDF, "b.pdf"))
    assert not attachments._single_part_without_file(multi, P, frozenset())
