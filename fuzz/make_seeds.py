"""Write the seed corpus (``fuzz/corpus/<harness>/``) and the mutation
dictionaries (``fuzz/dicts/<harness>.dict``), reproducibly.

Run ``python3 fuzz/make_seeds.py`` after changing a seed here; the files
are committed, and ``tests/test_fuzz.py`` checks that they match this
script's output. Seeds are small inputs that reach each parser's
interesting states (a fuzzer mutates them); each file's name says what it
is. Inputs a campaign found crashing go to ``fuzz/corpus/<harness>/``
under a ``crash-`` name (see ``regressions`` below), so the replay test
keeps them fixed.
"""

from __future__ import annotations

import base64
import io
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"
DICTS = ROOT / "fuzz" / "dicts"

CRLF = b"\r\n"


def _lines(*lines: bytes) -> bytes:
    return CRLF.join(lines) + CRLF


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            z.writestr(info, data)
    return out.getvalue()


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


HEAD = _lines(b"From: Dr Ann <ann@clinic.test>", b"To: front@dental.test, \"Bob, B\" <bob@dental.test>",
              b"Subject: =?utf-8?q?Befund_f=C3=BCr?= x", b"Date: Mon, 1 Jan 2024 10:00:00 +0000",
              b"Message-ID: <1@clinic.test>", b"MIME-Version: 1.0")


def _mixed(*parts: bytes, boundary: bytes = b"b1") -> bytes:
    body = b"".join(b"--" + boundary + CRLF + p + CRLF for p in parts) + b"--" + boundary + b"--" + CRLF
    return HEAD + _lines(b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"", b"") + body


def _attachment(headers: list[bytes], body: bytes) -> bytes:
    return _lines(*headers, b"") + body


PDF = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
TEXT = _lines(b"Content-Type: text/plain; charset=utf-8", b"", b"Hello,", b"the results.")


