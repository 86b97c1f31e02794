"""The server TLS context: real handshakes, refusals, reload and error messages.

Every refusal test first runs the same client against a deliberately
permissive server and checks that it connects there. That proves the client
really offers what it claims (old versions, CBC suites) on this machine's
OpenSSL, so the refusal by ``server_context`` is a real result, not an
artefact of a client that could never have connected anywhere.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postvault.certs.context import TLSContextHolder, client_context, server_context
from postvault.certs.devca import DevCerts, make_dev_certs, write_dev_certs
from postvault.errors import TLSConfigError

from . import LoopbackTLSServer, handshake

HOST = "mail.example.test"
TLS13_SUITES = {
    "TLS_AES_256_GCM_SHA384",
    "TLS_AES_128_GCM_SHA256",
    "TLS_CHACHA20_POLY1305_SHA256",
}
TLS12_AEAD_SUITES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
}
CBC_ONLY = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA"


@pytest.fixture()
def certs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "certs"
    write_dev_certs(path, HOST)
    return path


@pytest.fixture()
def ours(certs_dir: Path) -> ssl.SSLContext:
    return server_context(certs_dir / "server.pem", certs_dir / "server.key")


@pytest.fixture()
def permissive(certs_dir: Path) -> ssl.SSLContext:
    """A server that accepts anything this OpenSSL can speak: the control."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(certs_dir / "server.pem", certs_dir / "server.key")
    return ctx


def _client(
    certs_dir: Path,
    minimum: str,
    maximum: str,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A verifying client limited to the named TLSVersion range (and suites)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs_dir / "ca.pem")
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    ctx.minimum_version = getattr(ssl.TLSVersion, minimum)
    ctx.maximum_version = getattr(ssl.TLSVersion, maximum)
    return ctx


def _refused(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLError:
    """Handshake and return the server-side error; fail if it connected."""
    with LoopbackTLSServer(server_ctx) as server:
        try:
            result = handshake(client_ctx, server.port)
        except ssl.SSLError:
            pass
        else:
            pytest.fail(f"server accepted {result.version} {result.cipher}")
        outcome = server.next_outcome()
    assert isinstance(outcome.error, ssl.SSLError), outcome
    return outcome.error


# --- what is accepted ------------------------------------------------------


def test_tls13_client_connects(certs_dir: Path, ours: ssl.SSLContext) -> None:
    with LoopbackTLSServer(ours) as server:
        result = handshake(_client(certs_dir, "TLSv1_3", "TLSv1_3"), server.port)
        assert server.next_outcome().error is None
    assert result.version == "TLSv1.3"
    assert result.cipher in TLS13_SUITES
    assert result.compression is None


def test_default_client_gets_tls13(certs_dir: Path, ours: ssl.SSLContext) -> None:
    # TLS 1.3 preferred: a client offering 1.2 and 1.3 ends up on 1.3.
    with LoopbackTLSServer(ours) as server:
        result = handshake(client_context(certs_dir / "ca.pem"), server.port)
    assert result.version == "TLSv1.3"


def test_tls12_client_connects_with_ecdhe_aead(
    certs_dir: Path, ours: ssl.SSLContext
) -> None:
    with LoopbackTLSServer(ours) as server:
        result = handshake(_client(certs_dir, "TLSv1_2", "TLSv1_2"), server.port)
        outcome = server.next_outcome()
    assert result.version == "TLSv1.2" == outcome.version
    assert result.cipher in TLS12_AEAD_SUITES
    assert result.cipher.startswith("ECDHE-")
    assert result.compression is None and outcome.compression is None


@pytest.mark.parametrize("suite", sorted(TLS12_AEAD_SUITES))
def test_each_tls12_aead_suite_is_accepted(
    certs_dir: Path, ours: ssl.SSLContext, suite: str
) -> None:
    with LoopbackTLSServer(ours) as server:
        result = handshake(_client(certs_dir, "TLSv1_2", "TLSv1_2", suite), server.port)
    assert result.cipher == suite


def test_server_order_wins_in_tls12(certs_dir: Path, ours: ssl.SSLContext) -> None:
    client = _client(
        certs_dir,
        "TLSv1_2",
        "TLSv1_2",
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
    )
    with LoopbackTLSServer(ours) as server:
        result = handshake(client, server.port)
    assert result.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_no_session_tickets(
    certs_dir: Path, ours: ssl.SSLContext, permissive: ssl.SSLContext, version: str
) -> None:
    client = _client(certs_dir, version, version)
    with LoopbackTLSServer(permissive) as server:
        control = handshake(client, server.port)
    assert control.session is not None and control.session.has_ticket, (
        "control got no ticket"
    )
    with LoopbackTLSServer(ours) as server:
        result = handshake(client, server.port)
    assert result.session is None or not result.session.has_ticket


# --- what is refused -------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    ("minimum", "maximum"),
    [("TLSv1_1", "TLSv1_1"), ("TLSv1", "TLSv1_1"), ("TLSv1", "TLSv1")],
)
def test_old_protocol_versions_are_refused(
    certs_dir: Path,
    ours: ssl.SSLContext,
    permissive: ssl.SSLContext,
    minimum: str,
    maximum: str,
) -> None:
    # SECLEVEL=0 lets this OpenSSL offer the SHA-1 based pre-1.2 handshakes.
    client = _client(certs_dir, minimum, maximum, "DEFAULT:@SECLEVEL=0")
    with LoopbackTLSServer(permissive) as server:
        try:
            control = handshake(client, server.port)
        except ssl.SSLError as exc:
            pytest.skip(f"this OpenSSL cannot speak {minimum}..{maximum} at all: {exc}")
    assert control.version in {"TLSv1", "TLSv1.1"}

    error = _refused(ours, client)
    # Refused for its version, not for some other accident (e.g. ciphers).
    assert error.reason in {"UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW"}, error


