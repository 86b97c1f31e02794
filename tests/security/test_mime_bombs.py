"""MIME bombs: deep nesting, huge part counts, 100,000 header fields.

Refused, and bounded by construction rather than by a clock (the project
runs no timing assertions): the submission server refuses a header section
longer than 256 KiB before any parser runs, the attachment checker stops at
policy.toml's max_headers / max_parts / max_mime_depth (the audited rule
says which limit fired), and the IMAP summary parser caps depth, parts and
header fields (``limited``) so FETCH of an appended bomb stays bounded.

Sources: CVE-2020-12100 (Dovecot: deeply nested MIME parts exhaust
resources); RFC 2046 §5.1 (multipart nesting is unbounded in the grammar,
so the limit must be ours); CWE-400 / CWE-674 / CWE-770 (resource
exhaustion, recursion, allocation without limits); the "100,000 headers"
and "deep nesting" cases are issue 8's own.
"""

from __future__ import annotations

from postvault.mime.summary import MAX_DEPTH, MAX_HEADER_FIELDS, MAX_PARTS, summarize
from postvault.policy.schema import AttachmentPolicy
from tests.policy.test_attachments import PDF, attachment, multipart, part
from tests.smtpd.conftest import Server, World

from .conftest import PASSWORD, Serve
from .mail import TEXT, TOP, mail, submit

POLICY = AttachmentPolicy()


def fields(n: int) -> bytes:
    return b"".join(b"X-Filler-%d: v\r\n" % i for i in range(n))


def deep(levels: int) -> bytes:
    """``levels`` multiparts one inside the other around a text part (built
    in one join: nesting by concatenation is quadratic)."""
    opens = [b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(levels)]
    closes = [b"\r\n--b%d--\r\n" % i for i in reversed(range(levels))]
    return TOP.encode() + b"".join(opens) + TEXT + b"".join(closes)


def many_parts(n: int) -> bytes:
    return multipart(*([b"Content-Type: text/plain\r\n\r\nx\r\n"] * n), headers=TOP)


def rfc822_chain(levels: int) -> bytes:
    inner = TOP.encode() + b"Content-Type: text/plain\r\n\r\nbottom\r\n"
    for _ in range(levels):
        inner = TOP.encode() + b"Content-Type: message/rfc822\r\n\r\n" + inner
    return inner


def count_parts(summary_part: dict) -> int:  # type: ignore[type-arg]
    kids = list(summary_part.get("parts") or [])
    if summary_part.get("body"):
        kids.append(summary_part["body"])
    return 1 + sum(count_parts(k) for k in kids)


def depth(summary_part: dict) -> int:  # type: ignore[type-arg]
    kids = list(summary_part.get("parts") or [])
    if summary_part.get("body"):
        kids.append(summary_part["body"])
    return 1 + max((depth(k) for k in kids), default=0)


# --- submission: refused, by which limit ---------------------------------------------------


def test_hundred_thousand_top_level_headers_refused_before_parsing(smtp: Server, world: World) -> None:
    # Issue 8; CWE-770.
    raw = fields(100_000) + mail(attachment(PDF))
    code, lines, rule = submit(smtp, world, raw)
    # The header-size cap fires before any parser sees a field: the work
    # done is one bounded find() over 256 KiB.
    assert code == 554 and rule == "header.too-long", lines


def test_header_count_limit_fires_at_the_limit(smtp: Server, world: World) -> None:
    # Under the size cap, the field count is the limit (policy max_headers).
    raw = fields(POLICY.max_headers + 1) + mail(attachment(PDF))
    code, lines, rule = submit(smtp, world, raw)
    assert code == 554 and rule == "mime.headers", lines
    assert f"more than {POLICY.max_headers} header fields" in lines[0]


def test_hundred_thousand_headers_in_a_part_refused(smtp: Server, world: World) -> None:
    raw = mail(part(fields(100_000) + b'Content-Type: application/pdf; name="a.pdf"', PDF))
    code, lines, rule = submit(smtp, world, raw)
    assert code == 554 and rule == "mime.headers", lines