def mime_seeds() -> dict[str, bytes]:
    pdf = _attachment([b"Content-Type: application/pdf; name=\"scan.pdf\"",
                       b"Content-Disposition: attachment; filename=\"scan.pdf\"",
                       b"Content-Transfer-Encoding: base64"], _b64(PDF))
    msgs = {
        "plain": HEAD + _lines(b"Content-Type: text/plain", b"", b"Hello", b".."),
        "no-header": b"just a body\r\n",
        "lf-only": HEAD.replace(CRLF, b"\n") + b"\nbody\n",
        "pdf": _mixed(TEXT, pdf),
        "exe-name": _mixed(TEXT, _attachment([b"Content-Type: application/octet-stream",
                                              b"Content-Disposition: attachment; filename=\"a.pdf.exe. \""], b"x")),
        "rfc2231": _mixed(_attachment([b"Content-Type: application/pdf",
                                       b"Content-Disposition: attachment; filename*=utf-8''r%C3%B6ntgen.pdf"], PDF)),
        "rfc2231-sections": _mixed(_attachment(
            [b"Content-Type: application/pdf; name*0*=iso-8859-1'de'a%FC; name*1=\".p\"; name*2*=df",
             b"Content-Disposition: attachment"], PDF)),
        "rfc2231-bogus-charset": _mixed(_attachment(
            [b"Content-Type: application/pdf", b"Content-Disposition: attachment; filename*=x-bogus''a.pdf"], PDF)),
        "encoded-word-name": _mixed(_attachment(
            [b"Content-Type: application/pdf; name=\"=?utf-8?b?c2Nhbi5leGU=?=\""], PDF)),
        "bidi-name": _mixed(_attachment(
            [b"Content-Disposition: attachment; filename*=utf-8''x%E2%80%AEfdp.exe"], PDF)),
        "qp": _mixed(_attachment([b"Content-Type: application/pdf; name=a.pdf",
                                  b"Content-Transfer-Encoding: quoted-printable"], b"%PDF-1.4=0D=0A=\r\nx=3D")),
        "mz": _mixed(_attachment([b"Content-Type: image/png; name=a.png", b"Content-Transfer-Encoding: base64"],
                                 _b64(b"MZ\x90\x00" + b"\x00" * 60))),
        "zip": _mixed(_attachment([b"Content-Type: application/zip; name=a.zip",
                                   b"Content-Transfer-Encoding: base64"],
                                  _b64(_zip({"docs/a.pdf": PDF, "b.exe": b"MZ"})))),
        "nested": HEAD + _lines(b"Content-Type: multipart/mixed; boundary=o", b"", b"--o",
                                b"Content-Type: multipart/alternative; boundary=i", b"", b"--i", b"Content-Type: text/plain",
                                b"", b"a", b"--i", b"Content-Type: text/html", b"", b"<b>a</b>", b"--i--", b"--o",
                                b"Content-Type: message/rfc822", b"", b"From: x@y.test", b"Subject: inner", b"",
                                b"inner body", b"--o--"),
        "digest": HEAD + _lines(b"Content-Type: multipart/digest; boundary=d", b"", b"--d", b"",
                                b"From: a@b.test", b"", b"one", b"--d--"),
        "no-boundary": HEAD + _lines(b"Content-Type: multipart/mixed", b"", b"--x", b"text", b"--x--"),
        "missing-close": HEAD + _lines(b"Content-Type: multipart/mixed; boundary=z", b"", b"pre", b"--z",
                                       b"Content-Type: text/plain", b"", b"unterminated"),
        "encoded-multipart": HEAD + _lines(b"Content-Type: multipart/mixed; boundary=z",
                                           b"Content-Transfer-Encoding: base64", b"", b"--z", b"", b"x", b"--z--"),
        "addresses": _lines(b"From: \"Q \\\" x\" (c) <a@b.test>, undisclosed-recipients:;",
                            b"To: grp: a@b.test, (comment) c@d.test;, @route,@r2:e@f.test",
                            b"Cc: <@x:y@z>, noat, \"\" <@>", b"Reply-To: =?utf-8?q?x?= <r@s.test>",
                            b"Subject: folded", b" subject line", b"", b"b"),
        "params": HEAD + _lines(b"Content-Type: text/plain; charset=\"utf-8\"; format=flowed (c);",
                                b" name*0=\"a\"; name*1*=%41; x=\"unterminated",
                                b"Content-Disposition: inline; filename=a.txt; size=3",
                                b"Content-Language: en, de", b"Content-Location: http://x.test/a",
                                b"Content-MD5: Q2hlY2s=", b"Content-ID: <c@x>", b"Content-Description: d", b"",
                                b"body"),
        "rfc822-b64": HEAD + _lines(b"Content-Type: multipart/mixed; boundary=z", b"", b"--z",
                                    b"Content-Type: message/rfc822", b"Content-Transfer-Encoding: base64", b"",
                                    b"RnJvbTogYQ0KDQpi", b"--z--"),
        "8bit": HEAD + _lines(b"Content-Type: text/plain; charset=utf-8", b"Content-Transfer-Encoding: 8bit",
                              b"", "Grüße ✓".encode()),
    }
    # Byte 0 picks the policy variant (fuzz/mime.py): 0 the default, 1 tiny
    # limits, 2 no sniffing or archives, 3 tight archive limits; 4 adds an
    # office exception.
    out: dict[str, bytes] = {}
    for name, msg in msgs.items():
        out[f"{name}"] = b"\x00" + msg
    out["pdf-tiny-limits"] = b"\x01" + msgs["pdf"]
    out["zip-tight-archives"] = b"\x03" + msgs["zip"]
    out["exe-allowed"] = b"\x04" + msgs["exe-name"]
    return out