def test_cbc_only_tls12_client_is_refused(
    certs_dir: Path, ours: ssl.SSLContext, permissive: ssl.SSLContext
) -> None:
    client = _client(certs_dir, "TLSv1_2", "TLSv1_2", CBC_ONLY)
    with LoopbackTLSServer(permissive) as server:
        control = handshake(client, server.port)
    assert (
        control.version == "TLSv1.2"
        and "GCM" not in control.cipher
        and "CHACHA" not in control.cipher
    )

    error = _refused(ours, client)
    assert error.reason == "NO_SHARED_CIPHER", error


def test_context_settings(ours: ssl.SSLContext) -> None:
    assert ours.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ours.maximum_version == ssl.TLSVersion.TLSv1_3
    for option in (
        ssl.OP_NO_COMPRESSION,
        ssl.OP_NO_RENEGOTIATION,
        ssl.OP_CIPHER_SERVER_PREFERENCE,
        ssl.OP_SINGLE_DH_USE,
        ssl.OP_SINGLE_ECDH_USE,
        ssl.OP_NO_TICKET,
    ):
        assert ours.options & option == option, option
    assert ours.num_tickets == 0
    assert ours.verify_mode == ssl.CERT_NONE
    suites = ours.get_ciphers()
    assert suites
    for suite in suites:
        assert suite["aead"], suite["name"]
        if suite["protocol"] == "TLSv1.2":
            assert suite["kea"] == "kx-ecdhe", suite["name"]
        else:
            assert suite["protocol"] == "TLSv1.3", suite["name"]


def test_client_context_settings(certs_dir: Path) -> None:
    ctx = client_context(certs_dir / "ca.pem")
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    # Only our CA is trusted, not the system roots.
    assert ctx.cert_store_stats()["x509_ca"] == 1


# --- reload ----------------------------------------------------------------


