"""Fuzz harness: the MIME walkers, attachment policy and IMAP message summary.

Targets
- ``postvault.policy.attachments.check_attachments``: every message SMTP
  DATA and IMAP APPEND accept goes through it. Promise: it never raises;
  it allows, or refuses with a one-line printable reply and a rule id.
- ``postvault.mime.summary.summarize``: the ENVELOPE/BODYSTRUCTURE summary
  sealed with each stored message. Promise: it never raises, and never
  needs its last-resort fallback (which exists only in case of a bug, so
  reaching it counts as a crash here); every part's offsets lie inside the
  message; the summary is JSON as the store writes it; every section of
  RFC 3501 section 6.4.5 it names is a byte range inside the message.
- ``postvault.imapd.render`` over ``structure.from_summary`` (what FETCH
  sends) and ``structure.parse`` (the path for messages stored before
  summaries): the ENVELOPE, BODY and BODYSTRUCTURE bytes must parse, as a
  strict client reads RFC 3501 section 9, into exactly one list
  (:func:`read_value`).

The first input byte picks a policy variant (tiny size limits, an office
exception, archive scanning off); the rest is the message.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses
import json
import re
from typing import Any

from fuzz._common import check, fuzzing, instrumented, main, patched

with instrumented(fuzzing(__name__), ["postvault.policy.attachments", "postvault.policy.archives", "postvault.policy.sniff",
                                      "postvault.mime", "postvault.imapd.render", "postvault.imapd.structure"]):
    from postvault.imapd import render, structure
    from postvault.mime import summary as summary_mod
    from postvault.policy.attachments import check_attachments
    from postvault.policy.decision import Decision
    from postvault.policy.schema import AttachmentPolicy

_BASE = AttachmentPolicy()
_POLICIES = [
    _BASE,
    dataclasses.replace(_BASE, max_size=64, max_message_size=4096, max_parts=8, max_mime_depth=3, max_headers=16),
    dataclasses.replace(_BASE, scan_archives=False, sniff_content=False),
    dataclasses.replace(_BASE, archive_max_total=256, archive_max_ratio=2, archive_max_depth=1),
]
_ALLOW = [frozenset(), frozenset({"exe", ".ZIP"})]


def _fallback_is_a_bug(raw: bytes) -> Any:
    # summarize() calls _fallback from inside its ``except``: re-raise what it caught.
    raise  # noqa: PLE0704




def _check_decision(decision: Decision) -> None:
    check(isinstance(decision, Decision), "check_attachments returned something else than a Decision")
    if decision.allowed:
        return
    check(decision.code in (550, 552, 554), f"refusal with code {decision.code}")
    check(decision.rule and decision.rule.isascii(), "refusal without a rule id")
    text = decision.text
    check(text and text.isascii() and text.isprintable(), "refusal text is not one printable ASCII line")


def _walk_parts(part: dict[str, Any], size: int, path: tuple[int, ...], out: list[tuple[int, ...]]) -> None:
    start, head, body = part["offsets"]
    check(0 <= start and head >= 0 and body >= 0 and start + head + body <= size,
          f"part {path} has offsets {part['offsets']} outside a message of {size} octets")
    out.append(path)
    check(isinstance(part["type"], str) and isinstance(part["subtype"], str), "type/subtype not strings")
    if part["type"] == "multipart":
        check(len(part["parts"]) >= 1, f"multipart {path} without parts")
    children = part["parts"] if part["type"] == "multipart" else []
    if part.get("body") is not None:
        inner = part["body"]
        children = inner["parts"] if inner["type"] == "multipart" else [inner]
    for n, child in enumerate(children, 1):
        if len(path) < 40:
            _walk_parts(child, size, (*path, n), out)


def _check_summary(raw: bytes) -> dict[str, Any]:
    doc = summary_mod.summarize(raw)
    size = len(raw)
    check(doc["size"] == size, "summary size is not the message size")
    check(0 <= doc["header_size"] <= size, "header size outside the message")
    # The store seals exactly this encoding.
    json.dumps(doc, separators=(",", ":"), ensure_ascii=True)
    paths: list[tuple[int, ...]] = []
    body = doc["body"]
    check(body["offsets"] == [0, doc["header_size"], size - doc["header_size"]],
          "the body part does not span the message")
    children = body["parts"] if body["type"] == "multipart" else [body]
    for n, child in enumerate(children, 1):
        _walk_parts(child, size, (n,), paths)
    for path in [(), *paths[:200]]:
        for which in ("", "HEADER", "TEXT", "MIME"):
            if which == "MIME" and not path:
                continue
            found = summary_mod.section_range(doc, path, which)  # type: ignore[arg-type]
            if found is not None:
                offset, length = found
                check(0 <= offset and 0 <= length and offset + length <= size,
                      f"section {path} {which} is {found}, outside {size} octets")
    return doc


_ATOM = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\\]]+")
_QUOTED_CHAR = re.compile(rb'[^"\\\r\n\x00]|\\["\\]')


def read_value(data: bytes, pos: int = 0, depth: int = 0) -> tuple[Any, int]:
    """One RFC 3501 section 9 value at ``pos`` (a parenthesized list, NIL,
    a quoted string, a literal or an atom/number) and where it ends; a
    strict client's reader. (Twisted's ``parseNestedParens`` is not one: it
    refuses ``"a\\\\"``, a quoted string ending in an escaped backslash.)"""
    check(pos < len(data) and depth < 200, "the IMAP value ends early")
    c = data[pos:pos + 1]
    if c == b"(":
        items: list[Any] = []
        pos += 1
        while data[pos:pos + 1] != b")":
            # Items are separated by one space, except lists of lists
            # (``1*address``, ``1*body``), which follow each other directly.
            if items and not (isinstance(items[-1], list) and data[pos:pos + 1] == b"("):
                check(data[pos:pos + 1] == b" ", "list items not separated by one space")
                pos += 1
            item, pos = read_value(data, pos, depth + 1)
            items.append(item)
        return items, pos + 1
    if c == b'"':
        out, pos = bytearray(), pos + 1
        while data[pos:pos + 1] != b'"':
            m = _QUOTED_CHAR.match(data, pos)
            check(m is not None, "a quoted string holds a character it may not")
            assert m is not None
            out += m[0][-1:]
            pos = m.end()
        return bytes(out), pos + 1
    if c == b"{":
        m = re.compile(rb"\{(\d+)\}\r\n").match(data, pos)
        check(m is not None, "a malformed literal")
        assert m is not None
        end = m.end() + int(m[1])
        check(end <= len(data), "a literal longer than the data")
        return data[m.end():end], end
    m = _ATOM.match(data, pos)
    check(m is not None, f"no IMAP value at {pos}: {data[pos:pos + 10]!r}")
    assert m is not None
    return (None if m[0] == b"NIL" else m[0]), m.end()


def _parses_as_one_list(data: bytes, what: str) -> None:
    try:
        parsed, end = read_value(data)
    except AssertionError as exc:
        raise AssertionError(f"{what} does not parse as IMAP: {exc}") from exc
    check(isinstance(parsed, list) and end == len(data), f"{what} is not one parenthesized list")


def _check_rendering(st: structure.Structure) -> None:
    _parses_as_one_list(render.envelope(st.envelope), "ENVELOPE")
    _parses_as_one_list(render.body(st.body, True), "BODYSTRUCTURE")
    _parses_as_one_list(render.body(st.body, False), "BODY")


def one_input(data: bytes) -> None:
    """Check one message against the walkers' promises (module docstring)."""
    selector = data[0] if data else 0
    raw = data[1:]
    policy = _POLICIES[selector % len(_POLICIES)]
    allow = _ALLOW[(selector >> 2) & 1]
    _check_decision(check_attachments(raw, policy, allow))
    with patched(summary_mod, "_fallback", _fallback_is_a_bug):
        doc = _check_summary(raw)
    _check_rendering(structure.from_summary(doc))
    _check_rendering(structure.parse(raw))


if __name__ == "__main__":
    main(one_input)