def imap_seeds() -> dict[str, bytes]:
    unauth, auth, select, twisted = b"\x00", b"\x01", b"\x02", b"\x03"
    return {
        "unauth-basics": unauth + _lines(b"a1 CAPABILITY", b"a2 NOOP", b"a3 ID (\"name\" \"Thunderbird\" \"v\" NIL)",
                                         b"a4 ENABLE UTF8=ACCEPT", b"a5 STARTTLS", b"a6 LOGOUT"),
        "login-literal": unauth + b"a1 LOGIN {8}\r\nann@x.te \"pass\\\"word\"\r\n",
        "login-literal-plus": unauth + b"a1 LOGIN {3+}\r\nabc {2+}\r\npw\r\n",
        "authenticate": unauth + _lines(b"a1 AUTHENTICATE PLAIN AGFubgBwdw==", b"a2 AUTHENTICATE LOGIN"),
        "unknown": unauth + _lines(b"a1 FETCH 1 FLAGS", b"* BAD", b"", b"a2 UID FETCH 1 FLAGS", b"a3"),
        "auth-mailboxes": auth + _lines(
            b"a1 SELECT INBOX", b"a2 EXAMINE \"Sent Items\"", b"a3 CREATE &AMQ-rzte", b"a4 DELETE {5}", b"Trash",
            b"a5 RENAME a b", b"a6 LIST \"\" *", b"a7 LSUB \"\" %/x", b"a8 STATUS INBOX (MESSAGES UIDNEXT UNSEEN)",
            b"a9 SUBSCRIBE x", b"b1 NAMESPACE", b"b2 IDLE", b"DONE"),
        "append": auth + b"a1 APPEND Drafts (\\Draft \\Seen) \" 1-Feb-2024 10:00:00 +0100\" {9}\r\n"
                         b"From: x\r\n\r\n" + b"a2 APPEND INBOX {3+}\r\nabc\r\n",
        "append-toobig": auth + b"a1 APPEND INBOX {99999}\r\na2 APPEND INBOX {99999+}\r\n" + b"x" * 40 + b"\r\n",
        "fetch": select + _lines(
            b"a1 FETCH 1:* (FLAGS UID INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE)",
            b"a2 UID FETCH 1,3:5,* (BODY.PEEK[HEADER.FIELDS (From Subject \"X-A\")] BODY[1.2.MIME]<0.100>)",
            b"a3 FETCH 2 BODY[HEADER.FIELDS.NOT (Received)]", b"a4 FETCH 4:2 (BODY[TEXT] RFC822.HEADER)",
            b"a5 FETCH * ALL", b"a6 FETCH 1 FAST", b"a7 FETCH 1 FULL", b"a8 FETCH 1 BODY[]<5.0>",
            b"a9 FETCH 0 FLAGS", b"b1 FETCH 1 BODY[1.MIME.X]"),
        "search": select + _lines(
            b"a1 SEARCH CHARSET UTF-8 OR FROM ann (SUBJECT {3}", b"x y) NOT SEEN",
            b"a2 UID SEARCH 1:5 UID 2,* LARGER 100 SMALLER 99999 SINCE 1-Feb-2024 BEFORE \"2-Mar-2024\"",
            b"a3 SEARCH HEADER Message-ID <x@y> KEYWORD $Forwarded UNKEYWORD x TEXT \"a\\\\b\"",
            b"a4 SEARCH ANSWERED DELETED DRAFT FLAGGED NEW OLD RECENT UNSEEN UNDRAFT ALL",
            b"a5 SEARCH ON 31-Feb-2024 SENTON 1-Jan-2024 SENTBEFORE 1-Jan-2024 SENTSINCE 1-Jan-2024"),
        "store-copy": select + _lines(
            b"a1 STORE 1:3 +FLAGS.SILENT (\\Seen \\Deleted $Label1)", b"a2 UID STORE 5 FLAGS \\Flagged",
            b"a3 COPY 1 Trash", b"a4 UID MOVE 1:* \"Deleted Items\"", b"a5 EXPUNGE", b"a6 UID EXPUNGE 4:7",
            b"a7 CLOSE", b"a8 UNSELECT", b"a9 CHECK"),
        "long-line": select + b"a1 FETCH " + b"1," * 200 + b"2 FLAGS\r\na2 NOOP\r\n",
        "big-literal": auth + b"a1 LOGIN {600}\r\na2 LOGIN {600+}\r\n" + b"z" * 20 + b"\r\n",
        "twisted-parens": twisted + b"(\"a\" {3}\r\nabc NIL (1 2 (\"x\\\"y\")) [BODY] \"\")",
        "twisted-idlist": twisted + b"1:*,3,5:7,*:4",
    }


