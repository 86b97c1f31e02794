"""Folder names (pure): what a client's name opens, and who may put what where.

Every account has four folders: INBOX, Drafts, Sent and Trash. Clients call
the last three many things ("Sent Items" in Outlook, "Sent Messages" in
Apple Mail, "Deleted Items", ...); ``[folders]`` in policy.toml lists those
names, and each opens its canonical folder, so every client files drafts,
sent copies and deleted mail in the same three places.

- INBOX is case-insensitive (RFC 3501 §5.1, RFC 9051 §5.1): "inbox" is INBOX.
- Aliases, and the canonical names themselves, compare ignoring case too, so
  "sent items" and "SENT" open Sent; this also keeps users from making a
  folder "sent" beside "Sent".
- Other names are user folders, allowed only with ``allow_user_folders``.
- LIST shows each canonical folder with its RFC 6154 special-use flag
  (\\Drafts, \\Sent, \\Trash), so clients find them without guessing names.

Names here are Unicode: the IMAP server decodes modified UTF-7 (RFC 3501
§5.1.3) before asking, and uses :data:`DELIMITER` as the hierarchy separator.

Decisions carry an SMTP code like every ``Decision`` (unused by IMAP), a
text that reads as IMAP response text, and an RFC 5530 response code in
``imap_code``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from postvault.policy.decision import ALLOW, Decision, refuse
from postvault.policy.schema import ALIASED_FOLDERS, FolderPolicy, Policy

Role = Literal["member", "colleague"]

INBOX = "INBOX"
DRAFTS, SENT, TRASH = ALIASED_FOLDERS
CANONICAL_FOLDERS: tuple[str, ...] = (INBOX, *ALIASED_FOLDERS)
# RFC 6154 special-use attributes; INBOX needs none (it is named by rule).
SPECIAL_USE: dict[str, str] = {DRAFTS: "\\Drafts", SENT: "\\Sent", TRASH: "\\Trash"}
DELIMITER = "/"
# Longest folder name we accept from a client, in characters; real ones are
# short, and the name is stored readable (folder names are not content).
MAX_NAME_LENGTH = 200

# A colleague may APPEND its own drafts, copies of what it sent, and deleted
# mail, but never into INBOX: what is in INBOX was delivered to it, and a
# colleague may reply to what it received; an appended message must not pass
# for one (ThreadFacts are built from delivered mail only, see recipients.py).


@dataclass(frozen=True)
class FolderName:
    """What a client's folder name opens.

    ``name`` is the canonical folder, or the user folder's name as given;
    ``decision`` refuses names that open nothing.
    """

    decision: Decision
    name: str = ""
    special_use: str = ""  # "\\Sent" etc.; "" for INBOX and user folders
    user_folder: bool = False

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


def _lookup(policy: FolderPolicy) -> dict[str, str]:
    """Lower-cased name -> canonical folder."""
    table = {INBOX.lower(): INBOX}
    for canonical in ALIASED_FOLDERS:
        table[canonical.lower()] = canonical
        for alias in policy.aliases.get(canonical, ()):
            table.setdefault(alias.lower(), canonical)
    return table


def _name_problem(name: str) -> str:
    """Why ``name`` can't be a folder name at all, or ''."""
    if not name or not name.strip():
        return "A folder name can't be empty."
    if len(name) > MAX_NAME_LENGTH:
        return f"A folder name can have at most {MAX_NAME_LENGTH} characters."
    if not name.isprintable():
        return "A folder name can't contain control characters."
    if "*" in name or "%" in name:
        return "A folder name can't contain * or %."
    parts = name.split(DELIMITER)
    if any(not part.strip() for part in parts):
        return f'Each level of a folder name needs a name; "{DELIMITER}" can\'t start, end or repeat.'
    return ""


