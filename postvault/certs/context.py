"""The one place that builds TLS contexts.

Every listener (IMAPS, IMAP STARTTLS, submissions, submission STARTTLS) gets
its ``ssl.SSLContext`` from ``server_context``, normally through a
``TLSContextHolder`` so that SIGHUP can swap certificates without a restart.
The settings follow BCP 195 (RFC 9325); each one says why below.

Errors loading certificates or keys become ``TLSConfigError`` naming the file
and what is wrong with it. Messages never include key material: we use our
own fixed wording rather than repeating parser output.
"""

from __future__ import annotations

import ssl
import threading
import weakref
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from postvault.errors import TLSConfigError

__all__ = ["SERVER_CIPHERS", "TLSContextHolder", "client_context", "server_context"]

#: TLS 1.2 suites: ephemeral ECDH only (forward secrecy, RFC 9325 section
#: 4.1), AEAD only: AES-GCM (RFC 9325 section 4.2) and ChaCha20-Poly1305
#: (RFC 7905, fast on phones without AES hardware). No CBC suites (Lucky13,
#: padding oracles; RFC 7457 section 2.4), no static RSA key transport, no
#: finite-field DHE (RFC 9325 section 4.1; clients cannot check the group).
#: ``@SECLEVEL=2`` makes OpenSSL refuse keys and signatures below 112-bit
#: strength (RSA < 2048, SHA-1), in line with RFC 9325 section 4.5, including
#: in a certificate an admin installs. It applies to TLS 1.2 and 1.3 alike.
#:
#: TLS 1.3 suites are not set here: Python 3.11 cannot, and there is no need,
#: since TLS 1.3 defines AEAD suites only (RFC 8446 section 5.2) and OpenSSL's
#: default set is AES-256-GCM, ChaCha20-Poly1305 and AES-128-GCM.
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:@SECLEVEL=2"


def _refuse_password() -> NoReturn:
    """Password callback for ``load_cert_chain``.

    Without a callback OpenSSL would prompt for a pass phrase on the
    controlling terminal and block the server (or a SIGHUP reload) forever.
    ``_check_key`` normally rejects encrypted keys first; this closes the
    window where the file is swapped between that check and the load.
    """
    raise TLSConfigError(
        "the TLS private key is encrypted; Postvault needs an unencrypted key"
    )


