"""mime/headerobjects.py: header objects shared between messages are the
ones the default policy makes, for the fields and values it keeps; values
that may hold a file name are never kept, and the cache stays bounded."""

from __future__ import annotations

from email.headerregistry import HeaderRegistry

from postvault.mime import headerobjects
from postvault.policy.attachments import check_attachments
from postvault.policy.schema import AttachmentPolicy


def _same(a: object, b: object) -> bool:
    keys = ("content_type", "params", "cte", "addresses", "defects")
    return (type(a).__name__ == type(b).__name__ and str(a) == str(b)
            and all(str(getattr(a, k, None)) == str(getattr(b, k, None)) for k in keys))


def test_kept_objects_are_the_default_policys() -> None:
    fresh = HeaderRegistry()
    values = [("Content-Type", 'text/plain; charset="utf-8"'), ("content-type", "multipart/mixed; boundary=x"),
              ("Content-Type", ";;;=\""), ("Content-Transfer-Encoding", "base64"),
              ("From", "Smile Dental <office@dental.test>"), ("From", "a@b.test, c@d.test"), ("Sender", "<>"),
              ("FROM", "=?utf-8?q?Smile_D=C3=A9ntal?= <office@dental.test>")]
    for name, value in values:
        first = headerobjects.header(name, value)
        assert headerobjects.header(name, value) is first  # kept
        assert _same(first, fresh(name, value)), (name, value)
        assert (name, value) in headerobjects.cached()


def test_file_names_and_other_fields_are_never_kept() -> None:
    for name, value in [("Content-Type", 'application/pdf; name="JaneRoe-xray.pdf"'),
                        ("Content-Type", "application/pdf; NAME*=utf-8''JaneRoe.pdf"),
                        ("Content-Disposition", "inline"), ("Subject", "about Jane Roe")]:
        first = headerobjects.header(name, value)
        assert headerobjects.header(name, value) is not first
        assert _same(first, HeaderRegistry()(name, value))
        assert (name, value) not in headerobjects.cached()
    # Through the attachment check, on a message with a named attachment.
    raw = (b"From: office@dental.test\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: application/pdf; name="PatientJaneRoe.pdf"\r\n'
           b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n")
    assert check_attachments(raw, AttachmentPolicy()).allowed
    assert not any("jane" in value.lower() for _name, value in headerobjects.cached())


def test_the_cache_is_bounded_oldest_out_first() -> None:
    for i in range(headerobjects.MAX_ENTRIES + 50):
        headerobjects.header("Content-Type", f"text/plain; charset=x-{i}")
    held = headerobjects.cached()
    assert len(held) == headerobjects.MAX_ENTRIES
    assert held[-1] == ("Content-Type", f"text/plain; charset=x-{headerobjects.MAX_ENTRIES + 49}")
    assert ("Content-Type", "text/plain; charset=x-0") not in held