def _install(certs_dir: Path, certs: DevCerts) -> None:
    """Replace server.pem and server.key, as an admin renewing them would."""
    for name, data in (
        ("server.pem", certs.server_pem),
        ("server.key", certs.server_key_pem),
    ):
        tmp = certs_dir / f".{name}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, certs_dir / name)


def _san_names(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.DNSName)


def _trusting(tmp_path: Path, certs: DevCerts) -> ssl.SSLContext:
    ca_file = tmp_path / "new-ca.pem"
    ca_file.write_bytes(certs.ca_pem)
    return client_context(ca_file)


@pytest.mark.parametrize(
    "cached", [False, True], ids=["per-connection", "cached-context"]
)
@pytest.mark.parametrize(
    "server_hostname", ["localhost", "127.0.0.1"], ids=["sni", "no-sni"]
)
def test_reload_serves_the_new_certificate(
    certs_dir: Path, tmp_path: Path, cached: bool, server_hostname: str
) -> None:
    holder = TLSContextHolder(certs_dir / "server.pem", certs_dir / "server.key")
    old_client = client_context(certs_dir / "ca.pem")
    # "per-connection" asks the holder at each accept, as listeners should;
    # "cached-context" keeps the first context, as asyncio/aiosmtpd do, and
    # relies on the holder's SNI hook (called with or without SNI).
    source = holder.context if cached else (lambda: holder.context)
    new = make_dev_certs("renewed.example.test")
    with LoopbackTLSServer(source) as server:
        before = handshake(old_client, server.port, server_hostname)
        assert HOST in _san_names(before.peer_cert)

        _install(certs_dir, new)
        holder.reload()

        after = handshake(_trusting(tmp_path, new), server.port, server_hostname)
        assert "renewed.example.test" in _san_names(after.peer_cert)
        assert (
            after.peer_cert.public_bytes(serialization.Encoding.PEM) == new.server_pem
        )
        # Clients that trust only the old CA now fail: the old cert is gone.
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(old_client, server.port, server_hostname)


def test_failed_reload_keeps_the_old_context(certs_dir: Path) -> None:
    key_file = certs_dir / "server.key"
    holder = TLSContextHolder(certs_dir / "server.pem", key_file)
    old = holder.context
    key_file.write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(TLSConfigError) as info:
        holder.reload()
    assert str(key_file) in str(info.value)
    assert holder.context is old
    with LoopbackTLSServer(lambda: holder.context) as server:
        result = handshake(client_context(certs_dir / "ca.pem"), server.port)
    assert HOST in _san_names(result.peer_cert)


def test_reload_with_mismatched_pair_keeps_the_old_context(certs_dir: Path) -> None:
    holder = TLSContextHolder(certs_dir / "server.pem", certs_dir / "server.key")
    old = holder.context
    # A renewal that replaced the certificate but forgot the key.
    (certs_dir / "server.pem").write_bytes(
        make_dev_certs("renewed.example.test").server_pem
    )
    with pytest.raises(TLSConfigError, match="does not match"):
        holder.reload()
    assert holder.context is old


def test_holder_raises_at_construction(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="does not exist"):
        TLSContextHolder(tmp_path / "server.pem", tmp_path / "server.key")


# --- error messages --------------------------------------------------------


def _key_lines(key_file: Path) -> list[str]:
    return [
        line
        for line in key_file.read_text().splitlines()
        if not line.startswith("-----")
    ]


def _assert_no_key_material(error: TLSConfigError, *key_files: Path) -> None:
    message = str(error)
    for key_file in key_files:
        for line in _key_lines(key_file):
            assert line not in message
    # No chained parser exception that a traceback would print either.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_missing_certificate_file(certs_dir: Path) -> None:
    missing = certs_dir / "nope.pem"
    with pytest.raises(TLSConfigError) as info:
        server_context(missing, certs_dir / "server.key")
    assert str(missing) in str(info.value)
    assert "certificate" in str(info.value) and "does not exist" in str(info.value)