def _read(path: Path, what: str) -> bytes:
    """Read a certificate or key file, turning OS errors into TLSConfigError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{what} file {path} is a directory, not a file") from None
    except PermissionError:
        raise TLSConfigError(
            f"{what} file {path} is not readable (permission denied)"
        ) from None
    except OSError as exc:
        raise TLSConfigError(
            f"cannot read {what} file {path}: {exc.strerror}"
        ) from None


def _check_cert(cert_file: Path) -> x509.Certificate:
    """Parse the certificate chain file and return its first (leaf) certificate."""
    data = _read(cert_file, "TLS certificate")
    if not data.strip():
        raise TLSConfigError(f"TLS certificate file {cert_file} is empty")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(
            f"TLS certificate file {cert_file} does not contain a valid PEM certificate "
            "(expected '-----BEGIN CERTIFICATE-----')"
        ) from None
    return chain[0]


def _check_key(key_file: Path) -> bytes:
    """Parse the private key file; return the DER SubjectPublicKeyInfo of its key.

    Exceptions are re-raised with our own text and without chaining, so no
    parser message (which could in principle quote input) reaches a log.
    """
    data = _read(key_file, "TLS private key")
    if not data.strip():
        raise TLSConfigError(f"TLS private key file {key_file} is empty")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password would be needed.
        raise TLSConfigError(
            f"TLS private key file {key_file} is encrypted with a pass phrase; "
            "Postvault needs an unencrypted key protected by file mode 0600"
        ) from None
    except UnsupportedAlgorithm:
        raise TLSConfigError(
            f"TLS private key file {key_file} holds an unsupported key type"
        ) from None
    except ValueError:
        raise TLSConfigError(
            f"TLS private key file {key_file} does not contain a valid PEM private key "
            "(expected a PEM private key block, e.g. one that 'postvault init' writes)"
        ) from None
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Build the server TLS context used by every listener.

    ``cert_file`` is a PEM file with the server certificate first, then any
    intermediates; ``key_file`` is its unencrypted PEM private key.

    Raises ``TLSConfigError`` naming the file and the problem when a file is
    missing or unreadable, is not PEM, is an encrypted key, or when the key
    does not match the certificate.
    """
    cert_file = Path(cert_file)
    key_file = Path(key_file)
    # Check the files ourselves first: OpenSSL's errors ("PEM lib",
    # "KEY_VALUES_MISMATCH") do not say which file is at fault.
    leaf = _check_cert(cert_file)
    key_spki = _check_key(key_file)
    leaf_spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if leaf_spki != key_spki:
        raise TLSConfigError(
            f"TLS private key file {key_file} does not match the certificate in {cert_file}"
        )

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.0 and 1.1 are prohibited (RFC 8996; RFC 9325 section 3.1.1).
    # TLS 1.3 is the highest version, and OpenSSL always negotiates the
    # highest version both sides share, so 1.3 is preferred as RFC 9325
    # section 3.1.1 requires; 1.2 remains for older Outlook and Android.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.set_ciphers(SERVER_CIPHERS)
    except ssl.SSLError as exc:  # only if this OpenSSL lacks every listed suite
        raise TLSConfigError(
            "this OpenSSL build offers none of the required TLS 1.2 cipher suites"
        ) from exc

    ctx.options |= (
        # Our order (AES-GCM, then ChaCha20), not the client's, picks the TLS
        # 1.2 suite: every suite we list is acceptable, but a client's list
        # may start with whatever its library defaults to.
        ssl.OP_CIPHER_SERVER_PREFERENCE
        # TLS compression enables CRIME-style attacks that recover secrets
        # such as the AUTH PLAIN / LOGIN password (RFC 9325 section 3.3;
        # RFC 7457 section 2.6). OpenSSL 3 has it off; say so anyway.
        | ssl.OP_NO_COMPRESSION
        # We never need TLS 1.2 renegotiation, and client-initiated
        # renegotiation is a cheap CPU-exhaustion DoS and the subject of
        # the RFC 5746 splicing attack (RFC 9325 section 3.5). TLS 1.3 has
        # no renegotiation at all.
        | ssl.OP_NO_RENEGOTIATION
        # Fresh (EC)DHE keys for every handshake, so one compromised
        # ephemeral key exposes one session (RFC 9325 section 7.4). Already
        # the behaviour of OpenSSL >= 1.1.0; set to state the intent.
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_SINGLE_ECDH_USE
        # No session tickets. OpenSSL's ticket key is random per context and
        # never rotated, and our contexts live until the next SIGHUP: months.
        # Whoever read that key from memory could decrypt every ticket, and
        # with it the traffic of every recorded session that used one,
        # defeating forward secrecy; RFC 9325 section 3.4 requires ticket
        # keys to be rotated (e.g. weekly). Mail clients hold long-lived IMAP
        # connections, so resumption saves little; a full ECDSA P-256
        # handshake costs about a millisecond.
        | ssl.OP_NO_TICKET
    )
    # TLS 1.3 equivalent of OP_NO_TICKET: OP_NO_TICKET alone only makes
    # OpenSSL issue stateful tickets; zero means no tickets, no resumption.
    # (0-RTT early data stays off: Python never enables it, and it would be
    # replayable, RFC 8446 section 8, RFC 9325 section 3.10.)
    ctx.num_tickets = 0
    # Clients authenticate with SASL inside TLS (RFC 8314), not with
    # certificates; do not ask for one.
    ctx.verify_mode = ssl.CERT_NONE

    try:
        ctx.load_cert_chain(cert_file, key_file, password=_refuse_password)
    except ssl.SSLError as exc:
        # E.g. EE_KEY_TOO_SMALL or CA_MD_TOO_WEAK under @SECLEVEL=2, or the
        # files changed after our checks. The reason code never holds key data.
        reason = exc.reason or "OpenSSL error"
        raise TLSConfigError(
            f"cannot load TLS certificate {cert_file} with key {key_file}: {reason}"
        ) from None
    except OSError as exc:
        # The files vanished or changed mode between our checks and the load.
        raise TLSConfigError(
            f"cannot load TLS certificate {cert_file} with key {key_file}: {exc.strerror}"
        ) from None
    return ctx


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts only the CA certificates in ``ca_file``.

    For tests and for Postvault's own clients (health checks, the CLI talking
    to a running server). Verifies the chain and the host name (RFC 9525),
    requires TLS 1.2 or later, and applies OpenSSL's strict X.509 checks,
    which Python 3.13 turns on by default, so our dev certificates keep
    working there.
    """
    ca_file = Path(ca_file)
    ca_pem = _read(ca_file, "CA certificate")
    try:
        # Loading cadata skips the system roots, so "verified" means
        # "signed by our CA" and nothing else.
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode("ascii")
        )
    except (ssl.SSLError, UnicodeDecodeError):
        raise TLSConfigError(
            f"CA certificate file {ca_file} does not contain a valid PEM certificate"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


class TLSContextHolder:
    """The current server TLS context, rebuilt from files on ``reload``.

    Listeners should read ``holder.context`` for each new connection or
    STARTTLS. Listeners that can only take one context at start-up (asyncio
    ``create_server``, aiosmtpd's ``tls_context``) still see reloads: every
    context the holder builds has an SNI callback that, during each new
    handshake, switches the connection to the holder's current context.
    OpenSSL calls that hook for every ClientHello, with or without SNI.
    Connections already established keep the certificate they started with.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        """Build the context now; raises ``TLSConfigError`` if the files are bad."""
        self._cert_file = Path(cert_file)
        self._key_file = Path(key_file)
        # RLock, not Lock: a SIGHUP handler running reload() in the main
        # thread may interrupt a reload() already in progress there.
        self._lock = threading.RLock()
        self._context = self._build()

    @property
    def cert_file(self) -> Path:
        """The certificate chain file this holder loads."""
        return self._cert_file

    @property
    def key_file(self) -> Path:
        """The private key file this holder loads."""
        return self._key_file

    @property
    def context(self) -> ssl.SSLContext:
        """The context to use for new handshakes."""
        return self._context

    def reload(self) -> None:
        """Rebuild the context from the files.

        On failure the current context stays in use and ``TLSConfigError``
        is raised, so a typo during a certificate renewal never takes the
        listeners down.
        """
        with self._lock:
            # Build fully before swapping: readers see either the old or
            # the new context, never a half-configured one.
            self._context = self._build()

    def _build(self) -> ssl.SSLContext:
        ctx = server_context(self._cert_file, self._key_file)
        # A weak reference, so contexts cached by listeners do not keep a
        # discarded holder alive.
        holder_ref = weakref.ref(self)

        def follow_reload(
            conn: ssl.SSLObject | ssl.SSLSocket,
            server_name: str | None,
            built: ssl.SSLContext,
        ) -> None:
            holder = holder_ref()
            if holder is not None and holder._context is not built:
                # Switching the SSL_CTX mid-handshake swaps certificate and
                # key; protocol and cipher settings stay those of ``built``,
                # which server_context made identical.
                conn.context = holder._context

        ctx.sni_callback = follow_reload
        return ctx
