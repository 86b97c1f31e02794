"""The store API over a real SQLite file and real sealed blobs."""

from __future__ import annotations

import threading
from email.message import EmailMessage

import pytest
from sqlalchemy import func, select, update

from postvault.errors import (
    AccountExists,
    AuthenticationFailed,
    IntegrityError,
    InvalidInput,
    MailboxNotFound,
    NoSuchAccount,
)
from postvault.home import open_store
from postvault.store.api import Store
from postvault.store.db import sessions
from postvault.store.models import Account, AuditEvent, Message, MessageCopy

from tests.conftest import PASSWORD
from tests.support import stored_blobs

# Runs on SQLite, and on PostgreSQL with --db postgresql (tests/conftest.py).
pytestmark = pytest.mark.databases


def mail(subject: str = "Hello", body: str = "Body text\n", msgid: str = "<m1@dental.test>", **headers: str) -> bytes:
    m = EmailMessage()
    m["From"] = "office@dental.test"
    m["To"] = "dr@ortho.test"
    m["Subject"] = subject
    m["Message-ID"] = msgid
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content(body)
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def test_default_mailboxes_have_special_use(store: Store, people: dict[str, str]) -> None:
    s = store.login(people["colleague"], PASSWORD)
    boxes = {b.name: b.special_use for b in store.list_mailboxes(s)}
    assert boxes == {"INBOX": None, "Drafts": "\\Drafts", "Sent": "\\Sent", "Trash": "\\Trash"}


def test_deliver_then_each_party_opens_its_copy(store: Store, people: dict[str, str]) -> None:
    raw = mail()
    result = store.deliver(raw, people["member"], [people["colleague"]])
    assert result.delivered == ((people["colleague"], 1),) and result.sent_uid == 1
    colleague = store.login(people["colleague"], PASSWORD)
    assert store.open_message(colleague, "INBOX", 1).read() == raw
    member = store.login(people["member"], PASSWORD)
    assert store.open_message(member, "Sent", 1).read() == raw
    snap = store.snapshot(member, "Sent")
    assert [(m.uid, m.flags, m.size) for m in snap.messages] == [(1, frozenset({"\\Seen"}), len(raw))]


def test_delivery_needs_no_password_and_reaches_many(store: Store, people: dict[str, str]) -> None:
    store.deliver(mail(), people["member"], [people["colleague"], people["member2"]], save_sent=False)
    for who in (people["colleague"], people["member2"]):
        s = store.login(who, PASSWORD)
        assert store.open_message(s, "INBOX", 1).read() == mail()


def test_unknown_recipient_stores_nothing(store: Store, people: dict[str, str], config) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NoSuchAccount):
        store.deliver(mail(), people["member"], [people["colleague"], "nobody@nowhere.test"])
    with store._sessions() as s:
        assert s.scalar(select(func.count()).select_from(MessageCopy)) == 0
        assert s.scalar(select(func.count()).select_from(Message)) == 0
    assert stored_blobs(store) == []