def test_missing_key_file(certs_dir: Path) -> None:
    missing = certs_dir / "nope.key"
    with pytest.raises(TLSConfigError) as info:
        server_context(certs_dir / "server.pem", missing)
    assert str(missing) in str(info.value)
    assert "private key" in str(info.value) and "does not exist" in str(info.value)


def test_mismatched_key(certs_dir: Path, tmp_path: Path) -> None:
    other_key = tmp_path / "other.key"
    other_key.write_bytes(make_dev_certs(HOST).server_key_pem)
    with pytest.raises(TLSConfigError) as info:
        server_context(certs_dir / "server.pem", other_key)
    message = str(info.value)
    assert str(other_key) in message and str(certs_dir / "server.pem") in message
    assert "does not match" in message
    _assert_no_key_material(info.value, other_key, certs_dir / "server.key")


def test_garbage_certificate(certs_dir: Path) -> None:
    bad = certs_dir / "garbage.pem"
    bad.write_bytes(b"this is not a certificate\n")
    with pytest.raises(TLSConfigError) as info:
        server_context(bad, certs_dir / "server.key")
    assert str(bad) in str(info.value) and "valid PEM certificate" in str(info.value)


def test_key_in_place_of_certificate(certs_dir: Path) -> None:
    with pytest.raises(TLSConfigError) as info:
        server_context(certs_dir / "server.key", certs_dir / "server.key")
    assert str(certs_dir / "server.key") in str(info.value)
    _assert_no_key_material(info.value, certs_dir / "server.key")


def test_garbage_key_is_not_echoed(certs_dir: Path) -> None:
    bad = certs_dir / "garbage.key"
    bad.write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nU0VDUkVULU1BVEVSSUFM\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(TLSConfigError) as info:
        server_context(certs_dir / "server.pem", bad)
    assert str(bad) in str(info.value) and "valid PEM private key" in str(info.value)
    _assert_no_key_material(info.value, bad)


def test_encrypted_key_is_refused_without_prompting(certs_dir: Path) -> None:
    # OpenSSL would otherwise ask for a pass phrase on the terminal and hang.
    key = serialization.load_pem_private_key(
        (certs_dir / "server.key").read_bytes(), None
    )
    encrypted = certs_dir / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass phrase"),
        )
    )
    with pytest.raises(TLSConfigError) as info:
        server_context(certs_dir / "server.pem", encrypted)
    assert str(encrypted) in str(info.value) and "encrypted" in str(info.value)


@pytest.mark.parametrize("which", ["server.pem", "server.key"])
def test_empty_file(certs_dir: Path, which: str) -> None:
    (certs_dir / which).write_bytes(b"")
    with pytest.raises(TLSConfigError, match="is empty") as info:
        server_context(certs_dir / "server.pem", certs_dir / "server.key")
    assert str(certs_dir / which) in str(info.value)


def test_directory_in_place_of_a_file(certs_dir: Path) -> None:
    with pytest.raises(TLSConfigError, match="is a directory") as info:
        server_context(certs_dir, certs_dir / "server.key")
    assert str(certs_dir) in str(info.value)


def test_weak_rsa_key_is_refused(tmp_path: Path) -> None:
    # @SECLEVEL=2 refuses keys under 112-bit strength even from an admin's
    # own certificate; the error still names the files.
    import datetime

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    try:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    except ValueError:
        pytest.skip("this cryptography build refuses to make 1024-bit RSA keys")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "weak.pem", tmp_path / "weak.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TLSConfigError) as info:
        server_context(cert_file, key_file)
    assert str(cert_file) in str(info.value)
    assert "KEY_TOO_SMALL" in str(info.value)
    _assert_no_key_material(info.value, key_file)


def test_client_context_errors(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    with pytest.raises(TLSConfigError, match="does not exist") as info:
        client_context(missing)
    assert str(missing) in str(info.value)
    missing.write_bytes(b"not a certificate")
    with pytest.raises(TLSConfigError, match="valid PEM certificate"):
        client_context(missing)