def resolve_folder(name: str, policy: Policy) -> FolderName:
    """The folder ``name`` opens (SELECT, EXAMINE, STATUS, APPEND, COPY,
    MOVE targets), or a refusal. For a user folder this says only that the
    name is allowed; whether it exists is the store's business."""
    canonical = _lookup(policy.folders).get(name.lower())
    if canonical is not None:
        return FolderName(ALLOW, canonical, SPECIAL_USE.get(canonical, ""))
    problem = _name_problem(name)
    if problem:
        return FolderName(refuse(550, "5.1.1", problem, "folders.bad-name", "CANNOT"))
    if not policy.folders.allow_user_folders:
        return FolderName(refuse(550, "5.1.1", f"There is no folder {_show(name)}; this server has INBOX, "
                                               "Drafts, Sent and Trash only.",
                                 "folders.nonexistent", "NONEXISTENT"))
    return FolderName(ALLOW, name, "", user_folder=True)


def may_create(name: str, policy: Policy) -> FolderName:
    """CREATE: only user folders, only if allowed, never a name that opens
    one of the four (it exists already, under that name or another)."""
    canonical = _lookup(policy.folders).get(name.lower())
    if canonical is not None:
        return FolderName(refuse(550, "5.7.1", f"{_show(name)} is the {canonical} folder, which already exists.",
                                 "folders.exists", "ALREADYEXISTS"), canonical, SPECIAL_USE.get(canonical, ""))
    problem = _name_problem(name)
    if problem:
        return FolderName(refuse(550, "5.7.1", problem, "folders.bad-name", "CANNOT"))
    if not policy.folders.allow_user_folders:
        return FolderName(refuse(550, "5.7.1", "This server doesn't allow folders of your own; use INBOX, "
                                               "Drafts, Sent and Trash.", "folders.no-user-folders", "CANNOT"))
    # A user folder inside INBOX would make INBOX's children appear as mail
    # the account received; keep the four flat.
    top = name.split(DELIMITER, 1)[0]
    if top.lower() in _lookup(policy.folders):
        return FolderName(refuse(550, "5.7.1", f"Folders can't be made inside {_lookup(policy.folders)[top.lower()]}"
                                               "; make it at the top level.", "folders.nested", "CANNOT"))
    return FolderName(ALLOW, name, "", user_folder=True)


def may_delete(name: str, policy: Policy) -> Decision:
    """DELETE (and the source of RENAME): the four folders stay."""
    resolved = resolve_folder(name, policy)
    if not resolved.allowed:
        return resolved.decision
    if not resolved.user_folder:
        return refuse(550, "5.7.1", f"The {resolved.name} folder can't be deleted or renamed.",
                      "folders.canonical", "CANNOT")
    return ALLOW


def may_rename(old: str, new: str, policy: Policy) -> FolderName:
    """RENAME ``old`` to ``new``: the source as for DELETE, except that
    INBOX may be renamed (RFC 3501 §6.3.5: its messages move to the new
    folder, INBOX stays); the target as for CREATE (a name that opens one of
    the four already exists). Allowed: ``name`` is the source's canonical
    name (INBOX for any spelling of it)."""
    source = resolve_folder(old, policy)
    if not source.allowed:
        return source
    if not source.user_folder and source.name != INBOX:
        return FolderName(refuse(550, "5.7.1", f"The {source.name} folder can't be deleted or renamed.",
                                 "folders.canonical", "CANNOT"))
    target = may_create(new, policy)
    if not target.allowed:
        return target
    return FolderName(ALLOW, source.name, "", user_folder=source.user_folder)


def may_append(role: Role, canonical: str) -> Decision:
    """APPEND into ``canonical`` (a name from :func:`resolve_folder`).

    A member may append anywhere in its own mailbox (moving old mail in from
    another system is a real need). A colleague may append to Drafts, Sent
    and Trash, which clients do on their own when saving a draft or a sent
    copy, and to its user folders; never to INBOX.
    """
    if role == "member":
        return ALLOW
    # upper(): a caller that passes the client's "Inbox" is refused as well.
    if canonical.upper() == INBOX:
        return refuse(550, "5.7.1", "Colleagues can't add messages to INBOX, which holds only mail delivered "
                                    "to you; save drafts in Drafts and sent copies in Sent.",
                      "folders.append-inbox", "NOPERM")
    return ALLOW


def _show(name: str) -> str:
    return f'"{name}"'
