"""The development CA that ``postvault init`` makes.

A fresh install needs a certificate before any client can connect, because
every listener is TLS-only (RFC 8314 section 3). ``make_dev_certs`` makes a
one-shot CA and one server certificate signed by it; the admin can import
``ca.pem`` into a mail client (or the OS trust store) for testing, and later
replace ``server.pem``/``server.key`` with a certificate from a real CA.

The CA's private key exists only in memory, inside ``make_dev_certs``, and is
dropped as soon as the server certificate is signed. Nothing ever writes it.
Why: users are told to *trust* ``ca.pem``. An unconstrained CA certificate in
a trust store can vouch for any name (a bank, a webmail provider), so anyone
who later obtained its key could impersonate any site to that user. With the
key gone, the only certificate this CA will ever have signed is our server
certificate, so trusting it trusts exactly that one certificate.

Keys are ECDSA P-256 with SHA-256 signatures: small, fast, and accepted by
every current mail client (RFC 8422 section 5.1.1; RFC 9325 section 4.2
recommends the ECDHE_ECDSA AES-GCM suites this key type enables).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postvault.errors import HomeError, InvalidInput

__all__ = [
    "CA_FILE",
    "MAX_VALIDITY_DAYS",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "DevCerts",
    "make_dev_certs",
    "write_dev_certs",
]

#: File names inside the home folder's ``certs/`` (see DESIGN.md, home folder).
CA_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"

#: Apple platforms reject TLS server certificates valid for more than 825 days,
#: even under a user-installed root ("Requirements for trusted certificates in
#: iOS 13 and macOS 10.15", Apple support HT210176); CA/Browser Forum ballot
#: 193 set the same limit. Mail.app users are a large part of our audience.
MAX_VALIDITY_DAYS = 825

# Start validity a little in the past so a client whose clock runs slightly
# behind does not see a "not yet valid" certificate right after init.
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class DevCerts:
    """PEM bytes of a development CA certificate and the server pair it signed.

    There is deliberately no field for the CA's private key (see the module
    docstring). ``server_key_pem`` is kept out of ``repr`` so it cannot leak
    into logs or tracebacks.
    """

    ca_pem: bytes
    server_pem: bytes
    server_key_pem: bytes = field(repr=False)


def _normalise_hostname(
    hostname: str,
) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Return the hostname as an ASCII DNS name (A-labels), or as an IP address.

    Certificates carry DNS names in their ASCII form (RFC 5280 section
    4.2.1.6, RFC 9525 section 6.3), so internationalised names are converted
    with IDNA. A literal IP address is returned as such so it goes into an
    iPAddress SAN, never a dNSName (RFC 9525 section 6.3 forbids matching IPs
    against DNS names).
    """
    name = hostname.strip()
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    name = name.rstrip(".").lower()
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidInput("hostname is not a valid DNS name") from None
    labels = ascii_name.split(".")
    # RFC 1035 section 2.3.4 lengths, RFC 1123 section 2.1 letter-digit-hyphen
    # labels. No wildcards: a dev certificate names exactly one host.
    if not ascii_name or len(ascii_name) > 253:
        raise InvalidInput("hostname must be 1 to 253 characters long")
    for label in labels:
        if not 1 <= len(label) <= 63:
            raise InvalidInput("hostname labels must be 1 to 63 characters long")
        if label.startswith("-") or label.endswith("-"):
            raise InvalidInput("hostname labels must not start or end with '-'")
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in label):
            raise InvalidInput("hostname may contain only letters, digits, '-' and '.'")
    return ascii_name


