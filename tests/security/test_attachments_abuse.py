"""Dangerous attachments that hide what they are, sent end to end through
the submission service (the policy's unit tests are tests/policy/; here
each trick meets the real server, and the refusal is audited by rule id).

Sources: MITRE ATT&CK T1036.002 (Right-to-Left Override), T1036.007
(Double File Extension), T1036.008 (Masquerade File Type), T1027.013
(Encrypted/Encoded File); RFC 2047 §5 (encoded-words are not allowed in
MIME parameters, yet mail programs decode them in file names) and RFC 2231
§3-4 (continuations, charset and percent-encoding); Unicode TR #9 and
CVE-2021-42574 ("Trojan Source", bidirectional overrides); D. Fifield, "A
better zip bomb", USENIX WOOT 2019 (overlapping-entry zip bombs) and the
classic 42.zip; CVE-2019-9674 (Python zipfile bomb).
"""

from __future__ import annotations

import gzip

import pytest

from tests.policy.test_archives import encrypt_flag, nested_zip, overlapping_zip_bomb
from tests.policy.test_attachments import (
    PDF,
    attachment,
    b_word,
    make_zip,
    part,
    pct,
    q_word,
)
from tests.policy.test_sniff import elf_file, pe_file
from tests.smtpd.conftest import Server, World

from .mail import mail, submit


def named(header: str) -> bytes:
    """A PDF part whose name is given by ``header`` (the file is harmless)."""
    return part(header, PDF)


# (id, the part, the rule the server must refuse it by, source)
TRICKS = [
    # RFC 2047 §5: encoded-words in a parameter; decoded by Outlook and Thunderbird anyway.
    ("rfc2047-b-name", named(f'Content-Type: application/pdf; name="{b_word("scan.exe")}"'),
     "attachment.extension"),
    ("rfc2047-q-filename", named('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
                                 f'filename="{q_word("scan.exe")}"'), "attachment.extension"),
    ("rfc2047-split-words", named('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
                                  f'filename="{q_word("scan.")} {q_word("exe")}"'), "attachment.extension"),
    # RFC 2231 §4: charset'lang'percent-encoding; §3: continuations, even out of order.
    ("rfc2231-extended", named('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
                               f"filename=\"cover.pdf\"; filename*=utf-8''{pct('scan.exe')}"),
     "attachment.extension"),
    ("rfc2231-continuations", named('Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n'
                                    ' filename*1*=%2Eexe; filename*0*=utf-8\'\'scan'), "attachment.extension"),
    ("rfc2231-percent-nul", named('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
                                  "filename*=utf-8''x.pdf%00.exe"), "attachment.name_nul"),
    # T1036.002 / CVE-2021-42574: U+202E makes "xray\u202egnp.exe" display as "xrayexe.png".
    ("bidi-override-utf8", named('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
                                 'filename="xray\u202egnp.exe"'.encode()), "attachment.name_bidi"),
    ("bidi-override-rfc2231", named('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
                                    "filename*=utf-8''" + pct("report\u202efdp.scr")), "attachment.name_bidi"),
    ("bidi-isolate-rfc2047", named('Content-Type: application/pdf; name="' + b_word("x\u2067fdp.pdf") + '"'),
     "attachment.name_bidi"),
    # T1036.007: double extensions, and Windows dropping trailing dots and spaces.
    ("double-extension-outer", attachment(PDF, "referral.pdf.exe"), "attachment.extension"),
    ("double-extension-inner", attachment(PDF, "scan.exe.pdf"), "attachment.extension"),
    ("trailing-dots-spaces", attachment(PDF, "evil.exe. . "), "attachment.extension"),
    ("upper-case", attachment(PDF, "XRAY.SCR"), "attachment.extension"),
    # T1036.008: an executable renamed, its Content-Type lying too.
    ("pe-as-pdf", attachment(pe_file(), "referral.pdf", "application/pdf"), "attachment.executable"),
    ("elf-as-jpeg", attachment(elf_file(), "xray.jpg", "image/jpeg"), "attachment.executable"),
    ("pe-unnamed", part("Content-Type: image/png", pe_file()), "attachment.executable"),
    ("shebang-as-text", attachment(b"#!/bin/sh\r\nrm -rf ~\r\n", "notes.txt", "text/plain", "7bit"),
     "attachment.executable"),
    # Archives: a program inside, nesting past the depth limit, encryption, bombs.
    ("exe-in-zip", attachment(make_zip({"setup.exe": b"MZ" + bytes(200)}), "forms.zip"), "attachment.extension"),
    ("pe-renamed-in-zip", attachment(make_zip({"scan.pdf": pe_file()}), "scans.zip"), "attachment.executable"),
    ("nested-4-deep", attachment(nested_zip(4), "scans.zip"), "attachment.archive_depth"),
    ("program-3-deep", attachment(nested_zip(2, make_zip({"run.exe": b"x"})), "scans.zip"),
     "attachment.extension"),
    ("encrypted-zip", attachment(encrypt_flag(make_zip({"results.pdf": PDF})), "results.zip"),
     "attachment.archive_encrypted"),
    ("zip-bomb-overlapping", attachment(overlapping_zip_bomb(), "scans.zip"), "attachment.archive_bomb"),
    ("gzip-bomb-ratio", attachment(gzip.compress(bytes(8 << 20)), "log.txt.gz"), "attachment.archive_bomb"),
]


@pytest.mark.parametrize("trick, rule", [pytest.param(p, r, id=i) for i, p, r in TRICKS])
def test_hidden_attachment_is_refused(smtp: Server, world: World, trick: bytes, rule: str) -> None:
    code, lines, audited = submit(smtp, world, mail(trick))
    assert 550 <= code <= 554, lines
    assert audited == rule, (audited, lines)
    # The reply is one printable line: no hostile name can shape it (CWE-93).
    assert len(lines) == 1 and lines[0].isprintable() and lines[0].isascii(), lines


@pytest.mark.parametrize("honest", [
    pytest.param(attachment(PDF, "referral.pdf", "application/pdf"), id="pdf"),
    pytest.param(named('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
                       f"filename*=utf-8''{pct('Röntgen befund.pdf')}"), id="rfc2231-umlaut"),
    pytest.param(named(f'Content-Type: application/pdf; name="{b_word("Überweisung.pdf")}"'), id="rfc2047-umlaut"),
    pytest.param(attachment(PDF, "report.v2.pdf"), id="dotted-name"),
    pytest.param(attachment(make_zip({"a/results.pdf": PDF}), "results.zip"), id="zip-of-pdf"),
    pytest.param(attachment(nested_zip(3), "scans.zip"), id="nested-3-deep"),
])
def test_honest_twins_pass(smtp: Server, world: World, honest: bytes) -> None:
    # Every refusal above has a twin that real practices send; it is delivered.
    code, lines, _ = submit(smtp, world, mail(honest))
    assert code == 250, lines


def test_refusal_never_echoes_a_hostile_name(smtp: Server, world: World) -> None:
    # CWE-93 / CWE-117: a file name carrying CR LF and a fake reply.
    hostile = "x\r\n250 2.0.0 OK queued\r\n.exe"
    head = ('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
            f"filename*=utf-8''{pct(hostile)}")
    code, lines, rule = submit(smtp, world, mail(part(head, PDF)))
    assert code == 550 and rule == "attachment.extension", lines
    assert len(lines) == 1 and "\r" not in lines[0] and "\n" not in lines[0]
    assert lines[0].startswith("550 5.7.1 ") and "x??250" in lines[0]  # controls shown as "?"