def test_failed_commit_leaves_no_blob(store: Store, people: dict[str, str], config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("database went away")

    monkeypatch.setattr("postvault.store.audit.record_many", boom)
    with pytest.raises(RuntimeError):
        store.deliver(mail(), people["member"], [people["colleague"]])
    monkeypatch.undo()
    assert stored_blobs(store) == []
    s = store.login(people["colleague"], PASSWORD)
    assert store.snapshot(s, "INBOX").messages == ()


def test_wrong_password_and_unknown_user_fail_alike(store: Store, people: dict[str, str]) -> None:
    with pytest.raises(AuthenticationFailed) as wrong:
        store.login(people["member"], "not the password at all")
    with pytest.raises(AuthenticationFailed) as unknown:
        store.login("ghost@dental.test", "not the password at all")
    assert str(wrong.value) == str(unknown.value)
    with store._sessions() as s:
        events = list(s.scalars(select(AuditEvent.event).where(AuditEvent.event == "login.failed")))
    assert len(events) == 2


def test_password_change_rewraps_only(store: Store, people: dict[str, str]) -> None:
    store.deliver(mail(), people["member"], [people["colleague"]])
    with store._sessions() as s:
        before = s.scalar(select(MessageCopy.wrapped_key).where(MessageCopy.uid == 1).limit(1))
        blobs_before = set(s.scalars(select(Message.blob_id)))
    store.change_password(people["colleague"], PASSWORD, "a new and longer passphrase")
    with pytest.raises(AuthenticationFailed):
        store.login(people["colleague"], PASSWORD)
    s2 = store.login(people["colleague"], "a new and longer passphrase")
    assert store.open_message(s2, "INBOX", 1).read() == mail()
    with store._sessions() as s:
        assert s.scalar(select(MessageCopy.wrapped_key).where(MessageCopy.uid == 1).limit(1)) == before
        assert set(s.scalars(select(Message.blob_id))) == blobs_before


def test_duplicate_and_bad_accounts_refused(store: Store, people: dict[str, str]) -> None:
    with pytest.raises(AccountExists):
        store.create_account("OFFICE@DENTAL.TEST".lower(), "member", "X", PASSWORD)
    for email, role, practice, tz in [
        ("not-an-address", "member", "P", "UTC"),
        ("a@b.test", "admin", "P", "UTC"),
        ("a@b.test", "member", "", "UTC"),
        ("a@b.test", "member", "P", "Mars/Olympus"),
        ("a\r\n@b.test", "member", "P", "UTC"),
    ]:
        with pytest.raises(InvalidInput):
            store.create_account(email, role, practice, PASSWORD, tz)  # type: ignore[arg-type]
    # The allowed twin of the rows above.
    assert store.create_account("a@b.test", "member", "P", PASSWORD, "Europe/Paris").email == "a@b.test"


def test_contacts_both_ways(store: Store, people: dict[str, str]) -> None:
    assert store.contacts(people["member"]) == [people["colleague"]]
    assert store.contacts(people["colleague"]) == [people["member"]]
    store.add_contact(people["member2"], people["colleague"])
    store.add_contact(people["member2"], people["colleague"])  # idempotent
    assert store.contacts(people["colleague"]) == sorted([people["member"], people["member2"]])


def test_append_flags_copy_move_expunge_and_uids(store: Store, people: dict[str, str]) -> None:
    s = store.login(people["member"], PASSWORD)
    uids = [store.append(s, "Drafts", mail(msgid=f"<d{i}@x>"), ["\\Draft"]).uid for i in range(3)]
    assert uids == [1, 2, 3]
    assert store.set_flags(s, "Drafts", [2], ["\\Deleted"], "add") == {2: frozenset({"\\Draft", "\\Deleted"})}
    assert store.expunge(s, "Drafts") == [2]
    # UIDs are never reused after an expunge (RFC 3501 §2.3.1.1).
    assert store.append(s, "Drafts", mail(), []).uid == 4
    copied = store.copy(s, "Drafts", [1, 3], "Trash")
    assert copied.uids == ((1, 1), (3, 2))
    moved = store.move(s, "Drafts", [4], "Trash")
    assert moved.uids == ((4, 3),)
    assert [m.uid for m in store.snapshot(s, "Drafts").messages] == [1, 3]
    assert store.open_message(s, "Trash", 3).read() == mail()
    # A copy shares the sealed content; expunging one leaves the other readable.
    store.set_flags(s, "Drafts", [1], ["\\Deleted"], "set")
    assert store.expunge(s, "Drafts", uids=[1]) == [1]
    assert store.open_message(s, "Trash", 1).read() == mail(msgid="<d0@x>")
    with pytest.raises(MailboxNotFound):
        store.append(s, "Nope", mail())
    with pytest.raises(InvalidInput):
        store.append(s, "INBOX", mail(), ["\\Recent"])


def test_modseq_grows_with_every_change(store: Store, people: dict[str, str]) -> None:
    s = store.login(people["member"], PASSWORD)
    m0 = store.snapshot(s, "INBOX").mailbox.highestmodseq
    store.append(s, "INBOX", mail())
    m1 = store.snapshot(s, "INBOX").mailbox.highestmodseq
    store.set_flags(s, "INBOX", [1], ["\\Seen"], "add")
    m2 = store.snapshot(s, "INBOX").mailbox.highestmodseq
    assert m0 < m1 < m2
    assert store.snapshot(s, "INBOX").messages[0].modseq == m2


def test_last_expunged_copy_removes_blob(store: Store, people: dict[str, str], config) -> None:  # type: ignore[no-untyped-def]
    s = store.login(people["member"], PASSWORD)
    store.append(s, "INBOX", mail(), ["\\Deleted"])
    assert len(stored_blobs(store)) == 1
    store.expunge(s, "INBOX")
    assert stored_blobs(store) == []


def test_blob_moved_to_another_message_or_account_is_refused(store: Store, people: dict[str, str]) -> None:
    store.deliver(mail("first"), people["member"], [people["colleague"]], save_sent=False)
    store.deliver(mail("second", msgid="<m2@x>"), people["member"], [people["colleague"]], save_sent=False)
    factory = sessions(store.engine)
    with factory() as db, db.begin():
        first, second = db.scalars(select(Message).order_by(Message.id)).all()
        db.execute(update(Message).where(Message.id == second.id).values(blob_id=first.blob_id))
    colleague = store.login(people["colleague"], PASSWORD)
    with pytest.raises(IntegrityError):
        store.open_message(colleague, "INBOX", 2).read()
    # Another account's wrapped key does not open for this account.
    store.deliver(mail("third", msgid="<m3@x>"), people["member"], [people["member2"]], save_sent=False)
    with factory() as db, db.begin():
        other = db.scalar(select(MessageCopy).order_by(MessageCopy.id.desc()).limit(1))
        db.execute(update(MessageCopy).where(MessageCopy.uid == 1, MessageCopy.id != other.id).values(
            wrapped_key=other.wrapped_key, message_id=other.message_id))
    with pytest.raises(IntegrityError):
        store.open_message(colleague, "INBOX", 1).read()


def test_thread_index_links_replies(store: Store, people: dict[str, str]) -> None:
    store.deliver(mail(msgid="<start@dental.test>"), people["member"], [people["colleague"]])
    reply = mail("Re: Hello", msgid="<reply@ortho.test>", In_Reply_To="<start@dental.test>",
                 References="<start@dental.test>")
    store.deliver(reply, people["colleague"], [people["member"]])
    with store._sessions() as s:
        threads = list(s.scalars(select(Message.thread_id).order_by(Message.id)))
        hashes = list(s.scalars(select(Message.mid_hash)))
    assert threads[0] == threads[1]
    assert all(h is not None and b"dental" not in h for h in hashes)


def test_concurrent_appends_get_distinct_ascending_uids(config, people: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    stores = [open_store(config) for _ in range(3)]
    s = stores[0].login(people["member"], PASSWORD)
    got: list[int] = []
    lock = threading.Lock()

    def work(st: Store) -> None:
        for _ in range(5):
            uid = st.append(s, "INBOX", b"Subject: x\r\n\r\nbody\r\n").uid
            with lock:
                got.append(uid)

    workers = [threading.Thread(target=work, args=(st,)) for st in stores]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert sorted(got) == list(range(1, 16))
    assert [m.uid for m in stores[0].snapshot(s, "INBOX").messages] == list(range(1, 16))
    for st in stores:
        st.close()


def test_database_blob_store_round_trip(config, people: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    from postvault.store.api import KdfSettings

    db_store = Store.open(config.store.url, "database", KdfSettings())
    big = mail(body="x" * (3 * 1024 * 1024))
    db_store.deliver(big, people["member"], [people["colleague"]])
    s = db_store.login(people["colleague"], PASSWORD)
    reader = db_store.open_message(s, "INBOX", 1)
    assert reader.read() == big
    reader.seek(len(big) - 100)
    assert reader.read() == big[-100:]
    db_store.close()


def test_account_row_holds_no_plain_private_key(store: Store, people: dict[str, str]) -> None:
    s = store.login(people["member"], PASSWORD)
    with store._sessions() as db:
        row = db.scalar(select(Account).where(Account.email == people["member"]))
    assert s.private_key not in row.wrapped_private_key
    assert "private_key" not in repr(s)


def test_unknown_user_spends_a_bcrypt_check_like_a_wrong_password(
    store: Store, people: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: "acct is None or not verify(...)" skipped bcrypt for unknown
    # addresses, so they failed ~250 ms faster than wrong passwords.
    import bcrypt

    from postvault.store import passwords

    passwords._dummy_hash()
    calls: list[int] = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda pw, h: (calls.append(1), real(pw, h))[1])
    with pytest.raises(AuthenticationFailed):
        store.login(people["member"], "not the password at all")
    with pytest.raises(AuthenticationFailed):
        store.login("ghost@dental.test", "not the password at all")
    assert len(calls) == 2


def test_dummy_hash_cost_does_not_fall_on_first_unknown_user(monkeypatch: pytest.MonkeyPatch) -> None:
    import bcrypt

    from postvault.store import passwords

    stored = passwords.hash_password("pw", rounds=4)
    passwords._dummy_hash.cache_clear()
    passwords.verify_password("pw", stored)
    hashed: list[int] = []
    monkeypatch.setattr(bcrypt, "hashpw", lambda *a: hashed.append(1))
    assert passwords.verify_password("pw", None) is False
    assert hashed == []  # the dummy was made by the first login, whoever it was


def test_undecodable_password_fails_cleanly_and_quotes_nothing(store: Store, people: dict[str, str]) -> None:
    # A lone surrogate (invalid UTF-8 decoded with surrogateescape) used to
    # raise UnicodeEncodeError carrying the password, instead of failing login.
    for who in (people["member"], "ghost@dental.test"):
        with pytest.raises(AuthenticationFailed) as exc:
            store.login(who, "secr\udcc3t")
        assert "secr" not in repr(exc.value) and "udcc3" not in str(exc.value)
    store.create_account("odd@dental.test", "member", "Odd", "pass\udcffword")
    assert store.login("odd@dental.test", "pass\udcffword").email == "odd@dental.test"


def test_refused_blob_is_closed(store: Store, people: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    store.deliver(mail(), people["member"], [people["colleague"]], save_sent=False)
    opened: list[io.BytesIO] = []

    def bad_open(blob_id: str) -> io.BytesIO:
        opened.append(io.BytesIO(b"not a sealed blob at all"))
        return opened[-1]

    monkeypatch.setattr(store.blobs, "open", bad_open)
    s = store.login(people["colleague"], PASSWORD)
    with pytest.raises(IntegrityError):
        store.open_message(s, "INBOX", 1)
    assert opened and opened[0].closed


def test_open_messages_opens_a_batch_and_refuses_only_the_damaged_one(store: Store, people: dict[str, str]) -> None:
    raws = [mail(f"batch {i}", body=f"letter {i}\n", msgid=f"<b{i}@x>") for i in range(4)]
    for raw in raws:
        store.deliver(raw, people["member"], [people["colleague"]], save_sent=False)
    # UID 2's wrapped key is damaged: the batch unwrap stops there, and
    # open_messages must still open 1, 3 and 4 and refuse only 2.
    factory = sessions(store.engine)
    with factory() as db, db.begin():
        copy = db.scalar(select(MessageCopy).where(MessageCopy.uid == 2))
        key = bytearray(copy.wrapped_key)
        key[-1] ^= 1
        db.execute(update(MessageCopy).where(MessageCopy.id == copy.id).values(wrapped_key=bytes(key)))
    colleague = store.login(people["colleague"], PASSWORD)
    got = {}
    for uid, reader in store.open_messages(colleague, "INBOX", [4, 2, 1, 3, 99]):
        if isinstance(reader, IntegrityError):
            got[uid] = None
            continue
        with reader:
            got[uid] = reader.read()
    assert list(got) == [1, 2, 3, 4]  # UID order; 99 is not in the folder
    assert got == {1: raws[0], 2: None, 3: raws[2], 4: raws[3]}
    assert list(store.open_messages(colleague, "INBOX", [])) == []


def test_content_key_cache_is_bounded_and_filled_by_reads(store: Store, people: dict[str, str]) -> None:
    from postvault.store.types import ContentKeyCache

    cache = ContentKeyCache(limit=2)
    for i in range(3):
        cache.put(f"m{i}", bytes([i]) * 32)
    assert len(cache) == 2 and cache.get("m0") is None and cache.get("m2") == b"\x02" * 32
    cache.get("m1")  # used last: m2 goes first
    cache.put("m3", b"\x03" * 32)
    assert cache.get("m2") is None and cache.get("m1") == b"\x01" * 32
    cache.clear()
    assert len(cache) == 0

    raws = [mail(f"cached {i}", msgid=f"<c{i}@x>") for i in range(3)]
    for raw in raws:
        store.deliver(raw, people["member"], [people["colleague"]], save_sent=False)
    colleague = store.login(people["colleague"], PASSWORD)
    keys = ContentKeyCache(limit=10)
    assert set(store.summaries(colleague, "INBOX", [1, 2, 3], keys)) == {1, 2, 3}
    assert len(keys) == 3
    # The same plaintext whether the keys come from the cache or not.
    for uid, reader in store.open_messages(colleague, "INBOX", [1, 2, 3], keys):
        assert not isinstance(reader, IntegrityError)
        with reader:
            assert reader.read() == raws[uid - 1]
    assert store.open_message(colleague, "INBOX", 2, keys).read() == raws[1]
    assert len(keys) == 3
