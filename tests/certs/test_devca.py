"""The development CA: certificate contents, files on disk, real handshakes."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postvault.certs import devca
from postvault.certs.context import client_context, server_context
from postvault.certs.devca import DevCerts, make_dev_certs, write_dev_certs
from postvault.errors import HomeError, InvalidInput

from . import LoopbackTLSServer, handshake

HOST = "mail.example.test"


@pytest.fixture(scope="module")
def certs() -> DevCerts:
    return make_dev_certs(HOST)


def _leaf(certs: DevCerts) -> x509.Certificate:
    return x509.load_pem_x509_certificate(certs.server_pem)


def _ca(certs: DevCerts) -> x509.Certificate:
    return x509.load_pem_x509_certificate(certs.ca_pem)


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )


# --- certificate contents --------------------------------------------------


def test_server_sans_are_exactly_host_and_loopback(certs: DevCerts) -> None:
    assert _sans(_leaf(certs)) == [
        x509.DNSName(HOST),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]


def test_server_certificate_extensions(certs: DevCerts) -> None:
    leaf, ca = _leaf(certs), _ca(certs)
    public_key = leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)

    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False

    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not (
        ku.value.key_cert_sign
        or ku.value.crl_sign
        or ku.value.key_encipherment
        or ku.value.content_commitment
        or ku.value.data_encipherment
        or ku.value.key_agreement
    )

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest

    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)


def test_ca_certificate_extensions(certs: DevCerts) -> None:
    ca = _ca(certs)
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert ca.subject == ca.issuer
    cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"Postvault development CA ({HOST})"

    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0

    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature

    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    ca.verify_directly_issued_by(ca)


def test_validity_is_at_most_825_days_and_current(certs: DevCerts) -> None:
    now = datetime.datetime.now(datetime.UTC)
    for cert in (_leaf(certs), _ca(certs)):
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        assert end - start <= datetime.timedelta(days=825)
        assert start <= now < end
        assert end - now > datetime.timedelta(days=800)


def test_days_is_honoured_and_bounded() -> None:
    short = _leaf(make_dev_certs(HOST, days=30))
    assert short.not_valid_after_utc - short.not_valid_before_utc == datetime.timedelta(
        days=30
    )
    for bad in (0, -1, 826, 3650):
        with pytest.raises(ValueError):
            make_dev_certs(HOST, days=bad)


def test_server_key_matches_certificate_and_is_pkcs8(certs: DevCerts) -> None:
    assert certs.server_key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(certs.server_key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == _leaf(
        certs
    ).public_key().public_bytes(der, spki)


def test_repr_does_not_show_the_key(certs: DevCerts) -> None:
    text = repr(certs)
    assert "PRIVATE KEY" not in text
    assert "server_key_pem" not in text


def test_no_ca_private_key_is_returned(certs: DevCerts) -> None:
    # The result has exactly one private key, and it is the server's: the CA
    # key is not part of what make_dev_certs hands out.
    assert [f for f in DevCerts.__dataclass_fields__] == [
        "ca_pem",
        "server_pem",
        "server_key_pem",
    ]
    assert b"PRIVATE KEY" not in certs.ca_pem + certs.server_pem
    key = serialization.load_pem_private_key(certs.server_key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) != _ca(
        certs
    ).public_key().public_bytes(der, spki)


def test_each_call_makes_a_new_ca(certs: DevCerts) -> None:
    other = make_dev_certs(HOST)
    assert _ca(other).public_key() != _ca(certs).public_key()
    assert _ca(other).serial_number != _ca(certs).serial_number


def test_hostname_localhost_is_not_duplicated() -> None:
    assert _sans(_leaf(make_dev_certs("localhost"))) == [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]


def test_ip_hostname_becomes_an_ip_san() -> None:
    sans = _sans(_leaf(make_dev_certs("192.0.2.10")))
    assert sans[0] == x509.IPAddress(ipaddress.IPv4Address("192.0.2.10"))
    assert x509.DNSName("192.0.2.10") not in sans


def test_hostname_is_normalised_to_ascii() -> None:
    sans = _sans(_leaf(make_dev_certs("Mail.Bücher.Example.")))
    assert sans[0] == x509.DNSName("mail.xn--bcher-kva.example")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "bad_name.example",
        "-lead.example",
        "trail-.example",
        "a..b",
        "*.example.test",
        "a" * 64 + ".example",
        "spa ce.example",
    ],
)
def test_bad_hostnames_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        make_dev_certs(bad)


# --- files on disk ---------------------------------------------------------


@pytest.fixture()
def zero_umask() -> Iterator[None]:
    # With umask 0, any file created without an explicit mode would come
    # out 0666: the key's 0600 must come from how it is created.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_creates_files_with_safe_modes(tmp_path: Path, zero_umask: None) -> None:
    certs_dir = tmp_path / "home" / "certs"
    write_dev_certs(certs_dir, HOST)
    assert sorted(p.name for p in certs_dir.iterdir()) == [
        "ca.pem",
        "server.key",
        "server.pem",
    ]
    assert _mode(certs_dir) == 0o700
    assert _mode(certs_dir / "server.key") == 0o600
    assert _mode(certs_dir / "ca.pem") == 0o644
    assert _mode(certs_dir / "server.pem") == 0o644


def test_key_file_is_created_0600_by_open_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "Never world-readable even briefly": the mode must be given to open(2)
    # with O_CREAT|O_EXCL, not fixed afterwards with chmod.
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(
        path: os.PathLike[str] | str, flags: int, mode: int = 0o777, **kw: object
    ) -> int:
        calls.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    write_dev_certs(tmp_path / "certs", HOST)
    key_calls = [c for c in calls if c[0].endswith("server.key")]
    assert len(key_calls) == 1
    _, flags, mode = key_calls[0]
    assert mode == 0o600
    assert flags & os.O_CREAT and flags & os.O_EXCL


def test_written_files_match_and_only_the_server_key_is_written(tmp_path: Path) -> None:
    certs_dir = tmp_path / "certs"
    write_dev_certs(certs_dir, HOST)
    ca = x509.load_pem_x509_certificates((certs_dir / "ca.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((certs_dir / "server.pem").read_bytes())
    assert len(ca) == 1 and len(chain) == 1
    chain[0].verify_directly_issued_by(ca[0])

    # The CA key is written nowhere: the only private key anywhere under the
    # home folder is the server key, and it is not the CA's key.
    holders = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    ]
    assert holders == [certs_dir / "server.key"]
    key = serialization.load_pem_private_key(
        (certs_dir / "server.key").read_bytes(), password=None
    )
    assert key.public_key() == chain[0].public_key()
    assert key.public_key() != ca[0].public_key()


def test_existing_certs_dir_is_used(tmp_path: Path) -> None:
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir(mode=0o750)
    write_dev_certs(certs_dir, HOST)
    assert (certs_dir / "server.key").exists()


@pytest.mark.parametrize("existing", ["ca.pem", "server.pem", "server.key"])
def test_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    (certs_dir / existing).write_bytes(b"keep me")
    with pytest.raises(HomeError, match=existing):
        write_dev_certs(certs_dir, HOST)
    # Nothing else was written, and the existing file is untouched.
    assert [p.name for p in certs_dir.iterdir()] == [existing]
    assert (certs_dir / existing).read_bytes() == b"keep me"


def test_refuses_a_second_run(tmp_path: Path) -> None:
    certs_dir = tmp_path / "certs"
    write_dev_certs(certs_dir, HOST)
    before = {p.name: p.read_bytes() for p in certs_dir.iterdir()}
    with pytest.raises(HomeError):
        write_dev_certs(certs_dir, "other.example.test")
    assert {p.name: p.read_bytes() for p in certs_dir.iterdir()} == before


def test_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    # A planted link must not make us write the key somewhere else.
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    target = tmp_path / "elsewhere.key"
    (certs_dir / "server.key").symlink_to(target)
    with pytest.raises(HomeError):
        write_dev_certs(certs_dir, HOST)
    assert not target.exists()


def test_race_on_a_later_file_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # If server.key appears between the up-front check and its creation,
    # O_EXCL refuses it and the files already written are removed again.
    certs_dir = tmp_path / "certs"
    real_write_new = devca._write_new

    def racing(path: Path, data: bytes, mode: int) -> None:
        if path.name == "server.key":
            path.write_bytes(b"theirs")
        real_write_new(path, data, mode)

    monkeypatch.setattr(devca, "_write_new", racing)
    with pytest.raises(HomeError, match="server.key"):
        write_dev_certs(certs_dir, HOST)
    assert [p.name for p in certs_dir.iterdir()] == ["server.key"]
    assert (certs_dir / "server.key").read_bytes() == b"theirs"


# --- the chain in real handshakes ------------------------------------------


@pytest.fixture()
def written(tmp_path: Path) -> Path:
    certs_dir = tmp_path / "certs"
    write_dev_certs(certs_dir, HOST)
    return certs_dir


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", HOST])
def test_client_verifies_chain_and_name(written: Path, server_hostname: str) -> None:
    server_ctx = server_context(written / "server.pem", written / "server.key")
    with LoopbackTLSServer(server_ctx) as server:
        result = handshake(
            client_context(written / "ca.pem"), server.port, server_hostname
        )
        assert server.next_outcome().error is None
    assert (
        result.peer_cert.public_bytes(serialization.Encoding.PEM)
        == (written / "server.pem").read_bytes()
    )


def test_client_rejects_a_name_not_in_the_certificate(written: Path) -> None:
    # Without this, the test above could pass with verification switched off.
    server_ctx = server_context(written / "server.pem", written / "server.key")
    with (
        LoopbackTLSServer(server_ctx) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"),
    ):
        handshake(client_context(written / "ca.pem"), server.port, "other.example.test")


def test_client_rejects_another_dev_ca(written: Path, tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    write_dev_certs(other_dir, HOST)
    server_ctx = server_context(written / "server.pem", written / "server.key")
    with (
        LoopbackTLSServer(server_ctx) as server,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        handshake(client_context(other_dir / "ca.pem"), server.port, "localhost")


def test_failed_write_leaves_no_partial_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: a write that fails half-way (disk full) used to leave a partial
    # server.key behind, which also made every later init refuse to run.
    certs_dir = tmp_path / "certs"
    real_write = os.write

    def failing_write(fd: int, data: bytes) -> int:
        if b"PRIVATE KEY" in bytes(data):
            real_write(fd, bytes(data)[:40])
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(HomeError, match="server.key"):
        write_dev_certs(certs_dir, HOST)
    assert list(certs_dir.iterdir()) == []
