"""Fuzz harness: the address-book importer's CSV reader
(``postvault.contacts.csvfile.parse``).

Promise: for any file, ``parse`` either refuses the whole file with
``InvalidInput`` (not UTF-8, UTF-16, empty, no usable header) or returns
the rows it takes and a reason for each row it refuses; it raises nothing
else. What it takes must be safe to put in address books, mail headers and
web pages:

- every address passed ``check_address`` (re-checking it gives itself),
  is ASCII, and has no CR, LF or NUL;
- names, practice names and extra columns hold no CR, LF or NUL; names and
  practice names are printable, at most ``MAX_TEXT`` characters, with
  white space collapsed;
- row numbers are spreadsheet rows (the header is 1): every good or refused
  row is at least 2, each appears once, and ``same_as`` points at an
  earlier good row with the same address;
- ``contacts`` holds each address once (case-insensitively).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fuzz._common import check, fuzzing, instrumented, main

with instrumented(fuzzing(__name__), ["postvault.contacts.csvfile"]):
    from postvault.contacts import csvfile
    from postvault.errors import InvalidInput


def _clean(value: str, what: str) -> None:
    check(not any(c in value for c in "\r\n\0"), f"{what} holds CR, LF or NUL")


def one_input(data: bytes) -> None:
    """Parse one file; check what was taken and refused (module docstring)."""
    try:
        parsed = csvfile.parse(data)
    except InvalidInput as exc:
        check(str(exc), "InvalidInput without a reason")
        return
    check(parsed.delimiter in (",", ";"), "an unexpected delimiter")
    rows: set[int] = set()
    good: dict[int, str] = {}
    for item in parsed.rows:
        contact = item.contact
        check(item.row >= 2 and item.row not in rows, f"row number {item.row} out of place")
        rows.add(item.row)
        check(contact.email.isascii(), "a non-ASCII address was taken")
        _clean(contact.email, "an address")
        check(csvfile.check_address(contact.email) == contact.email, "a taken address does not re-check as itself")
        for label, value in (("name", contact.name), ("practice", contact.practice)):
            _clean(value, label)
            check(len(value) <= csvfile.MAX_TEXT, f"{label} longer than MAX_TEXT")
            check(value.isprintable() and value == " ".join(value.split()), f"{label} not printable and collapsed")
        for key, value in contact.extra.items():
            _clean(key, "an extra column name")
            _clean(value, "an extra value")
        if item.same_as is not None:
            check(good.get(item.same_as, "").lower() == contact.email.lower(),
                  "same_as names no earlier row with this address")
        else:
            good[item.row] = contact.email
    for refusal in parsed.refused:
        check(refusal.row >= 2 and refusal.row not in rows, f"refused row number {refusal.row} out of place")
        rows.add(refusal.row)
        check(refusal.reason, "a refusal without a reason")
    emails = [c.email.lower() for c in parsed.contacts]
    check(len(emails) == len(set(emails)), "an address is taken twice")


if __name__ == "__main__":
    main(one_input)