def smtp_data_seeds() -> dict[str, bytes]:
    # Bytes 0-3 (fuzz/smtp_data.py): size limit index, line limit index,
    # chunking seed, largest chunk.
    def seed(limit: int, line: int, chunk_seed: int, largest: int, stream: bytes) -> bytes:
        return bytes([limit, line, chunk_seed, largest]) + stream

    body = b"From: a@b.test\r\nSubject: x\r\n\r\nline one\r\n..stuffed\r\n.\r\n"
    return {
        "simple": seed(0, 7, 1, 255, body),
        "simple-bytewise": seed(0, 7, 2, 1, body),
        "pipelined": seed(0, 7, 3, 7, body + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"),
        "empty": seed(0, 7, 4, 2, b".\r\n"),
        "only-crlf": seed(0, 7, 5, 3, b"\r\n.\r\n"),
        "stuffed-first": seed(0, 7, 6, 2, b"..x\r\n.\r\n"),
        **{f"smuggle-{i}": seed(0, 7, 7 + i, 4, b"a\r\n" + fake + b"MAIL FROM:<x@y>\r\n.\r\n")
           for i, fake in enumerate([b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\r"])},
        "bare-cr": seed(0, 7, 20, 5, b"a\rb\r\n.\r\n"),
        "bare-lf": seed(0, 7, 21, 5, b"a\nb\r\n.\r\n"),
        "long-line": seed(0, 3, 22, 6, b"abcdefghij\r\nab\r\n.\r\n"),
        "at-limit": seed(6, 7, 23, 12, b"abcdef\r\n.\r\n"),
        "over-limit": seed(5, 7, 24, 9, b"abcdef\r\n.\r\n"),
        "never-ends": seed(4, 7, 25, 16, b"x" * 90 + b"\r\n" + b"y" * 40),
        "dots-at-limit": seed(6, 7, 26, 3, b"..\r\n..\r\n..\r\n.\r\n"),
    }


def contacts_seeds() -> dict[str, bytes]:
    return {
        "basic": _lines(b"Name,Practice,Email,Phone", b"Dr Ann Lee,Clinic One,ann@clinic.test,555-1",
                        b"\"Dr Bob, Jr\",\"Dental, Inc\",bob@dental.test,", b"Dr Ann Lee,Clinic One,ANN@clinic.test,555-1"),
        "semicolon-bom": b"\xef\xbb\xbf" + _lines(b"Full Name;Office;E-mail Address", b"Dr X;Praxis;x@praxis.test",
                                                 "Dr Ü;Zahnarzt Müller;u@müller.test".encode()),
        "refusals": _lines(b"name,practice,email,extra", b"A,B,not-an-address,", b"A,B,,", b"A,B,a@b.test,x,y",
                           b"\"A\nB\",C,d@e.test,", b"A,B\"C,d@e.test", b"A,B,a@b.test,other", b"", b",,,"),
        "synonyms": _lines(b"Provider Name , Organisation , Secure Mail", b"A,B,c@d.test"),
        "missing-column": _lines(b"name,email", b"A,a@b.test"),
        "utf16": b"\xff\xfen\x00a\x00",
        "latin1": b"name,practice,email\r\nJ\xfcrgen,P,j@p.test\r\n",
        "empty": b"",
        "lf-only": b"name,practice,email\nA,B,a@b.test\n",
    }


def policy_seeds() -> dict[str, bytes]:
    default = (ROOT / "postvault" / "policy" / "default.toml").read_bytes()
    return {
        "default": default,
        "empty": b"",
        "small": b"[attachments]\nmax_size = \"1 MiB\"\nblocked_extensions = [\"exe\"]\n",
        "errors": b"[attachments]\nmax_size = \"15 MB\"\nmax_sise = 3\nscan_archives = \"yes\"\n[nope]\nx = 1\n",
        "dotted": b"attachments.max_size = 1024\n\"attachments\".\"max_parts\" = 5\n[roles.member]\n",
        "inline": b"roles = { member = { allow_extensions = [\"dcm\"] } }\n",
        "syntax": b"[attachments\nmax_size = \n",
        "arrays": b"[[attachments]]\nmax_size = 1\n[folders]\nx = [[1, 2], [\"a\"]]\n",
    }


def regressions() -> dict[str, dict[str, bytes]]:
    """Inputs that crashed a harness once (docs/hardening.md section 1)."""
    return {
        "mime": {
            # RFC 2231 charset holding a byte that is not ASCII: codecs.lookup
            # raised UnicodeEncodeError out of check_attachments.
            "crash-rfc2231-charset-8bit": b"\x00" + _lines(b"Content-Type: application/pdf",
                                                           b"Content-Disposition: attachment; filename*=\xff''a.pdf",
                                                           b"", b"abc"),
            # A NUL in a charset name: codecs.lookup raised ValueError.
            "crash-encoded-word-charset-nul": b"\x00" + _lines(
                b"Content-Type: application/pdf", b"Content-Disposition: attachment; filename==?utf-8\x00?q?a?=.pdf",
                b"", b"abc"),
            # A MIME header value with an 8-bit byte: the email package's
            # compat32 policy gives a Header object, and structure.parse
            # (FETCH of a message stored without a summary) called .strip on it.
            # Not a product bug: a host ending in a backslash is rendered
            # correctly ("dental.test\\\\"), but Twisted's parseNestedParens,
            # the harness's first client-side oracle, refuses it; the
            # harness now reads IMAP values itself (fuzz/mime.py read_value).
            "crash-oracle-escaped-backslash": b"\x00" + _lines(b"From: a@b.test", b"To: c@dental.test\\", b"", b"x"),
            # "name*1" and "name*" together: the email package's
            # decode_params raised TypeError (sorting None with 1) from
            # structure.parse.
            "crash-rfc2231-section-and-extended": b"\x00" + _lines(
                b"Content-Type: text/plain; name*1=\"a\"; name*=%41", b"", b"body"),
            # An 8-bit byte inside an encoded word's text: _decode_2047
            # encoded the text as ASCII and raised UnicodeEncodeError.
            "crash-encoded-word-8bit-text": b"\x00" + _lines(
                b"Content-Type: application/pdf", b"Content-Disposition: attachment; filename==?utf-8?q?a\x8a?=.pdf",
                b"", b"abc"),
            "crash-8bit-transfer-encoding": b"\x00" + _lines(
                b"Content-Type: multipart/mixed; boundary=z", b"", b"--z", b"Content-Transfer-Encoding:\x93 x",
                b"Content-ID: <\xff@x>", b"", b"body", b"--z--"),
        },
        "smtp_data": {
            # "." then CR LF in a second read: the search for the end started
            # at -1 (from the end) and missed it for good.
            "crash-dot-then-crlf": bytes([0, 7, 4, 2]) + b".\r\n",
            # A message of exactly the limit, read so that a chunk ends in
            # "\r\n.\r": the streaming size check counted the CR of the end.
            "crash-limit-straddling-end": bytes([6, 7, 5, 12]) + b"abcdef\r\n.\r\n",
            # Over the limit and with a bare LF, read at once: refused for the
            # bare LF, where the same bytes in several reads were too big.
            "crash-size-before-bare-lf": bytes([6, 7, 0, 255]) + b"ab\ncdefghij\r\n.\r\n",
        },
        "imap": {
            # A quoted header field name with a space came back unquoted in
            # the FETCH response name, as two names.
            "crash-section-field-with-space": b"\x02a1 FETCH 1 BODY[HEADER.FIELDS (\"A B\")]\r\n",
            # A refused literal echoed the raw first word as the tag: 8-bit
            # bytes, or a bare LF that forges a response line ("a\n2 BAD").
            "crash-literal-refusal-tag": b"\x01a1 LOGIN {600}\r\na\xe22 LOGIN {600+}\r\n" + b"z" * 16
                                         + b"\r\na\n3 LOGIN {600}\r\n",
            # The same for a line too long: "a\n1 OK ..." echoed as its tag.
            "crash-long-line-tag": b"\x02a\n1 OK x" + b"y" * 300 + b"\r\na2 NOOP\r\n",
        },
        "policy": {
            # Deeply nested arrays: tomllib raised RecursionError.
            "crash-nested-arrays": b"x = " + b"[" * 2000,
        },
    }


def dictionaries() -> dict[str, list[bytes]]:
    return {
        "mime": [b"\r\n", b"\r\n\r\n", b"--", b"Content-Type:", b"Content-Disposition:",
                 b"Content-Transfer-Encoding:", b"multipart/mixed", b"multipart/digest", b"message/rfc822",
                 b"boundary=", b"filename=", b"filename*=", b"filename*0*=", b"name*1=", b"name=", b"attachment",
                 b"base64", b"quoted-printable", b"=?utf-8?b?", b"=?utf-8?q?", b"?=", b"utf-8''", b"%2E",
                 b".exe", b".zip", b"MZ", b"PK\x03\x04", b"\x7fELF", b"From:", b"To:", b"Subject:", b"Cc:",
                 b"Message-ID:", b"In-Reply-To:", b"<", b">", b"@", b";", b"\"", b"(", b")", b":;"],
        "imap": [b"\r\n", b" ", b"{", b"}\r\n", b"+}\r\n", b"(", b")", b"[", b"]", b"<", b">", b"\"", b"\\", b"*",
                 b"NIL", b"UID", b"FETCH", b"SEARCH", b"STORE", b"COPY", b"MOVE", b"APPEND", b"SELECT", b"LOGIN",
                 b"AUTHENTICATE", b"STATUS", b"LIST", b"ENABLE", b"ID", b"IDLE", b"DONE", b"BODY", b"BODY.PEEK",
                 b"HEADER.FIELDS", b"HEADER.FIELDS.NOT", b"MIME", b"TEXT", b"CHARSET", b"OR", b"NOT", b"FLAGS",
                 b"+FLAGS.SILENT", b"\\Seen", b"1-Feb-2024", b"\"01-Feb-2024 10:00:00 +0000\"", b"1:*",
                 b"4294967295", b"&AMQ-"],
        "smtp_data": [b"\r\n", b"\r\n.\r\n", b"\r\n..", b"\n.\n", b"\r.\r", b".\r\n", b"\r", b"\n", b"."],
        "contacts_csv": [b",", b";", b"\"", b"\r\n", b"\xef\xbb\xbf", b"name", b"practice", b"email",
                         b"E-mail Address", b"@", b"@example.test", b"xn--", b".test"],
        "policy": [b"[attachments]", b"[roles.member]", b"[roles.colleague]", b"[folders]", b"[auth]",
                   b"[sessions]", b"[passwords]", b"=", b"\"", b"'", b"[[", b"]]", b"{", b"}", b"\"15 MiB\"", b"true",
                   b"max_size", b"blocked_extensions", b"allow_extensions", b"\n", b"."],
    }


def _dict_line(token: bytes) -> str:
    out = "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02X}" for b in token)
    return f'"{out}"'


def expected_files() -> dict[Path, bytes]:
    """Every file this script writes, with its content."""
    files: dict[Path, bytes] = {}
    seeds = {"mime": mime_seeds(), "imap": imap_seeds(), "smtp_data": smtp_data_seeds(),
             "contacts_csv": contacts_seeds(), "policy": policy_seeds()}
    for harness, found in regressions().items():
        seeds[harness].update(found)
    for harness, named in seeds.items():
        for name, data in named.items():
            files[CORPUS / harness / name] = data
    for harness, tokens in dictionaries().items():
        files[DICTS / f"{harness}.dict"] = ("\n".join(_dict_line(t) for t in tokens) + "\n").encode()
    return files


def main() -> int:
    files = expected_files()
    for folder in {p.parent for p in files}:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.is_file() and old not in files:
                old.unlink()
    for path, data in files.items():
        path.write_bytes(data)
    print(f"wrote {len(files)} files under {CORPUS.relative_to(ROOT)} and {DICTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
