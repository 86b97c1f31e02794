"""PMS exports: encodings, delimiters, quoting, headers, bad rows."""

from __future__ import annotations

import codecs

import pytest

from postvault.contacts.csvfile import parse
from postvault.errors import InvalidInput


def test_comma_with_bom_and_quoted_commas() -> None:
    data = codecs.BOM_UTF8 + (
        'Name,Practice,Email,Phone\r\n'
        '"Dr. Ada Ortho","Ortho Partners, LLC",ada@ortho.test,555-0100\r\n'
    ).encode()
    parsed = parse(data)
    [row] = parsed.rows
    assert parsed.delimiter == "," and row.row == 2
    assert (row.contact.name, row.contact.practice, row.contact.email) == (
        "Dr. Ada Ortho", "Ortho Partners, LLC", "ada@ortho.test")
    assert row.contact.extra == {"Phone": "555-0100"}


def test_semicolons_synonyms_and_case() -> None:
    data = ('  E-Mail Address ;FULL NAME; Office ;Fachgebiet\n'
            'bea@zahn.test;Dr. Béa Müller;"Zahnärzte; Genève";Kieferorthopädie\n').encode()
    parsed = parse(data)
    [row] = parsed.rows
    assert parsed.delimiter == ";"
    assert row.contact == type(row.contact)("bea@zahn.test", "Dr. Béa Müller", "Zahnärzte; Genève",
                                            {"Fachgebiet": "Kieferorthopädie"})


def test_embedded_newline_is_refused_and_the_rest_goes_on() -> None:
    data = ('name,practice,email\n'
            '"Ada\nOrtho",Ortho,ada@ortho.test\n'
            'Bo,"Bo\rClinic",bo@clinic.test\n'
            'Cy,Cy Care,cy@care.test\n'
            'Di,Di\x00Care,di@care.test\n').encode()
    parsed = parse(data)
    assert [r.contact.email for r in parsed.rows] == ["cy@care.test"]
    assert [(r.row, r.reason) for r in parsed.refused] == [
        (2, "'name' contains a line break"),
        (3, "'practice' contains a line break"),
        (5, "'practice' contains a NUL character"),
    ]
    assert parsed.rows[0].row == 4


def test_invalid_and_missing_addresses() -> None:
    data = b'name,practice,email\nA,P,not-an-address\nB,P,\nC,P,c@ortho\nD,P,  D@Ortho.TEST \n'
    parsed = parse(data)
    assert [r.contact.email for r in parsed.rows] == ["D@ortho.test"]
    reasons = {r.row: r.reason for r in parsed.refused}
    assert reasons[3] == "no email address"
    assert "invalid address 'not-an-address'" in reasons[2] and "invalid address 'c@ortho'" in reasons[4]


def test_idn_domain_is_stored_in_ascii() -> None:
    [row] = parse("name,practice,email\nA,P,a@zahnärzte.test\n".encode()).rows
    assert row.contact.email == "a@" + "zahnärzte".encode("idna").decode() + ".test"


def test_duplicates_in_one_file() -> None:
    data = (b'name,practice,email\n'
            b'Ada,Ortho,ada@ortho.test\n'
            b'Ada,Ortho,ADA@ortho.test\n'
            b'Ada,Other practice,ada@ortho.test\n')
    parsed = parse(data)
    assert [(r.row, r.same_as) for r in parsed.rows] == [(2, None), (3, 2)]
    assert [r.row for r in parsed.refused] == [4] and "same address as row 2" in parsed.refused[0].reason
    assert len(parsed.contacts) == 1


def test_too_many_fields_blank_lines_and_stray_quotes() -> None:
    data = b'name,practice,email\n\nAda,Ortho, Partners,ada@ortho.test\n,,\nBo,"Bo" Care,bo@care.test\nCy,Cy,cy@cy.test\n'
    parsed = parse(data)
    assert [r.contact.email for r in parsed.rows] == ["cy@cy.test"]
    assert [r.row for r in parsed.refused] == [3, 5]
    assert "4 fields but the header has 3" in parsed.refused[0].reason


@pytest.mark.parametrize(("data", "message"), [
    (b"", "the file is empty"),
    (b"name,email\nA,a@b.test\n", r"lacks the column\(s\) practice"),
    ("name,practice,email\nA,\u00e9,a@b.test\n".encode("latin-1"), "not UTF-8"),
    (codecs.BOM_UTF16_LE + "name,practice,email\n".encode("utf-16-le"), "UTF-16"),
])
def test_file_level_problems(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse(data)
