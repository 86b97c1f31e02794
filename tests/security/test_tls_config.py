"""TLS on every listener, checked from outside with ``openssl s_client``:
SMTPS (465), SMTP STARTTLS (587), IMAPS (993), IMAP STARTTLS (143) and
HTTPS, all of the real ``postvault serve``.

Only TLS 1.2 and 1.3; in TLS 1.2 only AEAD suites with forward secrecy; no
compression; no client-initiated renegotiation.

Sources: RFC 8996 (TLS 1.0 and 1.1 deprecated); RFC 9325 / BCP 195 §4.1-4.2
(TLS 1.2+ only, AEAD with ECDHE), §3.3 (no compression: CRIME,
CVE-2012-4929); RFC 8314 §4.1 (mail over TLS); CVE-2011-1473 / CVE-2009-3555
(client-initiated renegotiation DoS and injection); the NSA/CISA and
Mozilla "intermediate" server profiles; RFC 8446 §B.4 (every TLS 1.3 suite
is AEAD). The method is sslscan/sslyze's: offer everything, note what the
server picks, take it out, repeat; plus a one-suite-at-a-time loop over
``openssl ciphers`` on one listener (they share one SSLContext).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .conftest import Serve

OPENSSL = shutil.which("openssl") or "openssl"
EVERYTHING = "ALL:COMPLEMENTOFALL:@SECLEVEL=0"
AEAD = re.compile(r"GCM|CHACHA20|CCM")
TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256"]
LISTENERS = [
    pytest.param("submissions", [], id="smtps"),
    pytest.param("submission", ["-starttls", "smtp"], id="smtp-starttls"),
    pytest.param("imaps", [], id="imaps"),
    pytest.param("imap", ["-starttls", "imap"], id="imap-starttls"),
    pytest.param("https", [], id="https"),
]


def s_client(serve: Serve, listener: str, starttls: list[str], *args: str, stdin: bytes = b"") -> tuple[bool, str]:
    """(handshake done, output) for one ``openssl s_client`` run."""
    cmd = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{serve.ports[listener]}", "-servername", "localhost",
           "-CAfile", str(serve.ca), *starttls, *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=30, check=False)
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    m = re.search(r"Cipher is (\S+)", out)
    done = bool(m) and m[1] != "(NONE)"
    return done, out


def cipher(out: str) -> str:
    m = re.search(r"Cipher is (\S+)", out)
    assert m, out
    return m[1]


@pytest.mark.parametrize("listener, starttls", LISTENERS)
def test_old_protocols_refused(serve: Serve, listener: str, starttls: list[str]) -> None:
    # RFC 8996: TLS 1.0 and 1.1 MUST NOT be negotiated. SECLEVEL=0 so that
    # our client really offers them (OpenSSL 3 would refuse on its own).
    for proto in ("-tls1", "-tls1_1"):
        done, out = s_client(serve, listener, starttls, proto, "-cipher", EVERYTHING)
        assert not done, (proto, out[-800:])
        assert "alert" in out.lower() or "no protocols available" in out.lower() or "error" in out.lower(), out


@pytest.mark.parametrize("listener, starttls", LISTENERS)
def test_tls12_accepts_only_aead_with_forward_secrecy(serve: Serve, listener: str, starttls: list[str]) -> None:
    # RFC 9325 §4.2: offer everything, record the choice, exclude it, repeat.
    accepted: list[str] = []
    offer = EVERYTHING
    for _ in range(40):
        done, out = s_client(serve, listener, starttls, "-tls1_2", "-cipher", offer)
        if not done:
            break
        chosen = cipher(out)
        assert chosen not in accepted, out
        accepted.append(chosen)
        offer = f"{EVERYTHING}:!{chosen}"
        offer = EVERYTHING.replace(":@SECLEVEL=0", "") + "".join(f":!{c}" for c in accepted) + ":@SECLEVEL=0"
    assert accepted, "TLS 1.2 must work"
    assert all(AEAD.search(c) and c.startswith(("ECDHE-", "DHE-")) for c in accepted), accepted
    # The server's preference comes first: a 256-bit or ChaCha suite, not a CBC one.
    assert AEAD.search(accepted[0]), accepted


@pytest.mark.parametrize("listener, starttls", LISTENERS)
def test_tls13_works_and_no_compression_or_renegotiation(serve: Serve, listener: str, starttls: list[str]) -> None:
    # RFC 8446; RFC 9325 §3.3 (no compression, CRIME); CVE-2011-1473 (renegotiation).
    done, out = s_client(serve, listener, starttls, "-tls1_3")
    assert done and "TLSv1.3" in out, out[-800:]
    assert cipher(out) in TLS13_SUITES
    assert "Compression: NONE" in out, out
    assert "Verify return code: 0 (ok)" in out
    # Client-initiated renegotiation in TLS 1.2 ("R" on s_client's stdin).
    done, out = s_client(serve, listener, starttls, "-tls1_2", stdin=b"R\n")
    assert done, out[-800:]
    assert "Compression: NONE" in out
    assert "RENEGOTIATING" in out, out[-800:]
    after = out.split("RENEGOTIATING", 1)[1]
    assert re.search(r"alert|error|no renegotiation|closed", after, re.IGNORECASE), after[-800:]


def test_every_weak_tls12_suite_is_refused_one_by_one(serve: Serve) -> None:
    # The brief's loop: each suite `openssl ciphers` knows, offered alone in
    # TLS 1.2. Only AEAD suites with ECDHE may complete. One listener: all
    # five share one TLSContextHolder (postvault/certs/context.py).
    listing = subprocess.run([OPENSSL, "ciphers", "-tls1_2", EVERYTHING], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip().split(":")
    suites = [c for c in listing if c and not c.startswith("TLS_")]
    assert len(suites) > 30, suites
    accepted = []
    for suite in suites:
        done, out = s_client(serve, "imaps", [], "-tls1_2", "-cipher", f"{suite}:@SECLEVEL=0")
        if done:
            accepted.append(cipher(out))
    assert accepted and all(AEAD.search(c) and c.startswith("ECDHE-") for c in accepted), accepted
    assert not any(re.search(r"CBC|SHA$|RC4|DES|NULL|EXPORT|anon|PSK|SRP|CAMELLIA|ARIA", c) for c in accepted
                   if not AEAD.search(c)), accepted
    # TLS 1.3 suites offered one at a time: whatever is accepted is AEAD by
    # definition (RFC 8446 §B.4); at least the mandatory one works.
    for suite in TLS13_SUITES:
        done, out = s_client(serve, "imaps", [], "-tls1_3", "-ciphersuites", suite)
        if suite == "TLS_AES_128_GCM_SHA256":
            assert done, out[-800:]
