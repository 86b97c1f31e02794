"""The attachment policy: which files a message may carry.

:func:`check_attachments` takes a whole message (RFC 5322 bytes, as received
by SMTP DATA or IMAP APPEND) and the ``[attachments]`` policy, and returns a
:class:`~postvault.policy.decision.Decision`.  It is pure: no sockets, no
files, no database.

What is checked, for every leaf part that is a file (it has a file name in
any form, or ``Content-Disposition: attachment``, or a type other than
``text/*``):

* **Names.**  Every candidate name is checked on its own, because mail
  clients disagree about which one wins and a sender can put a harmless
  name in one place and a dangerous one in another: ``filename`` and
  ``name`` in Content-Disposition and Content-Type, their RFC 2231
  extended forms (``filename*=``, RFC 2231 section 4) and continuations
  (``filename*0*=``, section 3), RFC 2047 encoded words inside any of them
  (not allowed there by RFC 2047 section 5, but sent and shown by Outlook
  and Thunderbird), and what the ``email`` package itself makes of them.
  A name is refused for NUL or bidirectional-override characters (which make
  "xray\\u202Egnp.exe" display as "xrayexe.png"), for ``..`` path parts, and
  for a blocked extension: the final one after stripping trailing dots and
  spaces (as Windows does), or any inner one ("scan.exe.pdf").
* **Content.**  The first bytes are sniffed (:mod:`.sniff`); a program is
  refused whatever its name or Content-Type.
* **Size.**  The decoded size must not exceed ``max_size``.
* **Archives** are opened in memory and their members checked the same way
  (:mod:`.archives`).

A per-office exception (``allow_extensions``) lifts a blocked extension and
nothing else: not a sniffed program, not a disguised name.

The message structure is checked too.  More than ``max_mime_depth`` levels,
``max_parts`` parts or ``max_headers`` header fields in a part is refused,
and so is a structure the parser had to guess at (``msg.defects``): a
missing boundary, a multipart with a transfer encoding, headers without the
blank line after them.  Such defects are where two mail programs see two
different sets of parts, one of which this check never saw.

Speed.  The standard parser handles every line in Python, about 30 ms per MB;
a 20 MB message would cost more than half a second.  So the bytes are first
scanned with ``bytes.find`` for the only lines that can change the MIME
structure (lines starting with ``--``, as every boundary does: RFC 2046
section 5.1.1), and long runs of body lines between them are replaced by a
short placeholder line before parsing.  The placeholder is chosen to play
the same role in the parser as the run it replaces (a non-header, non-blank,
non-boundary line), so the tree the parser builds is the same (the tests
check this against a full parse).  Bodies are then read straight from the
original bytes: the size of a base64 body is counted from its length and
only the first few kilobytes are decoded for sniffing, unless the file is an
archive and must be opened.

A message that is neither multipart nor message/* and carries no file
(plain text, most mail) is decided from its header section alone: the
parser makes the rest of such a message its payload without looking at it,
so parsing it line by line changes nothing (``_single_part_without_file``;
the tests compare every decision with the whole message's).
"""

from __future__ import annotations

import binascii
import codecs
import email.errors
import email.policy
import email.utils
import functools
import math
import re
import secrets
import unicodedata
from dataclasses import dataclass
from email.headerregistry import HeaderRegistry
from email.message import Message
from email.parser import BytesParser

from postvault.mime import headerobjects
from postvault.policy.archives import Finding, Limits, Problem, scan_archive
from postvault.policy.decision import ALLOW, Decision, refuse
from postvault.policy.schema import AttachmentPolicy, MiB
from postvault.policy.sniff import (
    ARCHIVE_KINDS,
    EXECUTABLE_KINDS,
    SCANNABLE_ARCHIVE_KINDS,
    SNIFF_LEN,
    Kind,
    archive_kind_for_extension,
    sniff,
)

__all__ = ["NameProblem", "check_attachments", "name_problem"]

# --------------------------------------------------------------------------
# Reply codes.
#
# Blocked types, programs, disguised names and archives that cannot be
# checked are refusals by policy: 550 (RFC 5321 section 4.3.2 lists 550 among
# the DATA replies "for policy reasons") with 5.7.1, "delivery not
# authorized, message refused" (RFC 3463), which covers filtering.  5.6.1
# ("media not supported") would tell the client that the medium itself is a
# capability problem, inviting a re-encoding that would not help.
# Size: 552 5.3.4 "message too big for system".  Structure the server will
# not process (MIME bombs, damaged encodings): 554 5.6.0, "other or
# undefined media error".
#
# IMAP answers the same decisions (APPEND) with RFC 5530 response codes:
# CANNOT ("can never succeed") for policy refusals, TOOBIG (RFC 4469,
# RFC 7889) for sizes, LIMIT for MIME bombs (an implementation limit), and
# PARSE ("an error parsing a message") for malformed structure.
# --------------------------------------------------------------------------
_POLICY = (550, "5.7.1", "CANNOT")
_TOO_BIG = (552, "5.3.4", "TOOBIG")
_LIMIT = (554, "5.6.0", "LIMIT")
_MEDIA = (554, "5.6.0", "PARSE")


def _no(reply: tuple[int, str, str], text: str, rule: str) -> Decision:
    return refuse(reply[0], reply[1], text, rule, reply[2])


# Bidirectional embeddings, overrides and isolates (Unicode UAX #9): they make
# a name display in another order than it is stored.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

# Beyond this many lines starting with "--" the message is refused before
# parsing: each one costs the parser time, and no real message has this many
# parts or signature lines.
_MAX_DASH_LINES = 100_000
# Runs of body lines at least this long are elided before parsing.
_ELIDE_MIN = 64 * 1024
# The placeholder line for an elided run: a random nonce per check (so a
# sender cannot forge one) and the run's index.  It is not header-like, not
# blank and does not start with "-", like the runs it stands for.
_TOKEN = re.compile(rb"PVELIDED([0-9a-f]{16})N(\d+)E")
# When hyphens are this dense, scanning for them one at a time costs more
# than scanning for "\n--" and "\r--" directly.
_DENSE_HYPHENS = 20_000
# How many header blocks and blank lines to step over (the part's own
# headers, then those of nested message/rfc822 parts) before a window's body.
_MAX_SKIPS = 8