def test_ten_thousand_nested_multiparts_refused_at_the_depth_limit(smtp: Server, world: World) -> None:
    # CVE-2020-12100 (Dovecot); RFC 2046 §5.1 sets no depth, policy max_mime_depth does (20).
    code, lines, rule = submit(smtp, world, deep(10_000))
    assert code == 554 and rule == "mime.depth", lines
    code, lines, rule = submit(smtp, world, deep(POLICY.max_mime_depth + 1))
    assert code == 554 and rule == "mime.depth", lines
    code, lines, _ = submit(smtp, world, deep(POLICY.max_mime_depth - 1))  # the twin
    assert code == 250, lines


def test_hundred_thousand_parts_refused_at_the_part_limit(smtp: Server, world: World) -> None:
    code, lines, rule = submit(smtp, world, many_parts(100_000))
    assert code == 554 and rule == "mime.parts", lines


def test_deep_message_rfc822_chain_refused(smtp: Server, world: World) -> None:
    # Forward-of-a-forward bombs: message/rfc822 counts as a level too.
    code, lines, rule = submit(smtp, world, rfc822_chain(1_000))
    assert code == 554 and rule == "mime.depth", lines


def test_boundary_lookalike_flood_refused(smtp: Server, world: World) -> None:
    # 300,000 lines that start like a delimiter: near misses are capped.
    code, lines, rule = submit(smtp, world, mail(attachment(b"--\r\n" * 300_000, "a.txt", "text/plain", "7bit")))
    assert code == 554 and rule == "mime.parts", lines


# --- the IMAP side: the summary parser is capped -------------------------------------------


def test_summary_parser_is_capped_by_construction() -> None:
    # What FETCH BODYSTRUCTURE is built from: never deeper than MAX_DEPTH,
    # never more than MAX_PARTS parts, whatever the input.
    s = summarize(deep(10_000))
    assert s["limited"] and depth(s["body"]) <= MAX_DEPTH + 1
    s = summarize(many_parts(100_000))
    assert s["limited"] and count_parts(s["body"]) <= MAX_PARTS + 1
    s = summarize(fields(100_000) + mail(attachment(PDF)))
    assert s["limited"]
    s = summarize(rfc822_chain(1_000))
    assert s["limited"] and depth(s["body"]) <= 2 * MAX_DEPTH + 2
    assert MAX_HEADER_FIELDS >= POLICY.max_headers  # anything SMTP accepts is summarised whole
    assert not summarize(mail(attachment(PDF)))["limited"]  # the twin


def test_appended_bombs_are_refused_and_stored_ones_fetch_bounded(serve: Serve) -> None:
    # IMAP APPEND runs the attachment policy as SMTP does: every bomb is
    # refused before anything is stored.
    member = serve.account("member")
    c = serve.login(member)
    rss_before = serve.rss_kib()
    bombs = [deep(10_000), many_parts(100_000), fields(100_000) + mail(attachment(PDF)), rfc822_chain(1_000)]
    for i, raw in enumerate(bombs):
        c.send(b"a%d APPEND Drafts {%d}\r\n" % (i, len(raw)))
        assert c.response().startswith(b"+")
        c.send(raw + b"\r\n")
        answer = c.response()
        assert answer.startswith(b"a%d NO [" % i), answer[:200]
    assert b"(MESSAGES 0)" in b"".join(c.command("e", "STATUS Drafts (MESSAGES)"))
    # Mail filed before a policy change (or by an office allowed more) can
    # still hold such structures, so the FETCH side is bounded on its own:
    # the same bombs filed through the store, below the policy.
    session = serve.store.login(member, PASSWORD)
    for raw in bombs:
        serve.store.append(session, "Drafts", raw)
    assert c.command("s", "SELECT Drafts")[-1].startswith(b"s OK")
    lines = c.command("f", "FETCH 1:* (BODYSTRUCTURE ENVELOPE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert lines[-1].startswith(b"f OK"), lines[-1]
    assert sum(1 for line in lines if b" FETCH (" in line) == len(bombs)
    # A bounded structure: far below what the bombs hold.
    assert max(len(line) for line in lines) < 2_000_000
    assert c.command("n", "NOOP")[-1] == b"n OK NOOP completed"
    # Generous: the bombs add up to ~7 MB; the server must not grow by
    # anything like a parse tree of 100,000 nodes each.
    assert serve.rss_kib() - rss_before < 150_000
    c.close()
