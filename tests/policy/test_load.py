"""Loading and checking policy.toml: defaults, every rule with an allowed
twin, line numbers, suggestions, and the reload holder."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType

import pytest

from postvault.errors import ConfigError
from postvault.policy.load import (
    PolicyHolder,
    PolicyInvalid,
    check_policy_file,
    check_policy_text,
    load_policy,
    load_policy_text,
)
from postvault.policy.schema import (
    ALIASED_FOLDERS,
    DEFAULT_BLOCKED_EXTENSIONS,
    AttachmentPolicy,
    KiB,
    MiB,
    OfficeException,
    Policy,
    format_size,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "postvault" / "policy" / "default.toml"
SRC = "policy.toml"


def problems(text: str) -> list[str]:
    return check_policy_text(text, SRC)


def load(text: str) -> Policy:
    return load_policy_text(text, SRC)


# --- the default file and the schema agree -----------------------------------------


def test_default_file_is_the_schema_defaults() -> None:
    assert load_policy(DEFAULT) == Policy()


def test_shipped_conf_is_the_default_file() -> None:
    assert (REPO / "conf" / "policy.toml").read_bytes() == DEFAULT.read_bytes()


def test_default_file_writes_out_every_key() -> None:
    # Equality above can't see a key left out of the file (its default
    # would stand in); this can.
    data = tomllib.loads(DEFAULT.read_text("utf-8"))
    missing = []
    for f in fields(Policy):
        if "section" not in f.metadata:
            continue  # [offices] has no default entries
        table = data
        for name in f.metadata["path"]:
            table = table.get(name, {})
        for key in fields(f.metadata["section"]):
            names = key.metadata.get("spread") or [key.metadata.get("toml") or key.name]
            missing += [f"{'.'.join(f.metadata['path'])}.{n}" for n in names if n not in table]
    assert missing == []


def test_empty_file_is_all_defaults() -> None:
    assert load("") == Policy()
    assert load("# nothing\n\n[attachments]\n") == Policy()


def test_policy_compares_by_value_and_offices_are_read_only() -> None:
    policy = load('[offices."office@dental.test"]\nallow_extensions = ["stl"]\n')
    assert isinstance(policy.offices, MappingProxyType)
    with pytest.raises(TypeError):
        policy.offices["x@y.test"] = OfficeException()  # type: ignore[index]


# --- accepted values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, get, expected",
    [
        ('[attachments]\nmax_size = "15 MiB"', lambda p: p.attachments.max_size, 15 * MiB),
        ('[attachments]\nmax_size = "15MiB"', lambda p: p.attachments.max_size, 15 * MiB),
        ('[attachments]\nmax_size = "500 KiB"', lambda p: p.attachments.max_size, 500 * KiB),
        ('[attachments]\nmax_size = "500 kib"', lambda p: p.attachments.max_size, 500 * KiB),
        ('[attachments]\nmax_size = "1 GiB"\nmax_message_size = "1 GiB"', lambda p: p.attachments.max_size,
         1024 * MiB),
        ('[attachments]\nmax_size = "77 B"', lambda p: p.attachments.max_size, 77),
        ("[attachments]\nmax_size = 1048576", lambda p: p.attachments.max_size, MiB),
        ('[attachments]\nblocked_extensions = [".EXE", "bat", "ex_", "appref-ms"]',
         lambda p: p.attachments.blocked_extensions, frozenset({"exe", "bat", "ex_", "appref-ms"})),
        ("[attachments]\nblocked_extensions = []", lambda p: p.attachments.blocked_extensions, frozenset()),
        ("[attachments]\nmax_mime_depth = 5\nmax_parts = 50\nmax_headers = 200",
         lambda p: (p.attachments.max_mime_depth, p.attachments.max_parts, p.attachments.max_headers), (5, 50, 200)),
        ('[offices."Office@Dental.test"]\nallow_extensions = ["STL", ".dcm"]',
         lambda p: dict(p.offices), {"office@dental.test": OfficeException(frozenset({"stl", "dcm"}))}),
        # An executable's extension may be listed: sniffing still refuses executables.
        ('[offices."office@dental.test"]\nallow_extensions = ["exe"]',
         lambda p: p.office("OFFICE@dental.test").allow_extensions, frozenset({"exe"})),
        ("[roles.colleague]\nreply_only = false", lambda p: p.colleague.reply_only, False),
        ("[roles.member]\nmay_write_members = false", lambda p: p.member, Policy().member.__class__(True, False)),
        # A folder the file leaves out keeps its default names.
        ('[folders]\nSent = ["Gesendet"]', lambda p: dict(p.folders.aliases),
         {**Policy().folders.aliases, "Sent": ("Gesendet",)}),
        ("[folders]\nallow_user_folders = true", lambda p: p.folders.allow_user_folders, True),
        ("[sessions]\nimap_idle_minutes = 30", lambda p: p.sessions.imap_idle_minutes, 30),
        ("[sessions]\nimap_idle_minutes = 45", lambda p: p.sessions.imap_idle_minutes, 45),
        ("[passwords]\nmin_length = 8", lambda p: p.passwords.min_length, 8),
        ("[auth]\ndelay_seconds = 60\nmax_delay_seconds = 60", lambda p: p.auth.delay_seconds, 60),
        # Dotted keys and inline tables are TOML too.
        ("roles.colleague.reply_only = false", lambda p: p.colleague.reply_only, False),
        ("auth = { lockout_after = 3 }", lambda p: p.auth.lockout_after, 3),
    ],
)
def test_accepted(text: str, get, expected) -> None:  # type: ignore[no-untyped-def]
    assert problems(text) == []
    assert get(load(text)) == expected


# --- refused values, each with an allowed twin -----------------------------------------

REFUSALS = [
    # (bad text, its allowed twin, line, fragments of the one problem)
    ('[attachments]\nmax_size = "15 MB"', '[attachments]\nmax_size = "15 MiB"', 2,
     ['attachments.max_size: expected a size such as "15 MiB"', 'got the string "15 MB"', '"MB" is ambiguous',
      '"15 MiB"', "15000000"]),
    ('[attachments]\nmax_size = "500 KB"', '[attachments]\nmax_size = "500 KiB"', 2,
     ['"KB" is ambiguous', '"500 KiB"', "500000"]),
    ('[attachments]\nmax_size = "2 G"', '[attachments]\nmax_size = 2000000', 2, ['"G" is ambiguous']),
    ('[attachments]\nmax_size = "15 TB"', '[attachments]\nmax_size = "15 MiB"', 2,
     ['unknown unit "TB"']),
    ('[attachments]\nmax_size = "1.5 MiB"', '[attachments]\nmax_size = "1536 KiB"', 2,
     ['whole numbers only: write "1536 KiB"']),
    ('[attachments]\nmax_size = "15"', "[attachments]\nmax_size = 15", 2, ['got the string "15"']),
    ("[attachments]\nmax_size = 15.5", "[attachments]\nmax_size = 15", 2, ["got the float 15.5"]),
    ("[attachments]\nmax_size = -1", "[attachments]\nmax_size = 1", 2,
     ["expected a size from 1 B to 1 GiB, got the integer -1"]),
    ('[attachments]\nmax_size = "-1 MiB"', '[attachments]\nmax_size = "1 MiB"', 2, ['got the string "-1 MiB"']),
    ("[attachments]\nmax_size = 0", "[attachments]\nmax_size = 1", 2, ["expected a size from 1 B"]),
    ('[attachments]\nmax_message_size = "2 GiB"', '[attachments]\nmax_message_size = "1 GiB"', 2,
     ["a size from 1 KiB to 1 GiB"]),
    ('[attachments]\nmax_size = "60 MiB"', '[attachments]\nmax_size = "50 MiB"', 2,
     ["attachments.max_size: expected at most max_message_size (50 MiB), got 60 MiB"]),
    ('[attachments]\nmax_message_size = "10 MiB"', '[attachments]\nmax_message_size = "15 MiB"', 2,
     ["attachments.max_message_size: expected at least max_size (15 MiB), got 10 MiB"]),
    ('[attachments]\nmax_size = "20 MiB"\nmax_message_size = "10 MiB"',
     '[attachments]\nmax_size = "10 MiB"\nmax_message_size = "10 MiB"', 2, ["attachments.max_size: expected at most max_message_size (10 MiB)"]),
    ("[auth]\nmax_delay_seconds = 0", "[auth]\nmax_delay_seconds = 1", 2,
     ["auth.max_delay_seconds: expected an integer from 1"]),
    ("[auth]\ndelay_seconds = 5\nmax_delay_seconds = 4", "[auth]\ndelay_seconds = 5\nmax_delay_seconds = 5", 2,
     ["auth.delay_seconds: expected at most max_delay_seconds (4), got 5"]),
    ("[sessions]\nweb_absolute_hours = 0", "[sessions]\nweb_absolute_hours = 1", 2,
     ["sessions.web_absolute_hours: expected an integer from 1"]),
    ("[sessions]\nweb_idle_minutes = 800\n", "[sessions]\nweb_idle_minutes = 800\nweb_absolute_hours = 14\n", 2,
     ["sessions.web_idle_minutes: expected at most web_absolute_hours in minutes (720), got 800"]),
    ("[attachments]\narchive_max_depth = -3", "[attachments]\narchive_max_depth = 3", 2,
     ["attachments.archive_max_depth: expected an integer from 1 to 10, got the integer -3"]),
    ("[attachments]\nmax_mime_depth = 0", "[attachments]\nmax_mime_depth = 1", 2,
     ["attachments.max_mime_depth: expected an integer from 1 to 100"]),
    ("[attachments]\nmax_parts = true", "[attachments]\nmax_parts = 1", 2, ["got the boolean true"]),
    ("[attachments]\nmax_headers = 5", "[attachments]\nmax_headers = 10", 2, ["an integer from 10 to 100000"]),
    ('[attachments]\nsniff_content = "yes"', "[attachments]\nsniff_content = true", 2,
     ['expected true or false, got the string "yes"']),
    ('[attachments]\nblocked_extensions = "exe"', '[attachments]\nblocked_extensions = ["exe"]', 2,
     ['expected an array of file extensions such as ["stl", "dcm"], got the string "exe"']),
    ('[attachments]\nblocked_extensions = ["exe", "tar.gz"]', '[attachments]\nblocked_extensions = ["exe", "gz"]',
     2, ['got "tar.gz" (item 2 of the array)', "no dots"]),
    ('[attachments]\nblocked_extensions = ["exe", 5]', '[attachments]\nblocked_extensions = ["exe", "5"]', 2,
     ["got 5 (item 2 of the array)"]),
    ('[attachments]\nblocked_extensions = [""]', '[attachments]\nblocked_extensions = ["a"]', 2,
     ['got "" (item 1 of the array)']),
    ('[attachments]\nmax_mesage_size = "20 MiB"', '[attachments]\nmax_message_size = "20 MiB"', 2,
     ['attachments.max_mesage_size: unknown key, did you mean "attachments.max_message_size"?']),
    ("[auth]\nmax_size = 3", "[attachments]\nmax_size = 3", 2,
     ['auth.max_size: unknown key, did you mean "attachments.max_size"?']),
    ("[atachments]\n", "[attachments]\n", 1, ['atachments: unknown table, did you mean "[attachments]"?']),
    ("[roles.memebr]\n", "[roles.member]\n", 1, ['roles.memebr: unknown table, did you mean "[roles.member]"?']),
    ("reply_only = false\n", "[roles.colleague]\nreply_only = false\n", 1,
     ['reply_only: unknown key, did you mean "roles.colleague.reply_only"?']),
    ("[zzz]\n", "[auth]\n", 1, ["zzz: unknown table; expected one of: [attachments], [offices], [roles]"]),
    ("attachments = 5\n", "attachments = {}\n", 1, ["attachments: expected a table [attachments], got the integer 5"]),
    ('[offices."front desk"]\nallow_extensions = []', '[offices."front@desk.test"]\nallow_extensions = []', 1,
     ['offices."front desk": expected a member\'s mail address', 'got "front desk"']),
    ('[offices."a@b.test"]\n[offices."A@B.test"]\n', '[offices."a@b.test"]\n[offices."c@b.test"]\n', 2,
     ['offices."A@B.test": expected each address once', "addresses ignore case"]),
    ('[offices]\n"a@b.test" = 5\n', '[offices]\n"a@b.test" = {}\n', 2,
     ['offices."a@b.test": expected a table [offices."a@b.test"], got the integer 5']),
    ('[offices."a@b.test"]\nallow_extension = ["stl"]', '[offices."a@b.test"]\nallow_extensions = ["stl"]', 2,
     ['offices."a@b.test".allow_extension: unknown key, did you mean "offices."a@b.test".allow_extensions"?']),
    ("[roles.colleague]\nreply_only = 1", "[roles.colleague]\nreply_only = true", 2,
     ["roles.colleague.reply_only: expected true or false, got the integer 1"]),
    ('[folders]\ndrafts = ["D"]', '[folders]\nDrafts = ["D"]', 2,
     ['folders.drafts: unknown key, did you mean "folders.Drafts"?']),
    ('[folders]\nTrash = ["Inbox"]', '[folders]\nTrash = ["In box"]', 2,
     ['folders.Trash: expected names other than INBOX', 'got "Inbox"']),
    ('[folders]\nTrash = ["Sent"]', '[folders]\nTrash = ["Sent to trash"]', 2,
     ['folders.Trash: expected names no other folder uses, got "Sent", which opens Sent']),
    ('[folders]\nTrash = ["Draft"]', '[folders]\nTrash = ["Draft"]\nDrafts = ["Drafts"]', 2,
     ['folders.Trash: expected names no other folder uses, got "Draft", which opens Drafts']),
    ('[folders]\nSent = ["Sent*"]', '[folders]\nSent = ["Sent!"]', 2, ['got "Sent*" (item 1 of the array)']),
    ('[folders]\nSent = ["  "]', '[folders]\nSent = []', 2, ['got "  " (item 1 of the array)']),
    ("[auth]\nlockout_after = 0", "[auth]\nlockout_after = 1", 2, ["auth.lockout_after: expected an integer from 1"]),
    ("[auth]\ndelay_seconds = 61", "[auth]\ndelay_seconds = 60", 2,
     ["auth.delay_seconds: expected at most max_delay_seconds (60), got 61"]),
    ("[sessions]\nimap_idle_minutes = 29", "[sessions]\nimap_idle_minutes = 30", 2,
     ["sessions.imap_idle_minutes: expected an integer from 30 to 1440, got the integer 29", "RFC 9051 §5.4"]),
    ("[sessions]\nweb_idle_minutes = 61\nweb_absolute_hours = 1",
     "[sessions]\nweb_idle_minutes = 60\nweb_absolute_hours = 1", 2, ["sessions.web_idle_minutes: expected at most web_absolute_hours in minutes (60)"]),
    ("[passwords]\nmin_length = 7", "[passwords]\nmin_length = 8", 2,
     ["passwords.min_length: expected an integer from 8 to 64, got the integer 7", "NIST SP 800-63B"]),
    ("[passwords]\nmin_score = 0", "[passwords]\nmin_score = 1", 2, ["passwords.min_score"]),
]


@pytest.mark.parametrize("bad, good, line, fragments", REFUSALS, ids=[r[3][0][:60] for r in REFUSALS])
def test_refused_with_allowed_twin(bad: str, good: str, line: int, fragments: list[str]) -> None:
    found = problems(bad)
    assert len(found) == 1, found
    assert found[0].startswith(f"{SRC}:{line}: "), found[0]
    for fragment in fragments:
        assert fragment in found[0], (fragment, found[0])
    assert "\n" not in found[0]
    assert problems(good) == [], good


def test_every_problem_at_once_in_file_order() -> None:
    text = (
        "[sessions]\nimap_idle_minutes = 10\n"
        '[attachments]\nmax_size = "15 MB"\nmax_parts = -1\nfoo = 1\n'
        "[passwrods]\n"
    )
    found = problems(text)
    assert [p.split(":")[1] for p in found] == ["2", "4", "5", "6", "7"]
    assert "imap_idle_minutes" in found[0] and "passwrods" in found[-1]


def test_an_unknown_key_does_not_hide_a_rule_across_keys() -> None:
    found = problems("[auth]\nfoo = 1\ndelay_seconds = 100\nmax_delay_seconds = 10\n")
    assert len(found) == 2


def test_a_bad_value_is_not_blamed_twice() -> None:
    # max_size is invalid, so the cross-key rule (which would judge the
    # default standing in for it) stays quiet.
    found = problems('[attachments]\nmax_size = "15 MB"\nmax_message_size = "1 MiB"\n')
    assert len(found) == 1 and "ambiguous" in found[0]


@pytest.mark.parametrize(
    "text, line",
    [
        ("[auth]\nlockout_after = \n", 2),
        ("[auth]\nlockout_after = 3\nlockout_after = 4\n", 3),
        ('[attachments]\nmax_size = "15 MiB\n', 2),
        ("[auth]\nx = [1,\n", 3),
    ],
)
def test_toml_syntax_error_names_its_line(text: str, line: int) -> None:
    found = problems(text)
    assert len(found) == 1
    assert found[0].startswith(f"{SRC}:{line}: expected valid TOML"), found[0]


# --- finding lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line",
    [
        # A quoted header, with spaces and an escape.
        ('# c\n\n[ offices . "a@b.test" ]\n\nallow_extensions = 5\n', 5),
        # A dotted key under a header.
        ("[roles]\n\ncolleague.reply_only = 3\n", 3),
        # A quoted key.
        ('[auth]\n"lockout_after" = 0\n', 2),
        # The same key name in two tables: the one in its own table.
        ("[passwords]\nmin_length = 12\n[auth]\nmin_length = 12\n", 4),
        # An inline table: the line of the nearest thing found.
        ("\n\nauth = { lockout_after = 0 }\n", 3),
        # A key written in an array's continuation lines is not a key.
        ('[attachments]\nblocked_extensions = [\n  "exe",\n  "a.b",\n]\n', 2),
        # [[array of tables]] is not our shape, but still has a line.
        ("\n[[auth]]\n", 2),
    ],
)
def test_problem_lines(text: str, line: int) -> None:
    found = problems(text)
    assert found and found[0].startswith(f"{SRC}:{line}: "), found


# --- files and errors ---------------------------------------------------------------------


def test_load_policy_raises_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[auth]\nlockout_after = 0\nthrottle_after = 0\n", "utf-8")
    with pytest.raises(PolicyInvalid) as info:
        load_policy(path)
    assert isinstance(info.value, ConfigError)
    assert len(info.value.problems) == 2
    message = str(info.value)
    assert message.startswith(f"{path}:2: auth.lockout_after") and "1 more" in message and "\n" not in message


def test_check_policy_file(tmp_path: Path) -> None:
    assert check_policy_file(DEFAULT) == []
    missing = tmp_path / "nope.toml"
    assert check_policy_file(missing) == [f"{missing}: no such file"]
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    assert "expected UTF-8" in check_policy_file(latin)[0]
    assert "is a folder" in check_policy_file(tmp_path)[0]
    with pytest.raises(PolicyInvalid):
        load_policy(missing)


def test_holder_keeps_the_old_policy_when_the_new_one_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[attachments]\nmax_size = "1 MiB"\n', "utf-8")
    holder = PolicyHolder.from_file(path)
    assert holder.policy.attachments.max_size == MiB

    path.write_text('[attachments]\nmax_size = "2 MiB"\n', "utf-8")
    assert holder.reload(path) == []
    assert holder.policy.attachments.max_size == 2 * MiB

    before = holder.policy
    path.write_text('[attachments]\nmax_size = "3 MB"\n', "utf-8")
    found = holder.reload(path)
    assert len(found) == 1 and "ambiguous" in found[0]
    assert holder.policy is before

    path.write_text("[attachments\n", "utf-8")
    assert holder.reload(path) and holder.policy is before
    assert holder.reload(tmp_path / "gone.toml") and holder.policy is before


def test_holder_starts_with_defaults() -> None:
    assert PolicyHolder().policy == Policy()


def test_holder_refuses_an_invalid_file_at_startup(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[sessions]\nimap_idle_minutes = 5\n", "utf-8")
    with pytest.raises(PolicyInvalid, match="RFC 9051"):
        PolicyHolder.from_file(path)


# --- schema helpers ------------------------------------------------------------------------


@pytest.mark.parametrize("n, text", [(15 * MiB, "15 MiB"), (1536 * KiB, "1536 KiB"), (7, "7 B"), (0, "0 B"),
                                     (3 * 1024 * MiB, "3 GiB"), (MiB + 1, f"{MiB + 1} B")])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_schema_defaults_kept_for_the_attachment_engine() -> None:
    a = AttachmentPolicy()
    assert (a.max_size, a.max_message_size) == (15 * MiB, 50 * MiB)
    assert a.blocked_extensions == DEFAULT_BLOCKED_EXTENSIONS and "exe" in a.blocked_extensions
    assert (a.max_mime_depth, a.max_parts, a.max_headers) == (20, 500, 1000)
    assert set(Policy().folders.aliases) == set(ALIASED_FOLDERS)