# RFC 2045 section 6.1: the transfer encodings there are.  Anything else
# (x-uuencode, typos) is something a client may or may not decode, so it
# cannot be checked.
_IDENTITY_CTES = frozenset({"7bit", "8bit", "binary"})
_KNOWN_CTES = _IDENTITY_CTES | {"base64", "quoted-printable"}

# Parse defects that mean two readers may see different parts.
_REFUSED_DEFECTS: tuple[type[email.errors.MessageDefect], ...] = (
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
    email.errors.InvalidMultipartContentTransferEncodingDefect,
    email.errors.MissingHeaderBodySeparatorDefect,
)

# The feedparser's header-line test (email/feedparser.py headerRE), on bytes.
_HEADER_LIKE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_HEADER_BLOCK = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n))*")
_B64_WS = b" \t\r\n"

# What the email package or the standard library may raise on hostile
# headers (its header parser has had IndexError and AttributeError bugs on
# malformed input); such a message is refused as malformed, not crashed on.
_PARSER_ERRORS: tuple[type[BaseException], ...] = (
    email.errors.MessageError,
    IndexError,
    KeyError,
    ValueError,
    TypeError,
    AttributeError,
    LookupError,
    UnicodeError,
)


class _Refuse(Exception):
    """Internal: stops the walk with a decision."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.rule)
        self.decision = decision


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class NameProblem:
    """Why a file name is refused: ``rule`` is one of ``attachment.name_nul``,
    ``attachment.name_bidi``, ``attachment.name_path`` and
    ``attachment.extension`` (then ``extension`` says which)."""

    rule: str
    extension: str = ""


@functools.lru_cache(maxsize=16)  # keyed on policy data, never on message content
def _normalise_extensions(exts: frozenset[str]) -> frozenset[str]:
    return frozenset(e.strip().lstrip(".").casefold() for e in exts if e.strip().lstrip("."))


def _strip_trailing(name: str) -> str:
    # Windows drops trailing dots and spaces from file names, so "x.exe. "
    # is saved (and run) as "x.exe".  Other trailing white space is stripped
    # too: harmless to strip, and some clients trim it.
    while True:
        stripped = name.rstrip().rstrip(".")
        if stripped == name:
            return name
        name = stripped


def name_problem(
    name: str,
    blocked: frozenset[str],
    allowed: frozenset[str] = frozenset(),
) -> NameProblem | None:
    """Check one candidate file name; ``None`` if it may pass.

    ``blocked`` and ``allowed`` are lower-case extensions without dots.
    ``allowed`` (the office exceptions) only lifts an extension; it never
    excuses NUL, bidi controls or path traversal.
    """
    if "\x00" in name:
        return NameProblem("attachment.name_nul")
    if any(c in _BIDI for c in name):
        return NameProblem("attachment.name_bidi")
    parts = _SEPARATORS.split(name)
    if any(p.strip() == ".." for p in parts):
        return NameProblem("attachment.name_path")
    # The name a client saves is the last path component (both separators:
    # Windows clients split on "\\", everyone on "/").
    base = next((p for p in reversed(parts) if p.strip()), "")
    # NFKC folds look-alikes such as full-width "ｅｘｅ" to "exe"; casefold
    # makes "EXE" and "exe" equal.
    base = unicodedata.normalize("NFKC", _strip_trailing(base)).casefold()
    segments = base.split(".")
    for segment in reversed(segments[1:]):  # the final extension first
        ext = _strip_trailing(segment.strip())
        if ext in blocked and ext not in allowed:
            return NameProblem("attachment.extension", ext)
    return None


_EXT_VALUE = re.compile(r"^([^']*)'[^']*'(.*)$", re.DOTALL)
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*(?:"|$)|[^;]*)', re.DOTALL)
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_EW_GAP = re.compile(r"(\?=)\s+(?==\?)")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_SECTION = re.compile(r"(filename|name)\*(\d{1,4})(\*?)")  # RFC 2231 section 3
_SEPARATORS = re.compile(r"[/\\]")
_LINE_BREAKS = re.compile(r"[\r\n]")
_COMMENT = re.compile(r"\([^)]*\)")


def _decode_bytes(data: bytes, charset: str) -> str:
    """Decode with a sender-named charset, never failing: an unknown charset
    falls back to Latin-1 (every byte maps, so ASCII extensions survive)."""
    charset = charset.split("*", 1)[0].strip()  # RFC 2231 section 5: charset*lang
    try:
        codecs.lookup(charset)
    except (LookupError, ValueError):
        # ValueError: a NUL in the name; UnicodeEncodeError (a ValueError):
        # 8-bit bytes, which reach here as surrogates (fuzz/mime.py found both).
        charset = "latin-1"
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError, TypeError):
        # Codecs that are not text encodings (e.g. "rot13", "hex") end here.
        return data.decode("latin-1")


def _raw_text(value: str) -> str:
    """A raw header string (bytes decoded as ASCII with surrogateescape by
    BytesParser) as text: 8-bit bytes are read as UTF-8 (RFC 6532)."""
    return value.encode("ascii", "surrogateescape").decode("utf-8", "replace")


def _decode_2047(value: str) -> str:
    """Decode RFC 2047 encoded words anywhere in ``value``, tolerantly.

    Whitespace between adjacent encoded words is dropped (RFC 2047 section
    6.2), and adjacent words in one charset are joined before decoding, so a
    UTF-8 character split across two words survives.
    """
    value = _EW_GAP.sub(r"\1", value)
    out: list[str] = []
    pos = 0
    pending: tuple[str, bytearray] | None = None

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            out.append(_decode_bytes(bytes(pending[1]), pending[0]))
            pending = None

    for m in _ENCODED_WORD.finditer(value):
        if m.start() > pos:
            flush()
            out.append(value[pos : m.start()])
        charset, enc, text = m.group(1), m.group(2).lower(), m.group(3)
        # Encoded text is ASCII (RFC 2047 section 5), but the header may
        # carry other characters there (8-bit bytes read as UTF-8 or U+FFFD
        # by _raw_text: fuzz/mime.py found the crash); keep them as bytes.
        raw = text.encode("utf-8", "surrogateescape")
        if enc == "b":
            raw = raw.rstrip(b"=")
            raw += b"=" * (-len(raw) % 4)
            try:
                data = binascii.a2b_base64(raw)
            except binascii.Error:
                flush()
                out.append(m.group(0))
                pos = m.end()
                continue
        else:
            data = _PERCENT_Q.sub(lambda q: bytes([int(q.group(1), 16)]), raw.replace(b"_", b" "))
        if pending is not None and pending[0].lower() == charset.lower():
            pending[1].extend(data)
        else:
            flush()
            pending = (charset, bytearray(data))
        pos = m.end()
    flush()
    out.append(value[pos:])
    return "".join(out)


_PERCENT_Q = re.compile(rb"=([0-9A-Fa-f]{2})")


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"'):
        value = value[1:-1] if len(value) >= 2 and value.endswith('"') else value[1:]
        value = _QUOTED_PAIR.sub(r"\1", value)
    return value


def _decode_2231(value: str, charset: str | None) -> tuple[bytes, str]:
    """Percent-decode an RFC 2231 extended value; returns the bytes and the
    charset (taken from a ``charset'lang'`` prefix when ``charset`` is None)."""
    if charset is None:
        m = _EXT_VALUE.match(value)
        if m:
            charset, value = m.group(1) or "us-ascii", m.group(2)
        else:
            charset = "us-ascii"
    raw = value.encode("ascii", "surrogateescape")
    return _PERCENT.sub(lambda p: bytes([int(p.group(1), 16)]), raw), charset


def _param_names(header_value: str) -> list[str]:
    """Every file name a header value carries, each interpretation separately."""
    value = _LINE_BREAKS.sub("", header_value)
    params = [(m.group(1).lower(), m.group(2)) for m in _PARAM.finditer(value)]
    names: list[str] = []
    for base in ("filename", "name"):
        sections: dict[int, tuple[str, bool]] = {}
        for key, raw in params:
            if key == base:
                plain = _raw_text(_unquote(raw))
                names.append(plain)
                if "=?" in plain:
                    names.append(_decode_2047(plain))
            elif key == base + "*":
                data, declared = _decode_2231(_unquote(raw), None)
                names.append(_decode_bytes(data, declared))
            else:
                m = _SECTION.fullmatch(key)
                if m and m.group(1) == base:
                    sections.setdefault(int(m.group(2)), (_unquote(raw), bool(m.group(3))))
        if sections:
            # RFC 2231 section 4.1: only the first section names the charset;
            # encoded sections are percent-decoded, the others taken as is.
            joined = bytearray()
            charset: str | None = None
            for index in sorted(sections):
                text, encoded = sections[index]
                if encoded:
                    data, charset = _decode_2231(text, charset)
                    joined.extend(data)
                else:
                    joined.extend(text.encode("ascii", "surrogateescape"))
            name = _decode_bytes(bytes(joined), charset or "utf-8")
            names.append(name)
            if "=?" in name:
                names.append(_decode_2047(name))
    return names


def _candidate_names(part: Message, raw_headers: list[tuple[str, str]]) -> list[str]:
    names: list[str] = []
    named = False
    for key, value in raw_headers:
        if key in ("content-disposition", "content-type"):
            names.extend(_param_names(value))
            named = named or "name" in value.lower()
    if named:
        # And whatever the email package itself settles on, which is what
        # Python-based tools downstream will use.  (Only when a name is
        # there at all: each call parses the header again, slowly.)
        def content_type_name() -> object:
            return part.get_param("name")

        for getter in (part.get_filename, content_type_name):
            try:
                found = getter()
            except _PARSER_ERRORS:
                continue
            if isinstance(found, tuple):  # an RFC 2231 triple from get_param
                found = email.utils.collapse_rfc2231_value(found)
            if isinstance(found, str):
                names.append(_raw_text(found) if _has_surrogates(found) else found)
    return list(dict.fromkeys(n for n in names if n))


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------


def _show(name: str, limit: int = 80) -> str:
    """A sender-chosen name made safe for a one-line ASCII reply: anything
    but printable ASCII becomes "?" (controls, bidi overrides, line breaks
    cannot shape the reply), and long names keep their start and extension."""
    shown = "".join(c if " " <= c <= "~" and c != '"' else ("'" if c == '"' else "?") for c in name)
    if len(shown) > limit:
        tail = 20
        shown = shown[: limit - tail - 3] + "..." + shown[-tail:]
    return shown


def _mib(size: int) -> str:
    """A size in MiB, rounded up to one decimal so that a file over the
    limit never reads as equal to it (15 MiB + 1 byte is "15.1 MiB")."""
    if size < MiB:
        return f"{math.ceil(size / 1024)} KiB"
    tenths = math.ceil(size * 10 / MiB)
    return f"{tenths // 10}.{tenths % 10} MiB"


def _limit(size: int) -> str:
    if size % MiB == 0:
        return f"{size // MiB} MiB"
    if size % 1024 == 0 and size < MiB:
        return f"{size // 1024} KiB"
    return f"{size / MiB:.1f} MiB"


def _name_refusal(problem: NameProblem, name: str, where: str = "") -> Decision:
    shown = _show(name)
    inside = f" inside {where}" if where else ""
    if problem.rule == "attachment.extension":
        return _no(
            _POLICY,
            f"Files of type .{_show(problem.extension, 20)} are not allowed ({shown}{inside}). "
            "Ask the office you are writing with to allow this type if it is safe.",
            problem.rule,
        )
    if problem.rule == "attachment.name_bidi":
        reason = "contains hidden characters that reverse the text and can disguise the file type"
    elif problem.rule == "attachment.name_nul":
        reason = "contains a NUL character"
    else:
        reason = 'contains a ".." folder part'
    return _no(
        _POLICY,
        f'The file name "{shown}"{inside} {reason}. Rename the file and send it again.',
        problem.rule,
    )


def _label(name: str | None, ctype: str) -> str:
    return f'"{_show(name)}"' if name else f"an unnamed {_show(ctype, 40)} attachment"


def _archive_refusal(finding: Finding, label: str, policy: AttachmentPolicy) -> Decision:
    members = " / ".join(_show(m, 60) for m in finding.members if m)
    at = f' (at "{members}")' if members else ""
    problem = finding.problem
    if problem is Problem.NAME:
        assert isinstance(finding.detail, NameProblem)
        return _name_refusal(finding.detail, finding.members[-1], f"the archive {label}")
    if problem is Problem.PATH:
        return _no(
            _POLICY,
            f'The archive {label} contains a file path that leads outside its folder ("{members}"). '
            "Pack the files again without folder paths and resend.",
            "attachment.archive_path",
        )
    if problem is Problem.EXECUTABLE:
        what = finding.detail.value if isinstance(finding.detail, Kind) else "a program"
        named = f' named "{members}"' if members else ""
        return _no(
            _POLICY,
            f"The archive {label} contains {what}{named}, which is never allowed. "
            "Send documents or images only.",
            "attachment.executable",
        )
    if problem is Problem.TOO_DEEP:
        return _no(
            _LIMIT,
            f"The archive {label} has archives nested more than {policy.archive_max_depth} deep, "
            "so it cannot be checked. Send the files unpacked or in a single archive.",
            "attachment.archive_depth",
        )
    if problem is Problem.ENCRYPTED:
        return _no(
            _POLICY,
            f"The archive {label} is password-protected{at}, so it cannot be checked. "
            "Send it without a password: mail on this service is already encrypted.",
            "attachment.archive_encrypted",
        )
    if problem is Problem.BOMB:
        return _no(
            _TOO_BIG,
            f"The archive {label} expands to more than {_limit(policy.archive_max_total)} "
            f"or more than {policy.archive_max_ratio} times its size, so it cannot be checked. "
            "Send the files in smaller parts.",
            "attachment.archive_bomb",
        )
    if problem is Problem.UNSUPPORTED:
        what = finding.detail.value if isinstance(finding.detail, Kind) else "an archive format"
        return _no(
            _POLICY,
            f"The attachment {label} holds {what}{at} that cannot be checked. "
            "Send the files as a zip archive or one by one.",
            "attachment.archive_unsupported",
        )
    return _no(
        _MEDIA,
        f"The archive {label} is damaged{at}, so it cannot be checked. Create it again and resend.",
        "attachment.archive_damaged",
    )


def _malformed(what: str) -> _Refuse:
    return _Refuse(
        _no(
            _MEDIA,
            f"The message structure is malformed ({what}), so its attachments cannot be checked. "
            "Send it again from a standard mail program.",
            "mime.malformed",
        )
    )


# --------------------------------------------------------------------------
# Pre-parse scan and elision
# --------------------------------------------------------------------------


def _dash_lines(raw: bytes) -> list[int]:
    """Offsets of every line that starts with "--" (feedparser line rules:
    a line ends at CRLF, LF or a bare CR)."""
    found: list[int] = [0] if raw.startswith(b"--") else []
    pos = 0
    hits = 0
    while True:
        i = raw.find(b"-", pos)  # memchr: fast over base64, which has no "-"
        if i < 0:
            return found
        hits += 1
        if hits > _DENSE_HYPHENS:
            break
        if i > 0 and raw[i + 1 : i + 2] == b"-" and raw[i - 1] in (10, 13):
            found.append(i)
            if len(found) > _MAX_DASH_LINES:
                return found
            pos = i + 2
        else:
            pos = i + 1
    # Hyphen-heavy text: look for the line starts directly.
    start = max(i - 1, 0)
    rest: list[int] = []
    for needle in (b"\n--", b"\r--"):
        j = raw.find(needle, start)
        while j >= 0:
            rest.append(j + 1)
            if len(found) + len(rest) > 2 * _MAX_DASH_LINES:
                break
            j = raw.find(needle, j + 3)
    found.extend(sorted(p for p in set(rest) if not found or p > found[-1]))
    return found


def _next_line(raw: bytes, p: int, limit: int) -> tuple[int, int]:
    """(end of the line's content, start of the next line) for the line at p."""
    nl = raw.find(b"\n", p, limit)
    stop = nl if nl >= 0 else limit
    cr = raw.find(b"\r", p, stop)
    if cr >= 0:
        return (cr, cr + 2) if raw[cr + 1 : cr + 2] == b"\n" else (cr, cr + 1)
    if nl >= 0:
        return nl, nl + 1
    return limit, limit


def _header_fields(raw: bytes, start: int, end: int) -> int:
    """Header fields in raw[start:end]: lines minus continuation lines."""
    lines = raw.count(b"\n", start, end) + raw.count(b"\r", start, end) - raw.count(b"\r\n", start, end)
    folded = sum(raw.count(s, start, end) for s in (b"\n ", b"\n\t", b"\r ", b"\r\t"))
    return lines - folded


def _too_many_headers(policy: AttachmentPolicy) -> _Refuse:
    return _Refuse(
        _no(
            _LIMIT,
            f"The message has more than {policy.max_headers} header fields in one part. "
            "Send it again from a standard mail program.",
            "mime.headers",
        )
    )


def _too_many_parts(policy: AttachmentPolicy) -> _Refuse:
    return _Refuse(
        _no(
            _LIMIT,
            f"The message has more than {policy.max_parts} parts. Send the attachments in several messages.",
            "mime.parts",
        )
    )


_CONTENT_TYPE_FIELD = re.compile(rb"(?im)^content-type[ \t]*:([^\r\n]*(?:(?:\r\n|\r|\n)[ \t][^\r\n]*)*)")
_BOUNDARY_PARAM = re.compile(rb'(?i);\s*boundary\s*=\s*(?:"((?:[^"\\\r\n]|\\.)*)"|([^\s;"]+))')


def _block_container(raw: bytes, start: int, end: int) -> tuple[str, bytes]:
    """("multipart", boundary), ("message", b"") or ("", b"") for the header
    block raw[start:end], judged by its first Content-Type field."""
    m = _CONTENT_TYPE_FIELD.search(raw, start, end)
    if not m:
        return "", b""
    value = m.group(1).strip().lower()
    if value.startswith(b"message/"):
        return "message", b""
    if value.startswith(b"multipart/"):
        b = _BOUNDARY_PARAM.search(m.group(1))
        if b:
            quoted = b.group(1)
            return "multipart", re.sub(rb"\\(.)", rb"\1", quoted) if quoted is not None else b.group(2)
    return "", b""


def _boundary_match(stack: list[bytes], line: bytes) -> tuple[int, bool] | None:
    """Which open boundary a "--" line closes or separates, innermost first,
    as the feedparser tests them: "--" boundary ["--"] [white space]."""
    for i in range(len(stack) - 1, -1, -1):
        if line.startswith(stack[i], 2):
            rest = line[2 + len(stack[i]) :].rstrip(b" \t")
            if rest in (b"", b"--"):
                return i, rest == b"--"
    return None


def _elisions(raw: bytes, policy: AttachmentPolicy, elide_min: int) -> list[tuple[int, int]]:
    """Checks before parsing, and the runs of body lines to elide.

    Before parsing: header fields are counted in the first header block of
    every window between "--" lines, and multipart nesting is followed
    through the boundaries the header blocks declare.  The parser tests
    every line against every open boundary, so deep nesting costs it
    quadratic time; a message nested deeper than the limit is refused here.
    That estimate only counts multiparts it can follow, so it never
    exceeds the depth the walk would find.

    A run is elided only if (1) it lies between two lines that start with
    "--" (so it holds no boundary line), and (2) its first line is neither
    blank nor header-like.  Then in every parser state the run and a
    placeholder line behave alike: in a header block, that first line ends
    the headers either way; in a body, preamble or epilogue, lines other
    than boundaries are opaque.  (message/delivery-status, whose blank
    lines matter, is handled by the caller.)
    """
    n = len(raw)
    dashes = _dash_lines(raw)
    if len(dashes) > _MAX_DASH_LINES:
        raise _too_many_parts(policy)
    starts = [0] + [d for d in dashes if d > 0]
    ranges: list[tuple[int, int]] = []
    open_boundaries: list[bytes] = []
    for k, ws in enumerate(starts):
        we = starts[k + 1] if k + 1 < len(starts) else n
        if k == 0:
            p = 0  # the message's own header block
            headers_expected = True
        else:
            line_end, p = _next_line(raw, ws, we)  # p: after the "--" line
            match = _boundary_match(open_boundaries, raw[ws:line_end]) if open_boundaries else None
            headers_expected = match is not None and not match[1]
            if match is not None:
                # A boundary ends every multipart nested inside its own.
                del open_boundaries[match[0] + (0 if match[1] else 1) :]
        first_block = True
        candidate = -1
        for _ in range(_MAX_SKIPS):
            if p >= we:
                break
            if raw[p] in (10, 13):  # a blank line
                p = _next_line(raw, p, we)[1]
                first_block = False
                continue
            if _HEADER_LIKE.match(raw, p, we):
                m = _HEADER_BLOCK.match(raw, p, we)
                end = m.end() if m else p
                # Only the block right after a boundary (or at the top) is
                # surely a header block; later ones may be body text.
                if first_block and _header_fields(raw, p, end) > policy.max_headers:
                    raise _too_many_headers(policy)
                if headers_expected:
                    container, boundary = _block_container(raw, p, end)
                    # After a message/* part's headers come the nested
                    # message's own; after anything else, a body.
                    headers_expected = container == "message"
                    if container == "multipart" and boundary:
                        open_boundaries.append(boundary)
                        # The innermost multipart sits at depth len - 1.
                        if len(open_boundaries) - 1 > policy.max_mime_depth:
                            raise _too_deep(policy)
                first_block = False
                p = end if end > p else _next_line(raw, p, we)[1]
                continue
            candidate = p
            break
        if candidate < 0:
            continue
        # The run ends before the window's last line break, which belongs to
        # the next boundary (RFC 2046 section 5.1.1) or ends the message.
        e = we
        if raw[e - 2 : e] == b"\r\n" and e - 2 >= candidate:
            e -= 2
        elif e > candidate and raw[e - 1] in (10, 13):
            e -= 1
        if e - candidate >= elide_min:
            ranges.append((candidate, e))
    return ranges


@dataclass
class _Parsed:
    message: Message
    raw: bytes
    ranges: list[tuple[int, int]]
    nonce: bytes | None  # the placeholders' nonce; None when nothing was elided


class _MemoHeaderFactory:
    """The default policy's header registry, memoised for one message.

    With ``email.policy.default`` every header access builds a new header
    object (and, in HeaderRegistry.__getitem__, a new class): the parser
    alone asks for each part's Content-Type about five times.  Header objects
    are immutable, so returning the same one for the same (name, value) is
    safe.  One instance per check, so nothing outlives the message.
    """

    def __init__(self) -> None:
        self._registry = HeaderRegistry()
        self._classes: dict[str, type] = {}
        self._headers: dict[tuple[str, str], str] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = self._registry[key]
        return cls

    def __call__(self, name: str, value: str) -> str:
        # Header objects are str subclasses (email.headerregistry.BaseHeader).
        key = (name, value)
        header = self._headers.get(key)
        if header is None:
            if name.lower() in headerobjects.SHARED_FIELDS:
                # Made once for the messages that repeat a value (see
                # mime/headerobjects.py; never one that may hold a file name).
                header = headerobjects.header(name, value)
            else:
                header = self[name](name, value)
            self._headers[key] = header
        return header


def _parse(raw: bytes, policy: AttachmentPolicy, elide_min: int = _ELIDE_MIN) -> _Parsed:
    """Parse ``raw`` with the email package, with long body runs elided."""
    top = _HEADER_BLOCK.match(raw, 0)
    if top and _header_fields(raw, 0, top.end()) > policy.max_headers:
        raise _too_many_headers(policy)
    ranges = _elisions(raw, policy, elide_min)
    nonce: bytes | None = None
    skeleton = raw
    if ranges:
        # A random marker per call: a sender cannot put one in a message.
        nonce = secrets.token_hex(8).encode()  # 16 hex digits, as _TOKEN expects
        pieces: list[bytes] = []
        prev = 0
        for i, (a, b) in enumerate(ranges):
            pieces.append(raw[prev:a])
            pieces.append(b"PVELIDED" + nonce + b"N%dE" % i)
            prev = b
        pieces.append(raw[prev:])
        skeleton = b"".join(pieces)
        if b"delivery-status" in skeleton.lower():
            # Blank lines separate header blocks there; parse it all.
            skeleton, ranges = raw, []
        else:
            pass
    try:
        # email.policy.default in every respect but the memoised headers.
        policy_ = email.policy.default.clone(header_factory=_MemoHeaderFactory())
        message = BytesParser(policy=policy_).parsebytes(skeleton)
    except RecursionError:
        raise _too_deep(policy) from None
    except _PARSER_ERRORS:
        raise _malformed("unreadable headers") from None
    return _Parsed(message, raw, ranges, nonce if ranges else None)


def _too_deep(policy: AttachmentPolicy) -> _Refuse:
    return _Refuse(
        _no(
            _LIMIT,
            f"The message has parts nested more than {policy.max_mime_depth} levels deep. "
            "Send a simpler message, or forward the messages one at a time.",
            "mime.depth",
        )
    )


# --------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------


class _Body:
    """A leaf's transfer-encoded body as pieces of the skeleton payload and
    of the original message, without copying them."""

    def __init__(self, pieces: list[tuple[bytes, int, int]]) -> None:
        self.pieces = pieces
        self.size = sum(b - a for _, a, b in pieces)

    def count(self, byte: bytes) -> int:
        return sum(src.count(byte, a, b) for src, a, b in self.pieces)

    def head(self, n: int) -> bytes:
        out: list[bytes] = []
        for src, a, b in self.pieces:
            if n <= 0:
                break
            take = min(n, b - a)
            out.append(src[a : a + take])
            n -= take
        return b"".join(out)

    def tail(self, n: int) -> bytes:
        out: list[bytes] = []
        for src, a, b in reversed(self.pieces):
            if n <= 0:
                break
            take = min(n, b - a)
            out.append(src[b - take : b])
            n -= take
        return b"".join(reversed(out))

    def join(self) -> bytes:
        if len(self.pieces) == 1:
            src, a, b = self.pieces[0]
            return src[a:b] if (a, b) != (0, len(src)) else src
        return b"".join(src[a:b] for src, a, b in self.pieces)


def _body(parsed: _Parsed, part: Message) -> _Body:
    # The raw payload string as the parser stored it.  get_payload() without
    # decode would re-decode 8-bit text with the declared charset, lossily.
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, str):
        raise _malformed("a part has no body")
    data = payload.encode("ascii", "surrogateescape")
    if parsed.nonce is None:
        return _Body([(data, 0, len(data))])
    pieces: list[tuple[bytes, int, int]] = []
    pos = 0
    for m in _TOKEN.finditer(data):
        if m.group(1) != parsed.nonce:
            continue  # looks like a placeholder, but not one of ours
        if m.start() > pos:
            pieces.append((data, pos, m.start()))
        a, b = parsed.ranges[int(m.group(2))]
        pieces.append((parsed.raw, a, b))
        pos = m.end()
    if pos < len(data):
        pieces.append((data, pos, len(data)))
    return _Body(pieces)


