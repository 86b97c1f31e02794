"""Folder names: aliases, INBOX, user folders, special-use flags, and who may
APPEND where. Each refusal has an allowed twin."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from postvault.policy.folders import (
    CANONICAL_FOLDERS,
    SPECIAL_USE,
    may_append,
    may_create,
    may_delete,
    may_rename,
    resolve_folder,
)
from postvault.policy.schema import FolderPolicy, Policy

DEFAULT = Policy()
USER_FOLDERS = Policy(folders=FolderPolicy(allow_user_folders=True))
GERMAN = Policy(folders=FolderPolicy(aliases=MappingProxyType(
    {"Drafts": ("Entwürfe",), "Sent": ("Gesendet",), "Trash": ("Papierkorb",)})))


@pytest.mark.parametrize(
    "name, canonical, flag",
    [
        ("INBOX", "INBOX", ""),
        ("inbox", "INBOX", ""),
        ("InBoX", "INBOX", ""),
        ("Drafts", "Drafts", "\\Drafts"),
        ("Draft", "Drafts", "\\Drafts"),
        ("DRAFTS", "Drafts", "\\Drafts"),
        ("Sent", "Sent", "\\Sent"),
        ("sent", "Sent", "\\Sent"),
        ("Sent Items", "Sent", "\\Sent"),
        ("sent items", "Sent", "\\Sent"),
        ("Sent Messages", "Sent", "\\Sent"),
        ("Sent Mail", "Sent", "\\Sent"),
        ("Trash", "Trash", "\\Trash"),
        ("Deleted Items", "Trash", "\\Trash"),
        ("DELETED MESSAGES", "Trash", "\\Trash"),
        ("Bin", "Trash", "\\Trash"),
    ],
)
def test_names_open_the_canonical_folder(name: str, canonical: str, flag: str) -> None:
    for policy in (DEFAULT, USER_FOLDERS):
        found = resolve_folder(name, policy)
        assert found.allowed and found.name == canonical and found.special_use == flag
        assert not found.user_folder


def test_special_use_flags_are_rfc_6154() -> None:
    assert SPECIAL_USE == {"Drafts": "\\Drafts", "Sent": "\\Sent", "Trash": "\\Trash"}
    assert CANONICAL_FOLDERS == ("INBOX", "Drafts", "Sent", "Trash")


def test_aliases_come_from_the_policy() -> None:
    assert resolve_folder("gesendet", GERMAN).name == "Sent"
    assert resolve_folder("Entwürfe", GERMAN).name == "Drafts"
    # Canonical names always work; the defaults' aliases are gone.
    assert resolve_folder("Sent", GERMAN).name == "Sent"
    assert not resolve_folder("Sent Items", GERMAN).allowed


@pytest.mark.parametrize("name", ["Patients", "Sent Items/2024", "INBOX/old", "Archive"])
def test_other_names_only_as_user_folders(name: str) -> None:
    refused = resolve_folder(name, DEFAULT)
    assert not refused.allowed
    assert refused.decision.rule == "folders.nonexistent"
    assert refused.decision.imap_code == "NONEXISTENT"
    assert refused.decision.imap_text.startswith("[NONEXISTENT] There is no folder ")
    assert "INBOX, Drafts, Sent and Trash" in refused.decision.text
    allowed = resolve_folder(name, USER_FOLDERS)
    assert allowed.allowed and allowed.user_folder and allowed.name == name and allowed.special_use == ""


@pytest.mark.parametrize(
    "bad, good",
    [
        ("", "a"),
        ("   ", "a b"),
        ("a\tb", "a b"),
        ("a*", "a+"),
        ("50%", "50 percent"),
        ("/top", "top"),
        ("top/", "top"),
        ("a//b", "a/b"),
        ("x" * 201, "x" * 200),
    ],
)
def test_malformed_names_are_refused(bad: str, good: str) -> None:
    found = resolve_folder(bad, USER_FOLDERS)
    assert not found.allowed and found.decision.rule == "folders.bad-name" and found.decision.imap_code == "CANNOT"
    assert resolve_folder(good, USER_FOLDERS).allowed


def test_create() -> None:
    for name in ("Sent", "sent items", "inbox", "Bin"):
        d = may_create(name, USER_FOLDERS).decision
        assert not d.allowed and d.imap_code == "ALREADYEXISTS" and "already exists" in d.text
    d = may_create("Patients", DEFAULT).decision
    assert not d.allowed and d.imap_code == "CANNOT" and d.rule == "folders.no-user-folders"
    assert may_create("Patients", USER_FOLDERS).allowed
    # Nothing nested inside the four.
    d = may_create("INBOX/Old", USER_FOLDERS).decision
    assert not d.allowed and d.rule == "folders.nested" and "inside INBOX" in d.text
    assert not may_create("Sent Items/2024", USER_FOLDERS).allowed
    assert may_create("Patients/2024", USER_FOLDERS).allowed
    assert may_create("a*", USER_FOLDERS).decision.rule == "folders.bad-name"


def test_delete_and_rename_keep_the_four() -> None:
    for name in ("INBOX", "Drafts", "sent items", "Trash"):
        d = may_delete(name, USER_FOLDERS)
        assert not d.allowed and d.imap_code == "CANNOT" and "can't be deleted" in d.text
    assert may_delete("Patients", USER_FOLDERS).allowed
    assert may_delete("Patients", DEFAULT).imap_code == "NONEXISTENT"


def test_rename() -> None:
    # The source: a user folder, or INBOX (RFC 3501 §6.3.5), never the three.
    for name in ("Drafts", "sent items", "Deleted Items"):
        d = may_rename(name, "Old", USER_FOLDERS).decision
        assert not d.allowed and d.imap_code == "CANNOT" and "can't be deleted or renamed" in d.text
    ok = may_rename("inbox", "Old mail", USER_FOLDERS)
    assert ok.allowed and ok.name == "INBOX" and not ok.user_folder
    ok = may_rename("Patients", "Archive/Patients", USER_FOLDERS)
    assert ok.allowed and ok.name == "Patients" and ok.user_folder
    # The target: as CREATE.
    for target in ("Sent Items", "INBOX", "trash"):
        d = may_rename("Patients", target, USER_FOLDERS).decision
        assert not d.allowed and d.imap_code == "ALREADYEXISTS"
    assert may_rename("Patients", "Drafts/Old", USER_FOLDERS).decision.rule == "folders.nested"
    assert may_rename("Patients", "a%", USER_FOLDERS).decision.rule == "folders.bad-name"
    # Without user folders there is nothing to rename, nor to rename to.
    assert may_rename("Patients", "Other", DEFAULT).decision.imap_code == "NONEXISTENT"
    assert may_rename("INBOX", "Other", DEFAULT).decision.rule == "folders.no-user-folders"


@pytest.mark.parametrize(
    "role, folder, allowed",
    [
        ("member", "INBOX", True),
        ("member", "Drafts", True),
        ("member", "Sent", True),
        ("member", "Trash", True),
        ("member", "Patients", True),
        ("colleague", "Drafts", True),
        ("colleague", "Sent", True),
        ("colleague", "Trash", True),
        ("colleague", "Patients", True),
        ("colleague", "INBOX", False),
        # A caller that forgets to resolve the name first is still refused.
        ("colleague", "inbox", False),
    ],
)
def test_append(role: str, folder: str, allowed: bool) -> None:
    d = may_append(role, folder)  # type: ignore[arg-type]
    assert d.allowed is allowed
    if not allowed:
        assert d.rule == "folders.append-inbox" and d.imap_code == "NOPERM"
        assert d.imap_text.startswith("[NOPERM] Colleagues can't add messages to INBOX")
        assert "\r" not in d.text and "\n" not in d.text  # one IMAP response line


def test_append_through_an_alias() -> None:
    # What the IMAP server does: resolve, then ask.
    found = resolve_folder("Sent Messages", DEFAULT)
    assert may_append("colleague", found.name).allowed
    assert not may_append("colleague", resolve_folder("Inbox", DEFAULT).name).allowed
