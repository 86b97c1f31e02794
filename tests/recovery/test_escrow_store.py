"""Recovery escrow and emergency access through the store API, with real
GnuPG on both sides: Postvault encrypts to the officer's public key, the
officer decrypts with ``gpg --decrypt`` in a subprocess."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from postvault.conf.load import load_config
from postvault.errors import (
    AccessExpired,
    AuthenticationFailed,
    ConfigError,
    EscrowError,
    InvalidInput,
    ReadOnlyAccess,
)
from postvault.home import open_store
from postvault.store.api import Store
from postvault.store.models import AuditEvent, EmergencyGrant, RecoveryEscrow
from tests.conftest import PASSWORD
from tests.store.test_store_api import mail

from .conftest import Officer, configure_recovery, make_officer

MEMBER = "office@dental.test"
OTHER = "front@clinic.test"
NEW_PASSWORD = "a brand new passphrase 2024"


def events(store: Store, name: str) -> list[AuditEvent]:
    with store._sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == name).order_by(AuditEvent.id)))


def escrow_of(store: Store, officer: Officer, email: str) -> bytes:
    export = store.export_escrow(email)
    assert export.blob.startswith(b"-----BEGIN PGP MESSAGE-----")
    return officer.decrypt(export.blob)


def test_escrow_is_made_at_creation_and_recovery_keeps_mail(escrow_store: Store, officer: Officer) -> None:
    store = escrow_store
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    store.create_account(OTHER, "member", "Family Clinic", PASSWORD)
    store.deliver(mail("Before the reset"), OTHER, [MEMBER])
    assert store.escrow_states() == {MEMBER: "current", OTHER: "current"}
    assert [e.account for e in events(store, "escrow.create")] == [MEMBER, OTHER]

    decrypted = escrow_of(store, officer, MEMBER)
    assert decrypted.count(b"\n") == 1 and decrypted.endswith(b"\n")  # one line, for `-` on stdin
    store.recover_account(MEMBER, decrypted, NEW_PASSWORD)

    with pytest.raises(AuthenticationFailed):
        store.login(MEMBER, PASSWORD)
    session = store.login(MEMBER, NEW_PASSWORD)
    assert store.open_message(session, "INBOX", 1).read() == mail("Before the reset")
    [event] = events(store, "account.recover")
    assert (event.actor, event.account, event.detail) == ("admin", MEMBER, "with=escrow")
    # The key pair did not change, so the escrow is still current.
    assert store.escrow_states()[MEMBER] == "current"


def test_wrong_or_damaged_escrow_is_refused_and_nothing_changes(escrow_store: Store, officer: Officer) -> None:
    store = escrow_store
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    store.create_account(OTHER, "member", "Family Clinic", PASSWORD)
    fingerprint = store.login_fingerprint(MEMBER)
    others = escrow_of(store, officer, OTHER)
    with pytest.raises(EscrowError, match=f"belongs to another account \\({OTHER}\\), not {MEMBER}"):
        store.recover_account(MEMBER, others, NEW_PASSWORD)
    with pytest.raises(EscrowError, match="still encrypted"):
        store.recover_account(MEMBER, store.export_escrow(MEMBER).blob, NEW_PASSWORD)
    with pytest.raises(EscrowError, match="not a decrypted Postvault escrow"):
        store.recover_account(MEMBER, b"hello\n", NEW_PASSWORD)
    # A forged document: the right account, someone else's key.
    mine = escrow_of(store, officer, MEMBER)
    doc = json.loads(mine)
    doc["private_key"] = json.loads(others)["private_key"]
    forged = json.dumps(doc).encode()
    with pytest.raises(EscrowError, match="does not belong to its public key"):
        store.recover_account(MEMBER, forged, NEW_PASSWORD)
    assert store.login_fingerprint(MEMBER) == fingerprint
    store.login(MEMBER, PASSWORD)
    assert events(store, "account.recover") == []


def test_no_plaintext_private_key_on_disk(escrow_store: Store, officer: Officer, home: Path) -> None:
    store = escrow_store
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    session = store.login(MEMBER, PASSWORD)
    store.grant_emergency_access(MEMBER, escrow_of(store, officer, MEMBER), person="Dr. Cover", reason="leave",
                                 duration=timedelta(hours=1))
    raw = session.private_key
    needles = [raw, base64.b64encode(raw), base64.b64encode(raw).rstrip(b"=")]
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n in data for n in needles), path
    # Postvault's GnuPG home holds the officer's public key only.
    gnupg = home / "data" / "gnupg"
    assert gnupg.stat().st_mode & 0o777 == 0o700
    secrets = gnupg / "private-keys-v1.d"
    assert not secrets.exists() or not any(secrets.iterdir())


def test_escrow_follows_the_configured_keys(home: Path, officer: Officer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTVAULT_STORE_KDF_ITERATIONS", "1")
    # Escrow off: accounts get none.
    store = open_store(load_config(home))
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    assert store.escrow_states() == {MEMBER: "missing"}
    with pytest.raises(EscrowError, match="has no recovery escrow"):
        store.export_escrow(MEMBER)
    store.close()

    # Turned on later: the next login makes it.
    configure_recovery(home, officer)
    store = open_store(load_config(home))
    assert store.escrow_states() == {MEMBER: "missing"}
    store.login(MEMBER, PASSWORD)
    assert store.escrow_states() == {MEMBER: "current"}
    first = store.export_escrow(MEMBER).recipients
    store.close()

    # A second officer: the escrow is stale until the next login, then
    # both officers can open it.
    for second in make_officer(tmp_path / "second-gnupg", "deputy@dental.test"):
        configure_recovery(home, officer, second)
        store = open_store(load_config(home))
        assert store.escrow_states() == {MEMBER: "stale"}
        store.login(MEMBER, PASSWORD)
        export = store.export_escrow(MEMBER)
        assert export.current and len(export.recipients) == 2 and set(first) < set(export.recipients)
        assert officer.decrypt(export.blob) == second.decrypt(export.blob)
        store.close()


def test_a_secret_key_file_is_refused(home: Path, officer: Officer) -> None:
    (home / "conf" / "recovery").mkdir()
    (home / "conf" / "recovery" / "officer0.asc").write_bytes(officer.secret_key())
    path = home / "conf" / "postvault.toml"
    path.write_text(path.read_text().replace('keys = ""', 'keys = "conf/recovery/officer0.asc"'))
    with pytest.raises(ConfigError, match="holds a SECRET key"):
        open_store(load_config(home))
    (home / "conf" / "recovery" / "officer0.asc").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="holds no OpenPGP public key"):
        open_store(load_config(home))


def test_reset_without_escrow_deletes_the_unreadable_mail(escrow_store: Store) -> None:
    store = escrow_store
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    store.create_account(OTHER, "member", "Family Clinic", PASSWORD)
    store.deliver(mail("Lost with the old key"), OTHER, [MEMBER])
    old = store.export_escrow(MEMBER).blob
    assert store.message_count(MEMBER) == 1
    result = store.reset_account_keys(MEMBER, NEW_PASSWORD)
    assert result.deleted == 1 and store.message_count(MEMBER) == 0
    session = store.login(MEMBER, NEW_PASSWORD)
    assert store.snapshot(session, "INBOX").messages == ()
    # The sender's copy in Sent is untouched; new mail arrives and opens.
    other = store.login(OTHER, PASSWORD)
    assert len(store.snapshot(other, "Sent").messages) == 1
    store.deliver(mail("After the reset", msgid="<m2@dental.test>"), OTHER, [MEMBER])
    uid = store.snapshot(session, "INBOX").messages[0].uid
    assert store.open_message(session, "INBOX", uid).read() == mail("After the reset", msgid="<m2@dental.test>")
    # A new escrow for the new key pair replaced the old one.
    assert store.export_escrow(MEMBER).blob != old and store.escrow_states()[MEMBER] == "current"
    [event] = events(store, "account.reset")
    assert event.detail == "with=new-key-pair deleted=1"


def test_emergency_access_is_read_only_audited_and_ends(escrow_store: Store, officer: Officer) -> None:
    store = escrow_store
    store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    store.create_account(OTHER, "member", "Family Clinic", PASSWORD)
    store.deliver(mail("Lab results"), OTHER, [MEMBER])
    escrow = escrow_of(store, officer, MEMBER)
    with pytest.raises(InvalidInput, match="at most 72 hours"):
        store.grant_emergency_access(MEMBER, escrow, person="Dr. Cover", reason="r", duration=timedelta(hours=73))
    with pytest.raises(EscrowError, match="belongs to another account"):
        store.grant_emergency_access(OTHER, escrow, person="Dr. Cover", reason="r", duration=timedelta(hours=1))
    cred = store.grant_emergency_access(MEMBER, escrow, person="Dr. Jane Cover", reason="owner in hospital",
                                        duration=timedelta(hours=2))
    assert cred.username == f"emergency-{cred.grant_id}" and cred.password not in repr(cred)

    with pytest.raises(AuthenticationFailed):
        store.emergency_login(cred.username, "wrong")
    session = store.emergency_login(cred.username, cred.password)
    assert session.read_only and session.actor == "Dr. Jane Cover" and session.email == MEMBER
    assert store.open_message(session, "INBOX", 1).read() == mail("Lab results")
    for change in (lambda: store.set_flags(session, "INBOX", [1], ["\\Seen"], "add"),
                   lambda: store.append(session, "INBOX", mail("Planted")),
                   lambda: store.expunge(session, "INBOX"),
                   lambda: store.move(session, "INBOX", [1], "Trash"),
                   lambda: store.create_mailbox(session, "Mine")):
        with pytest.raises(ReadOnlyAccess):
            change()
    owner = store.login(MEMBER, PASSWORD)
    assert store.snapshot(owner, "INBOX").messages[0].flags == frozenset()

    [grant_event] = events(store, "emergency.grant")
    assert "Dr. Jane Cover" in grant_event.detail and "owner in hospital" in grant_event.detail
    [login_event] = events(store, "emergency.login")
    assert login_event.actor == "Dr. Jane Cover" and login_event.account == MEMBER
    assert [e.detail.split()[-1] for e in events(store, "emergency.refused")] == ["why=password"]
    [listed] = store.emergency_grants()
    assert listed.first_used_at is not None and listed.state(listed.created_at) == "active"

    # Revocation reaches a session already open, and erases the wrap.
    store.revoke_emergency_access(cred.grant_id)
    with pytest.raises(AccessExpired):
        store.open_message(session, "INBOX", 1)
    with pytest.raises(AuthenticationFailed):
        store.emergency_login(cred.username, cred.password)
    with store._sessions() as s:
        row = s.scalar(select(EmergencyGrant).where(EmergencyGrant.grant_id == cred.grant_id))
        assert row is not None and row.wrapped_private_key is None and row.kdf_params is None
    assert events(store, "emergency.refused")[-1].detail.endswith("why=revoked")

    # Expiry: a grant whose time is up opens nothing and is erased.
    short = store.grant_emergency_access(MEMBER, escrow, person="Dr. Brief", reason="r",
                                         duration=timedelta(hours=1))
    with store._sessions.begin() as s:
        row = s.scalar(select(EmergencyGrant).where(EmergencyGrant.grant_id == short.grant_id))
        assert row is not None
        row.expires_at = row.created_at  # the clock moved on
    with pytest.raises(AuthenticationFailed):
        store.emergency_login(short.username, short.password)
    assert events(store, "emergency.refused")[-1].detail.endswith("why=expired")
    assert [e.detail for e in events(store, "emergency.expired")] == [f"grant={short.grant_id}"]
    # Only IMAP knows these names; a normal login with one fails.
    with pytest.raises(AuthenticationFailed):
        store.login(short.username, short.password)


def test_escrow_rows_hold_only_ciphertext(escrow_store: Store) -> None:
    escrow_store.create_account(MEMBER, "member", "Smile Dental", PASSWORD)
    with escrow_store._sessions() as s:
        [row] = s.scalars(select(RecoveryEscrow))
        assert row.blob.startswith(b"-----BEGIN PGP MESSAGE-----") and b"private_key" not in row.blob


def test_missing_key_file_is_a_config_error(home: Path) -> None:
    path = home / "conf" / "postvault.toml"
    path.write_text(path.read_text().replace('keys = ""', 'keys = "conf/recovery/missing.asc"'))
    with pytest.raises(ConfigError, match=r"recovery\.keys: expected OpenPGP public key files.*no such file"):
        load_config(home)
