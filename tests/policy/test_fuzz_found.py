"""Crashes the fuzz harnesses found in the attachment policy and the policy
and config loaders (docs/hardening.md section 1), each with the input that
crashed; the same inputs replay in ``fuzz/corpus/`` (tests/test_fuzz.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from postvault.conf.load import load_config_text
from postvault.errors import ConfigError
from postvault.policy.attachments import _decode_bytes, check_attachments
from postvault.policy.load import PolicyInvalid, check_policy_text, load_policy_text
from postvault.policy.schema import AttachmentPolicy
from tests.policy.test_policy_cli import home_with, run

P = AttachmentPolicy()


def part(disposition: bytes) -> bytes:
    return b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment; " + disposition + b"\r\n\r\nabc\r\n"


# --- RFC 2231 and RFC 2047 charsets that codecs.lookup cannot even look up ---------


@pytest.mark.parametrize("charset", ["utf-8\x00", "\udcff", "x\x00y", "bogus", ""])
def test_decode_bytes_falls_back_to_latin1(charset: str) -> None:
    assert _decode_bytes(b"a\xe9.pdf", charset) == "a\xe9.pdf"


@pytest.mark.parametrize("disposition, rule", [
    # fuzz/corpus/mime/crash-rfc2231-charset-8bit: an 8-bit byte in the
    # charset reached codecs.lookup as a surrogate (UnicodeEncodeError).
    (b"filename*=\xff''a.pdf", None),
    (b"filename*=\xff''a.exe", "attachment.extension"),
    # An RFC 2231 continuation whose charset holds a NUL (ValueError).
    (b"filename*0*=x\x00y''a; filename*1=b.pdf", None),
    (b"filename*0*=x\x00y''a; filename*1=b.exe", "attachment.extension"),
    # fuzz/corpus/mime/crash-encoded-word-charset-nul: the same in an
    # RFC 2047 encoded word inside the name (whose NUL refuses the name).
    (b"filename==?utf-8\x00?q?a?=.pdf", "attachment.name_nul"),
    (b"filename==?\xff?q?a?=.pdf", None),
    (b"filename==?\xff?q?a?=.exe", "attachment.extension"),
    # fuzz/corpus/mime/crash-encoded-word-8bit-text: an 8-bit byte in the
    # encoded text itself (UnicodeEncodeError encoding it as ASCII).
    (b"filename==?utf-8?q?a\x8a?=.pdf", None),
    (b"filename==?utf-8?q?a\x8a?=.exe", "attachment.extension"),
    (b"filename=\"=?utf-8?b?YS5l\xc3\xa9eGU=?=\"", "attachment.extension"),
])
def test_unusable_charset_or_text_in_a_file_name_does_not_crash(disposition: bytes, rule: str | None) -> None:
    decision = check_attachments(part(disposition), P)
    assert decision.rule == rule if rule else decision.allowed, decision


# --- nesting deeper than tomllib's recursion ----------------------------------------

# fuzz/corpus/policy/crash-nested-arrays: tomllib raised RecursionError.
NESTED = ["x = " + "[" * 2000, "x = " + "{a=" * 2000, "[attachments]\nmax_size = " + "[" * 2000 + "]" * 2000]
IDS = ["arrays", "inline-tables", "a-value"]


@pytest.mark.parametrize("text", NESTED, ids=IDS)
def test_deeply_nested_policy_is_a_problem_not_a_crash(text: str) -> None:
    problems = check_policy_text(text, "policy.toml")
    assert problems == ["policy.toml:1: expected valid TOML, got arrays or tables nested too deeply"]
    with pytest.raises(PolicyInvalid):
        load_policy_text(text, "policy.toml")


def test_policy_check_command_reports_deep_nesting(tmp_path: Path) -> None:
    home = home_with(tmp_path, NESTED[0])
    proc = run("policy", "check", "--home", str(home))
    assert proc.returncode != 0
    assert "nested too deeply" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("text", NESTED, ids=IDS)
def test_deeply_nested_config_is_a_config_error(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config_text(text, home=tmp_path, source="postvault.toml", environ={})
