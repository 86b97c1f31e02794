"""Small helpers shared by the test suites."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from postvault.store.api import Store


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def cheap_home_env() -> Iterator[None]:
    """For making a test home in this process: the caller's POSTVAULT_*
    variables hidden (a developer's shell must not change what a test
    makes) and a one-pass KDF for the accounts created meanwhile; all put
    back afterwards."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("POSTVAULT_")}
    os.environ["POSTVAULT_STORE_KDF_ITERATIONS"] = "1"
    try:
        yield
    finally:
        del os.environ["POSTVAULT_STORE_KDF_ITERATIONS"]
        os.environ.update(saved)


def stored_blobs(store: Store) -> list[str]:
    """Every blob the store holds: the blob ids in the database's chunk
    table (every blob with ``blobs = "database"``, small messages' beside a
    blob folder, store/smallblobs.py), and the files under a blob folder
    (temporary ones too, by name)."""
    from sqlalchemy import select

    from postvault.store.models import BlobChunk
    from postvault.store.smallblobs import SplitBlobStore

    with store._sessions() as s:
        found = list(s.scalars(select(BlobChunk.blob_id).distinct()))
    if isinstance(store.blobs, SplitBlobStore):
        root = store.blobs.files.root
        found += [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return sorted(found)


def set_policy(home: Path, **values: int) -> None:
    """Rewrite integer settings of the home's conf/policy.toml (each must
    appear exactly once, as the shipped file has it)."""
    import re

    path = home / "conf" / "policy.toml"
    text = path.read_text("utf-8")
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = \d+$", f"{key} = {value}", text)
        assert n == 1, key
    path.write_text(text, "utf-8")


def copy_column(store: Store, account: str, mailbox: str, column: str) -> dict[int, bytes | None]:
    """One column of ``message_copies`` (e.g. ``"sealed_search"``,
    ``"sealed_header"``) for each copy in the account's mailbox, by UID,
    read straight from the database."""
    from sqlalchemy import select

    from postvault.store.db import sessions
    from postvault.store.models import Mailbox, MessageCopy

    acct_id = store.accounts([account])[account].id
    with sessions(store.engine)() as s:
        rows = s.execute(
            select(MessageCopy.uid, getattr(MessageCopy, column))
            .join(Mailbox, Mailbox.id == MessageCopy.mailbox_id)
            .where(Mailbox.account_id == acct_id, Mailbox.name == mailbox)
        ).all()
    return {uid: value for uid, value in rows}


def set_copy_column(store: Store, account: str, mailbox: str, column: str, value: bytes | None,
                    uid: int | None = None) -> None:
    """Write one column of ``message_copies`` straight into the database:
    for the copy with ``uid`` in the account's mailbox, or, with no
    ``uid``, for every copy in it. At least one row must change."""
    from sqlalchemy import select, update

    from postvault.store.db import sessions, unit_of_work
    from postvault.store.models import Mailbox, MessageCopy

    acct_id = store.accounts([account])[account].id
    with unit_of_work(sessions(store.engine)) as s:
        box_id = s.scalar(select(Mailbox.id).where(Mailbox.account_id == acct_id, Mailbox.name == mailbox))
        where = [MessageCopy.mailbox_id == box_id] + ([] if uid is None else [MessageCopy.uid == uid])
        changed = s.execute(update(MessageCopy).where(*where).values({getattr(MessageCopy, column): value}))
        assert changed.rowcount, (mailbox, uid, column)