def _subject_alt_names(
    host: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[x509.GeneralName]:
    """The server certificate's SANs: the host, then the loopback names.

    Loopback names let a client on the server machine (and our own tests)
    connect without a DNS entry. Duplicates are dropped, e.g. when the
    hostname is ``localhost`` itself.
    """
    wanted: list[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        host,
        "localhost",
        ipaddress.IPv4Address("127.0.0.1"),
        ipaddress.IPv6Address("::1"),
    ]
    names: list[x509.GeneralName] = []
    for item in wanted:
        general: x509.GeneralName
        if isinstance(item, str):
            general = x509.DNSName(item)
        else:
            general = x509.IPAddress(item)
        if general not in names:
            names.append(general)
    return names


def make_dev_certs(hostname: str, *, days: int = MAX_VALIDITY_DAYS) -> DevCerts:
    """Make a development CA and a server certificate for ``hostname``.

    The server certificate names ``hostname``, ``localhost``, ``127.0.0.1``
    and ``::1``. Both certificates are valid for ``days`` days in total
    (1 to 825, counted from an hour ago). The CA's private key is discarded
    before this function returns.

    Raises ``InvalidInput`` for a malformed hostname; ``ValueError`` for
    ``days`` out of range (a programming error, not user input).
    """
    if not 1 <= days <= MAX_VALIDITY_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_VALIDITY_DAYS}")
    host = _normalise_hostname(hostname)
    not_before = datetime.datetime.now(datetime.UTC) - _BACKDATE
    # Total validity (not_after - not_before) is what Apple's 825-day rule
    # measures, so the back-dating comes out of the budget.
    not_after = not_before + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Postvault"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"Postvault development CA ({host})"
            ),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # pathlen 0: even if the key had survived, it could not sign another
        # CA (RFC 5280 section 4.2.1.9). Critical, as RFC 5280 requires for CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        # AKI is optional on a self-signed certificate (RFC 5280 section
        # 4.2.1.1) but strict verifiers (OpenSSL X509_V_FLAG_X509_STRICT,
        # the default from Python 3.13) are happier with it present.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    common_name = str(host)
    server_cert = (
        x509.CertificateBuilder()
        # Clients match names against the SANs only (RFC 9525 section 6.3);
        # the CN is for humans reading the certificate.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDSA keys sign the handshake; there is no key encipherment with
        # (EC)DHE key exchange, so digitalSignature alone (RFC 5480 section 3).
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        # Non-critical because the subject is not empty (RFC 5280 section 4.2.1.6).
        .add_extension(
            x509.SubjectAlternativeName(_subject_alt_names(host)), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    # Drop our only reference to the CA key now that its one job is done
    # (see the module docstring for why it must never be kept).
    del ca_key

    return DevCerts(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_pem=server_cert.public_bytes(serialization.Encoding.PEM),
        server_key_pem=server_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            # Unencrypted: the server must start unattended; the file's 0600
            # mode is its protection.
            encryption_algorithm=serialization.NoEncryption(),
        ),
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` and write ``data``; fail if it exists.

    The mode is given to ``open(2)`` itself, so the file never exists with
    wider permissions, not even between creation and a later chmod. O_EXCL
    refuses existing files and symlinks (also dangling ones), so we can never
    be tricked into writing through a link planted in the folder.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        # A crash right after init must not leave an empty key file behind
        # that we would then refuse to overwrite.
        os.fsync(fd)
    except BaseException:
        # We created it (O_EXCL), so it is ours to remove: a half-written
        # file (disk full) would hold part of a private key and block the
        # next init, and write_dev_certs only cleans up complete files.
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_dev_certs(certs_dir: Path, hostname: str) -> None:
    """Make dev certificates for ``hostname`` and write them to ``certs_dir``.

    Writes ``ca.pem`` and ``server.pem`` (mode 0644, public) and
    ``server.key`` (PKCS#8 PEM, unencrypted, mode 0600). ``server.pem`` holds
    the server certificate only; clients get the CA from ``ca.pem``, and a
    chain does not need the trust anchor (RFC 8446 section 4.4.2).
    ``certs_dir`` is created with mode 0700 if missing.

    Raises ``HomeError`` if any of the three files already exists (nothing
    is written then), ``InvalidInput`` for a malformed hostname.
    """
    certs_dir = Path(certs_dir)
    targets = [
        certs_dir / CA_FILE,
        certs_dir / SERVER_CERT_FILE,
        certs_dir / SERVER_KEY_FILE,
    ]
    # Check everything before writing anything, so a refusal leaves the
    # folder as it was. O_EXCL in _write_new still closes the race.
    for target in targets:
        if os.path.lexists(target):
            raise HomeError(f"{target} already exists; refusing to overwrite it")
    certs = make_dev_certs(hostname)

    if not certs_dir.is_dir():
        try:
            certs_dir.parent.mkdir(parents=True, exist_ok=True)
            certs_dir.mkdir(mode=0o700)
            # mkdir's mode is filtered by the umask; make it exactly 0700.
            certs_dir.chmod(0o700)
        except OSError as exc:
            raise HomeError(f"cannot create {certs_dir}: {exc.strerror}") from exc

    contents = [
        (certs.ca_pem, 0o644),
        (certs.server_pem, 0o644),
        (certs.server_key_pem, 0o600),
    ]
    written: list[Path] = []
    try:
        for target, (data, mode) in zip(targets, contents):
            try:
                _write_new(target, data, mode)
            except FileExistsError:
                raise HomeError(
                    f"{target} already exists; refusing to overwrite it"
                ) from None
            except OSError as exc:
                raise HomeError(f"cannot write {target}: {exc.strerror}") from exc
            written.append(target)
    except HomeError:
        # All or nothing: a half-written set (a CA without its server
        # certificate) would only confuse the next attempt.
        for path in written:
            path.unlink(missing_ok=True)
        raise