class _BadEncoding(Exception):
    """Internal: a base64 body that decoders would read differently."""


def _b64decode(s: bytes, at_end: bool) -> bytes:
    """Decode whitespace-free base64 text, strictly.

    Only the alphabet is allowed, and "=" only as final padding: decoders
    disagree about junk characters and about data after "=" (Python's stops
    there, others go on), and a program could hide in the difference.
    ``at_end`` says whether ``s`` runs to the end of the body; if not, only
    whole 4-character groups are decoded.  Missing final padding is added
    (RFC 2045 section 6.8 requires it, some encoders omit it).
    """
    eq = s.find(b"=")
    if eq >= 0 and (not at_end or len(s) - eq > 2 or s[eq:].strip(b"=")):
        raise _BadEncoding
    if at_end:
        s = s.rstrip(b"=")
        if len(s) % 4 == 1:
            raise _BadEncoding
        s += b"=" * (-len(s) % 4)
    else:
        s = s[: len(s) // 4 * 4]
    try:
        # Strict mode refuses anything outside the alphabet.
        return binascii.a2b_base64(s, strict_mode=True)
    except binascii.Error:
        raise _BadEncoding from None


def _decode_head(body: _Body, cte: str) -> bytes:
    """The first SNIFF_LEN decoded bytes (fewer if the file is shorter)."""
    if cte in _IDENTITY_CTES:
        return body.head(SNIFF_LEN)
    take = 2 * SNIFF_LEN
    while True:
        chunk = body.head(take)
        at_end = take >= body.size
        if cte == "quoted-printable":
            if not at_end:
                # Decode whole lines only: a cut "=\r\n" soft break or
                # "=3D" escape would decode differently.
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    cut = chunk.rfind(b"\r")
                chunk = chunk[: cut + 1] if cut > 0 else chunk
            decoded = binascii.a2b_qp(chunk)
        else:
            decoded = _b64decode(chunk.translate(None, _B64_WS), at_end)
        if len(decoded) >= SNIFF_LEN or at_end:
            return decoded[:SNIFF_LEN]
        take *= 2


def _decode_all(body: _Body, cte: str) -> bytes:
    data = body.join()
    if cte == "base64":
        return _b64decode(data.translate(None, _B64_WS), True)
    if cte == "quoted-printable":
        return binascii.a2b_qp(data)
    return data


def _size_over(body: _Body, cte: str, max_size: int) -> int | None:
    """The decoded size if it exceeds ``max_size``, else None, without
    decoding: a base64 body's size follows from its length."""
    n = body.size
    if cte == "base64":
        if n * 3 // 4 <= max_size:  # even with no line breaks at all
            return None
        # Exact for valid base64 (alphabet and white space only); junk would
        # only make this larger than what any decoder produces.
        alphabet = n - sum(body.count(bytes([c])) for c in _B64_WS)
        tail = body.tail(16).rstrip(_B64_WS)
        pad = min(len(tail) - len(tail.rstrip(b"=")), 2)
        size = alphabet // 4 * 3 - pad if alphabet % 4 == 0 else alphabet * 3 // 4
        return size if size > max_size else None
    if n <= max_size:  # quoted-printable only ever shrinks when decoded
        return None
    size = len(binascii.a2b_qp(body.join())) if cte == "quoted-printable" else n
    return size if size > max_size else None


# --------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------


def _cte(part: Message) -> str:
    for key, value in part.raw_items():
        if key.strip().lower() == "content-transfer-encoding":
            # Drop RFC 822 comments: "base64 (binary data)".
            return _COMMENT.sub("", _raw_text(str(value))).strip().lower()
    return "7bit"


_MEDIA_TYPE = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*(?:;|\(|$)")


def _content_type(raw_headers: list[tuple[str, str]], default: str) -> str:
    """The part's media type from its first Content-Type field, or the
    default (text/plain; message/rfc822 inside multipart/digest) when it is
    missing or unreadable, as RFC 2045 section 5.2 says."""
    for key, value in raw_headers:
        if key == "content-type":
            m = _MEDIA_TYPE.match(_LINE_BREAKS.sub("", value))
            return m.group(1).lower() if m else default
    return default


def _raw_headers(part: Message) -> list[tuple[str, str]]:
    """Raw header values with lower-case names.  (The email package's header
    objects re-parse on every access, which dominates small messages.)"""
    return [(k.strip().lower(), v) for k, v in part.raw_items() if isinstance(k, str) and isinstance(v, str)]


class _NeedsBody(Exception):
    """A header-only walk met a file: its body must be read (full parse)."""


class _Walker:
    def __init__(self, parsed: _Parsed, policy: AttachmentPolicy, allowed: frozenset[str],
                 header_only: bool = False) -> None:
        self.parsed = parsed
        self.policy = policy
        self.blocked = _normalise_extensions(frozenset(policy.blocked_extensions))
        self.allowed = allowed
        self.parts = 0
        # The parse holds the header section only (see _header_section).
        self.header_only = header_only

    def walk(self, part: Message, depth: int) -> None:
        policy = self.policy
        if depth > policy.max_mime_depth:
            raise _too_deep(policy)
        if depth > 0:
            self.parts += 1
            if self.parts > policy.max_parts:
                raise _too_many_parts(policy)
        keys = [k.strip().lower() for k in part]
        if len(keys) > policy.max_headers:
            raise _too_many_headers(policy)
        for key in ("content-type", "content-disposition", "content-transfer-encoding"):
            if keys.count(key) > 1:
                # Clients differ on which copy wins.
                raise _malformed(f"more than one {key.title()} header in a part")
        for defect in part.defects:
            if isinstance(defect, _REFUSED_DEFECTS):
                raise _malformed(_DEFECT_TEXT.get(type(defect), "a damaged MIME boundary"))
        if part.is_multipart():
            # RFC 2045 section 6.4 and RFC 2046 section 5.2.1: containers are
            # 7bit, 8bit or binary; a base64 message/rfc822 would be one
            # message to this parser and another to a client that decodes it.
            if _cte(part) not in _IDENTITY_CTES:
                raise _malformed("an encoded multipart or message part")
            if depth > 0:
                # An attached message is saved under the name it carries.
                self.check_names(_candidate_names(part, _raw_headers(part)))
            children = part.get_payload()
            if not isinstance(children, list):
                raise _malformed("a multipart without parts")
            for child in children:
                if not isinstance(child, Message):
                    raise _malformed("a multipart without parts")
                self.walk(child, depth + 1)
        else:
            self.leaf(part)

    def leaf(self, part: Message) -> None:
        policy = self.policy
        raw_headers = _raw_headers(part)
        names = _candidate_names(part, raw_headers)
        ctype = _content_type(raw_headers, part.get_default_type())
        disposition = next(
            (v.split(";", 1)[0].strip().lower() for k, v in raw_headers if k == "content-disposition"), ""
        )
        is_file = bool(names) or disposition == "attachment" or not ctype.startswith("text/")
        if not is_file:
            return
        if self.header_only:
            raise _NeedsBody
        label = _label(names[0] if names else None, ctype)
        self.check_names(names)
        cte = _cte(part)
        if cte not in _KNOWN_CTES:
            raise _Refuse(
                _no(
                    _MEDIA,
                    f"The attachment {label} uses a transfer encoding that cannot be checked. "
                    "Attach it again from a standard mail program.",
                    "attachment.encoding",
                )
            )
        body = _body(self.parsed, part)
        try:
            head = _decode_head(body, cte)
        except (_BadEncoding, binascii.Error):
            raise _Refuse(self._damaged_encoding(label)) from None
        kind = sniff(head)
        if policy.sniff_content and kind in EXECUTABLE_KINDS:
            raise _Refuse(
                _no(
                    _POLICY,
                    f"The attachment {label} is {kind.value}, which is never allowed, "
                    "whatever its name. Send documents or images only.",
                    "attachment.executable",
                )
            )
        size = _size_over(body, cte, policy.max_size)
        if size is not None:
            raise _Refuse(self._too_big(label, size))
        if not policy.scan_archives:
            return
        archive = kind if kind in ARCHIVE_KINDS else None
        for name in names:
            if archive is None:
                base = _strip_trailing(_SEPARATORS.split(name)[-1])
                ext = base.rsplit(".", 1)[-1].casefold() if "." in base else ""
                archive = archive_kind_for_extension(ext)
        if archive is None:
            return
        if archive not in SCANNABLE_ARCHIVE_KINDS:
            raise _Refuse(_archive_refusal(Finding(Problem.UNSUPPORTED, (), archive), label, policy))
        try:
            data = _decode_all(body, cte)
        except (_BadEncoding, binascii.Error):
            raise _Refuse(self._damaged_encoding(label)) from None
        if len(data) > policy.max_size:
            raise _Refuse(self._too_big(label, len(data)))
        finding = scan_archive(
            data,
            archive,
            Limits.from_policy(policy),
            lambda member: name_problem(member, self.blocked, self.allowed),
        )
        if finding is not None:
            raise _Refuse(_archive_refusal(finding, label, policy))

    def check_names(self, names: list[str]) -> None:
        for name in names:
            problem = name_problem(name, self.blocked, self.allowed)
            if problem is not None:
                raise _Refuse(_name_refusal(problem, name))

    def _too_big(self, label: str, size: int) -> Decision:
        return _no(
            _TOO_BIG,
            f"The attachment {label} is {_mib(size)}; the limit is "
            f"{_limit(self.policy.max_size)} per file. Send it in parts or as a smaller file.",
            "attachment.size",
        )

    def _damaged_encoding(self, label: str) -> Decision:
        return _no(
            _MEDIA,
            f"The attachment {label} has a damaged base64 encoding, so it cannot be checked. "
            "Attach it again.",
            "attachment.encoding",
        )


_DEFECT_TEXT: dict[type, str] = {
    email.errors.NoBoundaryInMultipartDefect: "a multipart part without a boundary",
    email.errors.StartBoundaryNotFoundDefect: "a multipart boundary that never occurs",
    email.errors.MultipartInvariantViolationDefect: "a multipart part without parts",
    email.errors.InvalidMultipartContentTransferEncodingDefect: "an encoded multipart part",
    email.errors.MissingHeaderBodySeparatorDefect: "headers not followed by a blank line",
}


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


# Two line ends in a row: the end of the first blank line. Atomic groups,
# so that a CR LF is never taken for two line ends (the parser splits lines
# at CR LF, CR or LF alike).
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
# Set False by tests, to compare with the whole-message path.
_HEADER_FAST_PATH = True


def _header_section(raw: bytes) -> bytes | None:
    """``raw`` up to and including its first blank line, or None if it has
    none. The parser's header section ends there or before (at the first
    line that is not a header field), so it parses these bytes' headers
    exactly as the whole message's."""
    m = _BLANK_LINE.search(raw)
    return None if m is None else raw[: m.end()]


def _single_part_without_file(raw: bytes, policy: AttachmentPolicy, allowed: frozenset[str]) -> bool:
    """Whether ``raw`` passes the checks from its header section alone: a
    message that is not multipart or message/* and carries no file (the
    plain-text message of most mail), decided with the same parse and the
    same walk as the whole message. For such a message the parser makes
    the rest of the bytes the payload, line by line, without looking at
    them (no defect, no part, no header can come from there), and the walk
    reads no body of a part that is not a file; so the whole message's
    check gives the same answer, at the cost of parsing every body line.
    Raises ``_Refuse`` for that part's headers as the whole check would.
    False: check the whole message (multipart, message/*, a file, no blank
    line, or a header section the parser refuses: its own words then)."""
    head = _header_section(raw) if _HEADER_FAST_PATH else None
    if head is None or len(head) == len(raw):
        return False
    try:
        parsed = _parse(head, policy)
    except (_Refuse, RecursionError):
        return False  # the whole message's parse decides, and says why
    root = parsed.message
    if root.is_multipart() or root.get_content_maintype() in ("multipart", "message"):
        return False
    try:
        _Walker(parsed, policy, allowed, header_only=True).walk(root, 0)
    except _NeedsBody:
        return False
    return True


def check_attachments(
    raw: bytes,
    policy: AttachmentPolicy,
    allow_extensions: frozenset[str] = frozenset(),
) -> Decision:
    """Decide whether the message ``raw`` may pass the attachment policy.

    ``allow_extensions`` is the union of the per-office exceptions that
    apply to this conversation (the caller works out which offices apply);
    extensions are compared case-insensitively, with or without a dot.
    Returns :data:`~postvault.policy.decision.ALLOW` or a refusal whose
    ``rule`` names the rule (never a file name).  Never raises for any
    content of ``raw``.
    """
    try:
        if len(raw) > policy.max_message_size:
            return _no(
                _TOO_BIG,
                f"The message is {_mib(len(raw))}; the limit is {_limit(policy.max_message_size)}. "
                "Send the attachments in several messages.",
                "message.size",
            )
        raw = bytes(raw)
        allowed = _normalise_extensions(frozenset(allow_extensions))
        if not _single_part_without_file(raw, policy, allowed):
            parsed = _parse(raw, policy)
            walker = _Walker(parsed, policy, allowed)
            walker.walk(parsed.message, 0)
    except _Refuse as stop:
        return stop.decision
    except RecursionError:
        return _too_deep(policy).decision
    return ALLOW
