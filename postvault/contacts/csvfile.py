"""Reading a colleague export from a Practice Management System (PMS):
a CSV file with at least name, practice and email columns.

What real exports look like, and what we do about it:
- UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8" writes one);
  anything else is refused as a whole with a hint, never guessed.
- Comma or semicolon between fields (European Excel uses ";"): the header
  line decides, by which delimiter yields the required columns.
- Quoted fields (RFC 4180), so commas inside a practice name work. A line
  break inside a quoted field is refused for that row, as are CR, LF and
  NUL anywhere: such values would end up in email headers and pages.
- Header names in any case and spacing, with common synonyms ("E-mail
  Address", "Office", "Full Name"); extra columns (phone, specialty,
  address) are kept as they are, to show in the address book.
- Addresses are checked with ``email-validator`` (syntax only: no DNS
  during an import) and stored in ASCII form (IDNA domains), since that is
  what SMTP carries.

Rows are numbered as a spreadsheet shows them: the header is row 1.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from dataclasses import dataclass, field

from email_validator import EmailNotValidError, validate_email

from ..errors import InvalidInput
from ..store.contacts import ContactRow

MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_TEXT = 200  # as account practice names

# Normalized header (lower case, letters and digits only) -> our column.
SYNONYMS: dict[str, str] = {}
for _column, _names in {
    "name": ["name", "fullname", "contact", "contactname", "colleague", "colleaguename", "doctor", "doctorname",
             "provider", "providername", "displayname", "referrer", "referringdoctor"],
    "practice": ["practice", "practicename", "office", "officename", "clinic", "clinicname", "organization",
                 "organisation", "organizationname", "company", "companyname"],
    "email": ["email", "emailaddress", "mail", "mailaddress", "emailadresse", "courriel", "securemail"],
}.items():
    for _name in _names:
        SYNONYMS[_name] = _column
REQUIRED = ("name", "practice", "email")


def normalize_header(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.casefold())


@dataclass(frozen=True)
class Refusal:
    row: int
    reason: str


@dataclass(frozen=True)
class GoodRow:
    row: int
    contact: ContactRow
    # An identical earlier row with the same address, if any.
    same_as: int | None = None


@dataclass
class ParsedFile:
    delimiter: str
    rows: list[GoodRow] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    @property
    def contacts(self) -> list[ContactRow]:
        """The rows to store: first occurrence of each address only."""
        return [r.contact for r in self.rows if r.same_as is None]


def decode(data: bytes) -> str:
    """The file as text: UTF-8, a leading BOM dropped; else InvalidInput."""
    if len(data) > MAX_FILE_BYTES:
        raise InvalidInput(f"the file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InvalidInput('the file is UTF-16 text; export it as "CSV UTF-8" instead')
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f'the file is not UTF-8 text (byte {exc.start + 1}); export it as "CSV UTF-8"'
        ) from None


def check_address(text: str) -> str:
    """A validated address in ASCII form; InvalidInput with the reason."""
    try:
        # test_environment: allow the reserved .test domain (RFC 6761) our
        # own setups use; it also means no DNS, which we want anyway.
        checked = validate_email(text, check_deliverability=False, allow_smtputf8=False, test_environment=True)
    except EmailNotValidError as exc:
        raise InvalidInput(f"invalid address {text!r}: {exc}") from None
    return checked.ascii_email or checked.normalized


def _columns(header: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for index, name in enumerate(header):
        column = SYNONYMS.get(normalize_header(name))
        if column is not None and column not in found:
            found[column] = index
    return found


def _pick_delimiter(text: str) -> str:
    first = next(iter(text.splitlines()), "")
    best, best_found = ",", -1
    for delimiter in (",", ";"):
        header = next(csv.reader([first], delimiter=delimiter), [])
        found = len(_columns(header))
        if found > best_found:
            best, best_found = delimiter, found
    return best


def _bad_char(value: str) -> str | None:
    if "\0" in value:
        return "a NUL character"
    if "\r" in value or "\n" in value:
        return "a line break"
    return None


def parse(data: bytes) -> ParsedFile:
    """Parse and check a PMS export; file-level problems raise InvalidInput,
    row-level ones become ``Refusal``s."""
    text = decode(data)
    delimiter = _pick_delimiter(text)
    # newline="" semantics: the csv module itself sees the line breaks, so
    # a quoted field that holds one stays one field (and is refused below).
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidInput("the file is empty; expected a header row with name, practice and email") from None
    except csv.Error as exc:
        raise InvalidInput(f"row 1 (header): {exc}") from None
    columns = _columns(header)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise InvalidInput(
            f"the header row lacks the column(s) {', '.join(missing)}; it has: "
            + ", ".join(repr(h.strip()) for h in header if h.strip())
        )
    extras = {
        i: h.strip() for i, h in enumerate(header)
        if i not in columns.values() and h.strip() and not _bad_char(h)
    }
    out = ParsedFile(delimiter)
    seen: dict[str, GoodRow] = {}
    row = 1
    while True:
        row += 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # strict=True: a stray quote. The reader can go on with the
            # next line, so one broken row does not stop the import.
            out.refused.append(Refusal(row, f"not valid CSV: {exc}"))
            continue
        if not any(f.strip() for f in fields):
            continue  # blank line
        result = _check_row(row, fields, header, columns, extras)
        if isinstance(result, Refusal):
            out.refused.append(result)
            continue
        key = result.contact.email.lower()
        first = seen.get(key)
        if first is None:
            seen[key] = result
            out.rows.append(result)
        elif _details(first.contact) == _details(result.contact):
            out.rows.append(GoodRow(row, result.contact, same_as=first.row))
        else:
            out.refused.append(Refusal(row, f"same address as row {first.row} with other details; keep one of them"))
    return out


def _details(contact: ContactRow) -> tuple[str, str, str, dict[str, str]]:
    # Addresses match case-insensitively everywhere in Postvault.
    return contact.email.lower(), contact.name, contact.practice, contact.extra


def _check_row(
    row: int, fields: list[str], header: list[str], columns: dict[str, int], extras: dict[int, str]
) -> GoodRow | Refusal:
    if len(fields) > len(header):
        return Refusal(row, f"{len(fields)} fields but the header has {len(header)} (an unquoted "
                            f"{'semicolon' if ';' in ''.join(fields) else 'comma'} inside a value?)")
    fields = fields + [""] * (len(header) - len(fields))
    for index, value in enumerate(fields):
        bad = _bad_char(value)
        if bad:
            column = header[index].strip() or f"column {index + 1}"
            return Refusal(row, f"{column!r} contains {bad}")
    email = fields[columns["email"]].strip()
    if not email:
        return Refusal(row, "no email address")
    try:
        email = check_address(email)
    except InvalidInput as exc:
        return Refusal(row, str(exc))
    name = " ".join(fields[columns["name"]].split())
    practice = " ".join(fields[columns["practice"]].split())
    for label, value in (("name", name), ("practice", practice)):
        if len(value) > MAX_TEXT:
            return Refusal(row, f"{label} is longer than {MAX_TEXT} characters")
        if not value.isprintable():
            return Refusal(row, f"{label} contains control characters")
    extra = {extras[i]: fields[i].strip() for i in extras if fields[i].strip()}
    return GoodRow(row, ContactRow(email, name, practice, extra))
