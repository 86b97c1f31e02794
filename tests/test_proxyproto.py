"""The PROXY protocol parser (``postvault/proxyproto.py``) against the
HAProxy specification, sections 2.1 (v1, text) and 2.2 (v2, binary); the
config keys of ``[proxy]``; and the header reader over a real socket pair
(exactly the header's bytes are taken, whatever the segmentation)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postvault.conf.load import load_config_text
from postvault.conf.schema import ProxyConfig, parse_networks
from postvault.errors import ConfigError, ProxyHeaderRefused
from postvault.proxyproto import (
    MAX_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    parse_header,
    read_header,
    trusted,
)

CLIENT = "127.0.0.42"


def v2(command: int = 1, fam: int = 0x11, block: bytes | None = None, *, length: int | None = None) -> bytes:
    """A v2 header; by default PROXY, TCP over IPv4, 127.0.0.42:50000 -> 127.0.0.1:993."""
    if block is None:
        block = socket.inet_aton(CLIENT) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 50000, 993)
    n = len(block) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack("!H", n) + block


def refused(data: bytes) -> str:
    with pytest.raises(ProxyHeaderRefused) as info:
        parse_header(data)
    return str(info.value)


# --- version 1 (§2.1) ---------------------------------------------------------


def test_v1_tcp4() -> None:
    data = b"PROXY TCP4 127.0.0.42 127.0.0.1 50000 993\r\n"
    assert parse_header(data + b"* rest") == ProxyHeader(1, len(data), (CLIENT, 50000), ("127.0.0.1", 993))


def test_v1_tcp6_longest_line() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    data = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(data) == 104  # §2.1's longest TCP6 line
    header = parse_header(data)
    assert header is not None and header.source == (full, 65535) and header.length == 104


def test_v1_tcp6_compressed() -> None:
    header = parse_header(b"PROXY TCP6 2001:db8::42 ::1 1 0\r\n")
    assert header is not None and header.source == ("2001:db8::42", 1) and header.destination == ("::1", 0)


def test_v1_unknown_keeps_socket_address() -> None:
    # §2.1: anything between UNKNOWN and CR LF is ignored; the real
    # connection's parameters apply.
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"):
        assert parse_header(line + b"x") == ProxyHeader(1, len(line), None, None)


@pytest.mark.parametrize("prefix", [b"P", b"PROXY", b"PROXY TCP4 127.0.0.42 127.0.0.1 5", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r"])
def test_v1_incomplete_asks_for_more(prefix: bytes) -> None:
    assert parse_header(prefix) is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 127.0.0.042 127.0.0.1 1 2\r\n",    # leading zero (octal confusion)
    b"PROXY TCP4 127.0.0.1 127.0.0.1 01 2\r\n",     # leading zero in a port
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1 65536\r\n",  # port out of range
    b"PROXY TCP4 256.0.0.1 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 ::1 ::1 1 2\r\n",                   # address of the wrong family
    b"PROXY TCP6 127.0.0.1 ::1 1 2\r\n",
    b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n",        # dotted tail: not hex groups
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",          # zone id
    b"PROXY  TCP4 127.0.0.1 127.0.0.1 1 2\r\n",      # two spaces
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2 \r\n",      # trailing space
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1\r\n",         # a field missing
    b"PROXY UDP4 127.0.0.1 127.0.0.1 1 2\r\n",
    b"PROXY\r\n",
    b"PROXY tcp4 127.0.0.1 127.0.0.1 1 2\r\n",
    b"PROXYTCP4 127.0.0.1 127.0.0.1 1 2\r\n",
])
def test_v1_malformed(line: bytes) -> None:
    refused(line)


def test_v1_bare_lf_or_cr_refused() -> None:
    # §2.1: "must not tolerate a single CR or LF character to end the line".
    assert "CR LF" in refused(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\n")
    assert "CR LF" in refused(b"PROXY TCP4 127.0.0.1\r127.0.0.1 1 2")


def test_v1_too_long() -> None:
    # §2.1: no CR LF within the first 107 characters: invalid.
    assert "too long" in refused(b"PROXY UNKNOWN " + b"f" * 93)
    line = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"
    assert len(line) == 107 and parse_header(line) is not None
    assert "too long" in refused(b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n")


# --- version 2 (§2.2) ---------------------------------------------------------


def test_v2_tcp4() -> None:
    data = v2()
    assert parse_header(data + b"\x16\x03\x01") == ProxyHeader(2, 28, (CLIENT, 50000), ("127.0.0.1", 993))


def test_v2_tcp6() -> None:
    src, dst = ipaddress.IPv6Address("2001:db8::42"), ipaddress.IPv6Address("::1")
    data = v2(fam=0x21, block=src.packed + dst.packed + struct.pack("!HH", 1, 2))
    assert parse_header(data) == ProxyHeader(2, 52, ("2001:db8::42", 1), ("::1", 2))


def test_v2_tlvs_are_skipped() -> None:
    # §2.2: the length covers TLVs after the addresses; they may be ignored.
    block = v2()[16:] + bytes([0x05, 0, 4]) + b"uid1" + bytes([0x04, 0, 0])
    header = parse_header(v2(block=block) + b"client")
    assert header is not None and header.length == 16 + len(block) and header.source == (CLIENT, 50000)


def test_v2_local_keeps_socket_address() -> None:
    # §2.2: LOCAL (health checks) uses the real endpoints, ignores the family,
    # and still honours the length ("must not assume zero is presented").
    assert parse_header(v2(command=0, fam=0x00, block=b"")) == ProxyHeader(2, 16, None, None, local=True)
    assert parse_header(v2(command=0)) == ProxyHeader(2, 28, None, None, local=True)


def test_v2_unspec_and_unix_keep_socket_address() -> None:
    assert parse_header(v2(fam=0x00, block=b"")) == ProxyHeader(2, 16, None, None)
    unix = b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")
    assert parse_header(v2(fam=0x31, block=unix)) == ProxyHeader(2, 16 + 216, None, None)


@pytest.mark.parametrize("cut", range(28))
def test_v2_truncated_asks_for_more(cut: int) -> None:
    assert parse_header(v2()[:cut]) is None


def test_v2_bad_signature() -> None:
    assert "signature" in refused(b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c")
    assert "signature" in refused(b"\r\n\r\n\x01")


def test_v2_bad_version_and_command() -> None:
    assert "version" in refused(V2_SIGNATURE + b"\x11")
    assert "command" in refused(V2_SIGNATURE + b"\x22")


def test_v2_bad_family_or_transport() -> None:
    assert "family" in refused(V2_SIGNATURE + b"\x21\x41")
    assert "family" in refused(V2_SIGNATURE + b"\x21\x13")


def test_v2_address_block_too_short() -> None:
    assert "short" in refused(v2(block=b"\x7f\0\0\x2a\x7f\0\0\x01\xc3"))
    assert "short" in refused(v2(fam=0x21, block=bytes(20)))


def test_v2_oversized() -> None:
    assert "too long" in refused(v2(length=MAX_HEADER - 16 + 1)[:16])
    block = v2()[16:] + bytes([0x04]) + struct.pack("!H", MAX_HEADER - 16 - 12 - 3)
    block += bytes(MAX_HEADER - 16 - len(block))
    assert parse_header(v2(block=block)) is not None  # exactly MAX_HEADER: taken


@pytest.mark.parametrize("data", [b"\x16\x03\x01\x02\x00", b"a001 LOGIN x y\r\n", b"EHLO client\r\n", b"GET / HTTP/1.1\r\n",
                                  b"\x00", b" PROXY TCP4"])
def test_garbage_refused(data: bytes) -> None:
    refused(data)


# --- properties ------------------------------------------------------------------


# Random bytes, and random bytes behind each signature (plain random bytes
# almost never start like a header).
_ANY_INPUT = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b: V2_SIGNATURE + b, st.binary(max_size=300)),
    st.builds(lambda b: V2_SIGNATURE + b"\x21" + b, st.binary(max_size=300)),
    st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120)),
    st.builds(lambda fam, b: b"PROXY " + fam + b" " + b, st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN"]),
              st.text("0123456789abcdef.: \r\n", max_size=110).map(str.encode)),
)


@given(_ANY_INPUT)
@settings(max_examples=2000, deadline=None)
def test_any_bytes_parse_or_refuse(data: bytes) -> None:
    """Never any other exception; a header never claims more than was given
    or more than the limits; "need more" only below the limits."""
    try:
        header = parse_header(data)
    except ProxyHeaderRefused:
        return
    if header is None:
        assert len(data) < MAX_HEADER
        return
    assert 0 < header.length <= min(len(data), MAX_HEADER)


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=40),
       st.integers(1, 60))
def test_v1_and_v2_round_trip_ipv4(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int,
                                   rest: bytes, cut: int) -> None:
    line = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    binary = v2(block=src.packed + dst.packed + struct.pack("!HH", sport, dport))
    for data in (line, binary):
        header = parse_header(data + rest)
        assert header is not None and header.length == len(data)
        assert header.source == (str(src), sport) and header.destination == (str(dst), dport)
        # Every proper prefix is "need more", never a refusal.
        assert parse_header(data[:min(cut, len(data) - 1)]) is None


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), st.integers(0, 65535), st.integers(0, 65535))
def test_v1_and_v2_round_trip_ipv6(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, sport: int,
                                   dport: int) -> None:
    line = f"PROXY TCP6 {src.exploded} {dst.compressed} {sport} {dport}\r\n".encode()
    binary = v2(fam=0x21, block=src.packed + dst.packed + struct.pack("!HH", sport, dport))
    for data in (line, binary):
        header = parse_header(data)
        assert header is not None and header.source == (str(src), sport) and header.destination == (str(dst), dport)


@given(st.binary(min_size=1, max_size=28), st.integers(0, 27))
def test_v2_corrupted_byte_never_misreads(noise: bytes, at: int) -> None:
    """A header with one byte changed is refused, asks for more, or (in the
    address or length fields) parses; it never raises anything else."""
    data = bytearray(v2())
    data[at] ^= noise[0] or 1
    try:
        parse_header(bytes(data))
    except ProxyHeaderRefused:
        pass


# --- config ----------------------------------------------------------------------


def _load(tmp_path: Path, extra: str, environ: dict[str, str] | None = None) -> ProxyConfig:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    text = f'hostname = "mail.example.test"\n[tls]\ncert = "{pem}"\nkey = "{pem}"\n{extra}'
    return load_config_text(text, home=tmp_path, source="t.toml", environ=environ or {}).proxy


def test_config_defaults_off(tmp_path: Path) -> None:
    proxy = _load(tmp_path, "")
    assert proxy.listeners == frozenset() and proxy.trusted == () and proxy.timeout_seconds == 5


def test_config_keys_and_environment(tmp_path: Path) -> None:
    proxy = _load(tmp_path, '[proxy]\nlisteners = "imaps, submissions"\ntrusted = "127.0.0.1, 10.0.0.0/8, ::1"\n')
    assert proxy.listeners == {"imaps", "submissions"}
    assert trusted(proxy, "127.0.0.1") and trusted(proxy, "10.9.8.7") and trusted(proxy, "::1")
    assert trusted(proxy, "::ffff:10.1.1.1")  # an IPv4 sender seen on a dual-stack socket
    assert not trusted(proxy, "127.0.0.2") and not trusted(proxy, "192.0.2.1") and not trusted(proxy, "junk")
    env = {"POSTVAULT_PROXY_LISTENERS": "https", "POSTVAULT_PROXY_TRUSTED": "192.0.2.0/24",
           "POSTVAULT_PROXY_TIMEOUT_SECONDS": "3"}
    proxy = _load(tmp_path, "", env)
    assert proxy.listeners == {"https"} and trusted(proxy, "192.0.2.77") and proxy.timeout_seconds == 3


@pytest.mark.parametrize("extra, expected", [
    ('[proxy]\nlisteners = "imaps, pop3"\n', "proxy.listeners: expected listener names"),
    ('[proxy]\nlisteners = "imaps"\ntrusted = "10.1.2.3/8"\n', "proxy.trusted: expected IP addresses or networks"),
    ('[proxy]\nlisteners = "imaps"\ntrusted = "proxy.example.test"\n', "proxy.trusted: expected IP addresses"),
    ('[proxy]\nlisteners = "imaps"\n', "proxy.trusted: expected at least one address"),
    ('[proxy]\ntimeout_seconds = 0\n', "proxy.timeout_seconds: expected an integer from 1 to 60"),
])
def test_config_mistakes(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        _load(tmp_path, extra)


def test_networks_parser_round_trip() -> None:
    assert [str(n) for n in parse_networks("127.0.0.1, 2001:db8::/32", Path("."))] == ["127.0.0.1/32", "2001:db8::/32"]


# --- reading from a socket -----------------------------------------------------


@pytest.mark.parametrize("pieces", [
    [v2() + b"first client bytes"],
    [v2()[:5], v2()[5:15], v2()[15:] + b"first client bytes"],
    [b"PROXY TCP4 127.0.0.42 127.0.0.1 50000 993\r\nfirst client bytes"],
    [b"PROXY TCP4 127.0.0.42 ", b"127.0.0.1 50000 993\r", b"\nfirst client bytes"],
])
def test_read_header_takes_exactly_the_header(pieces: list[bytes]) -> None:
    async def run() -> tuple[ProxyHeader, bytes]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            async def send() -> None:
                for piece in pieces:
                    theirs.sendall(piece)
                    await asyncio.sleep(0.02)

            sender = asyncio.create_task(send())
            header = await asyncio.wait_for(read_header(ours), 5)
            await sender
            await asyncio.sleep(0.02)
            rest = ours.recv(1000)
            return header, rest
        finally:
            ours.close()
            theirs.close()

    header, rest = asyncio.run(run())
    assert header.source == (CLIENT, 50000)
    assert rest == b"first client bytes"


def test_read_header_refuses_early_close() -> None:
    async def run() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.sendall(b"PROXY TCP4 1")
        theirs.close()
        try:
            await asyncio.wait_for(read_header(ours), 5)
        finally:
            ours.close()

    with pytest.raises(ProxyHeaderRefused, match="closed"):
        asyncio.run(run())
