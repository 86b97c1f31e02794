"""Tests of postvault.store.crypto: key wrapping, content keys, sealed blobs."""

from __future__ import annotations

import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postvault.errors import CryptoError, IntegrityError, WrongSecret
from postvault.store import crypto
from postvault.store.crypto import (
    DEFAULT_CHUNK_SIZE,
    HEADER_LEN,
    KEY_LEN,
    KdfParams,
    SealedReader,
    derive_wrapping_key,
    generate_keypair,
    new_content_key,
    open_stream,
    seal_stream,
    unwrap_content_key,
    unwrap_private_key,
    wrap_content_key,
    wrap_private_key,
)

TAG = 16
# Small Argon2id cost for tests that are not about the defaults.
FAST = dict(memory_kib=1024, iterations=1, lanes=1)
MID = b"<msg-1@postvault.test>"


def seal(data: bytes, key: bytes, mid: bytes = MID, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    dst = io.BytesIO()
    assert seal_stream(io.BytesIO(data), dst, key, mid, chunk_size) == len(data)
    return dst.getvalue()


def open_all(blob: bytes, key: bytes, mid: bytes = MID) -> bytes:
    return b"".join(open_stream(io.BytesIO(blob), key, mid))


def read_all(blob: bytes, key: bytes, mid: bytes = MID) -> bytes:
    with SealedReader(io.BytesIO(blob), key, mid) as r:
        return r.read()


def chunks_of(blob: bytes, chunk_size: int) -> list[bytes]:
    body = blob[HEADER_LEN:]
    full = chunk_size + TAG
    return [body[i : i + full] for i in range(0, len(body), full)]


# ---------------------------------------------------------------- KDF params


def test_password_defaults_are_at_least_64_mib() -> None:
    params = KdfParams.for_password()
    assert params.algorithm == "argon2id"
    assert params.memory_kib >= 64 * 1024
    assert params.iterations >= 3
    assert len(params.salt) == 16
    assert KdfParams.for_password().salt != params.salt
    # One real derivation at the defaults, to prove they are usable.
    key = derive_wrapping_key(b"correct horse battery staple", params)
    assert len(key) == KEY_LEN


def test_argon2id_params_round_trip_json() -> None:
    params = KdfParams.for_password(memory_kib=131072, iterations=4, lanes=2)
    text = params.to_json()
    assert KdfParams.from_json(text) == params
    doc = json.loads(text)
    assert doc["memory_kib"] == 131072 and doc["algorithm"] == "argon2id"


def test_token_params_round_trip_json() -> None:
    params = KdfParams.for_token()
    assert params.algorithm == "hkdf-sha256"
    assert KdfParams.from_json(params.to_json()) == params


GOOD_ARGON = {
    "v": 1,
    "algorithm": "argon2id",
    "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
    "memory_kib": 65536,
    "iterations": 3,
    "lanes": 4,
}


def variant(**changes: object) -> str:
    """GOOD_ARGON with some fields replaced (or removed, when given None)."""
    doc = {**GOOD_ARGON, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def test_good_argon_variant_parses() -> None:
    assert KdfParams.from_json(variant()).memory_kib == 65536


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        "null",
        variant(v=2),
        variant(v=None),
        variant(algorithm="scrypt"),
        variant(algorithm=None),
        variant(memory_kib=None, iterations=None, lanes=None),
        variant(salt="!!"),
        variant(salt="AAAA"),
        variant(salt=5),
        variant(memory_kib="big"),
        variant(memory_kib=16),
        variant(memory_kib=999_999_999_999),
        variant(iterations=0),
        variant(iterations=True),
        variant(lanes=-1),
        variant(extra=1),
        json.dumps({"v": 1, "algorithm": "hkdf-sha256", "salt": GOOD_ARGON["salt"], "lanes": 1}),
    ],
)
def test_kdf_params_from_garbage_json_raise_crypto_error(text: str) -> None:
    with pytest.raises(CryptoError):
        KdfParams.from_json(text)


# ---------------------------------------------------------------- private keys


def test_password_wraps_and_unwraps_private_key() -> None:
    kp = generate_keypair()
    assert len(kp.public) == 32 and len(kp.private) == 32
    assert kp.private.hex() not in repr(kp)
    params = KdfParams.for_password(**FAST)
    wk = derive_wrapping_key(b"s3cret pass", params)
    wrapped = wrap_private_key(kp.private, wk, b"account-a")
    assert kp.private not in wrapped
    # Stored params reproduce the same key.
    wk2 = derive_wrapping_key(b"s3cret pass", KdfParams.from_json(params.to_json()))
    assert unwrap_private_key(wrapped, wk2, b"account-a") == kp.private


def test_wrong_password_raises_wrong_secret() -> None:
    kp = generate_keypair()
    params = KdfParams.for_password(**FAST)
    wrapped = wrap_private_key(kp.private, derive_wrapping_key(b"right", params), b"acct")
    with pytest.raises(WrongSecret) as info:
        unwrap_private_key(wrapped, derive_wrapping_key(b"wrong", params), b"acct")
    assert "wrong" not in str(info.value)


def test_wrapped_private_key_bound_to_owner() -> None:
    kp = generate_keypair()
    wk = os.urandom(32)
    wrapped = wrap_private_key(kp.private, wk, b"account-a")
    with pytest.raises(WrongSecret):
        unwrap_private_key(wrapped, wk, b"account-b")


def test_wrapped_private_key_tamper_and_garbage() -> None:
    kp = generate_keypair()
    wk = os.urandom(32)
    wrapped = bytearray(wrap_private_key(kp.private, wk, b"a"))
    wrapped[-1] ^= 1
    with pytest.raises(WrongSecret):
        unwrap_private_key(bytes(wrapped), wk, b"a")
    with pytest.raises(CryptoError):
        unwrap_private_key(b"short", wk, b"a")


def test_fresh_nonce_per_wrap() -> None:
    kp = generate_keypair()
    wk = os.urandom(32)
    assert wrap_private_key(kp.private, wk, b"a") != wrap_private_key(kp.private, wk, b"a")


def test_token_derivation() -> None:
    token = os.urandom(32)
    params = KdfParams.for_token()
    wk = derive_wrapping_key(token, params)
    assert len(wk) == KEY_LEN
    assert derive_wrapping_key(token, KdfParams.from_json(params.to_json())) == wk
    assert derive_wrapping_key(os.urandom(32), params) != wk
    with pytest.raises(CryptoError):
        derive_wrapping_key(b"too short", params)


# ---------------------------------------------------------------- content keys


def test_content_key_round_trip() -> None:
    kp = generate_keypair()
    ck = new_content_key()
    assert len(ck) == 32
    wrapped = wrap_content_key(ck, kp.public, b"acct-a", MID)
    assert len(wrapped) == 32 + 12 + 32 + 16
    assert unwrap_content_key(wrapped, kp.private, b"acct-a", MID) == ck


def test_content_key_for_account_a_refused_as_account_b() -> None:
    a, b = generate_keypair(), generate_keypair()
    ck = new_content_key()
    wrapped = wrap_content_key(ck, a.public, b"acct-a", MID)
    # B's own key, and A's key under B's name, both refuse.
    with pytest.raises(IntegrityError):
        unwrap_content_key(wrapped, b.private, b"acct-b", MID)
    with pytest.raises(IntegrityError):
        unwrap_content_key(wrapped, a.private, b"acct-b", MID)


def test_content_key_for_another_message_refused() -> None:
    kp = generate_keypair()
    wrapped = wrap_content_key(new_content_key(), kp.public, b"acct", MID)
    with pytest.raises(IntegrityError):
        unwrap_content_key(wrapped, kp.private, b"acct", b"<other@postvault.test>")


def test_content_key_tampered_or_garbage_refused() -> None:
    kp = generate_keypair()
    wrapped = wrap_content_key(new_content_key(), kp.public, b"acct", MID)
    for i in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[i] ^= 0x80
        with pytest.raises(IntegrityError):
            unwrap_content_key(bytes(bad), kp.private, b"acct", MID)
    with pytest.raises(IntegrityError):
        unwrap_content_key(wrapped[:-1], kp.private, b"acct", MID)
    # An all-zero (low-order) ephemeral key.
    with pytest.raises(IntegrityError):
        unwrap_content_key(bytes(32) + wrapped[32:], kp.private, b"acct", MID)


def test_loaded_private_key_opens_exactly_what_the_bytes_open() -> None:
    """A session passes its key loaded once (``load_private_key``): the
    object must open the same keys as the raw bytes and refuse the same."""
    a, b = generate_keypair(), generate_keypair()
    keys = [new_content_key() for _ in range(3)]
    mids = [b"<%d@postvault.test>" % i for i in range(3)]
    wrapped = [wrap_content_key(k, a.public, b"acct-a", m) for k, m in zip(keys, mids)]
    obj = crypto.load_private_key(a.private)
    assert crypto.unwrap_content_keys(zip(wrapped, mids), obj, b"acct-a") == keys
    assert crypto.unwrap_content_keys(zip(wrapped, mids), a.private, b"acct-a") == keys
    assert [unwrap_content_key(w, obj, b"acct-a", m) for w, m in zip(wrapped, mids)] == keys
    other = crypto.load_private_key(b.private)
    with pytest.raises(IntegrityError):
        crypto.unwrap_content_keys(zip(wrapped, mids), other, b"acct-a")
    with pytest.raises(IntegrityError):
        unwrap_content_key(wrapped[0], other, b"acct-a", mids[0])
    with pytest.raises(IntegrityError):
        unwrap_content_key(wrapped[0], obj, b"acct-b", mids[0])
    with pytest.raises(ValueError):
        crypto.load_private_key(a.private[:-1])


def test_session_loads_its_private_key_once() -> None:
    from postvault.store.types import AccountSession

    kp = generate_keypair()
    session = AccountSession(1, "a@postvault.test", "member", b"acct-a", kp.public, kp.private)
    first = session.private_key_object
    assert session.private_key_object is first
    assert first.public_key().public_bytes_raw() == kp.public
    # Not a field: equality and repr are the dataclass's own, without the key.
    assert session == AccountSession(1, "a@postvault.test", "member", b"acct-a", kp.public, kp.private)
    assert "X25519" not in repr(session) and kp.private.hex() not in repr(session)


def test_wrap_to_invalid_public_key_refused() -> None:
    with pytest.raises(CryptoError):
        wrap_content_key(new_content_key(), bytes(32), b"acct", MID)


# ---------------------------------------------------------------- sealing

CS = 1024


@pytest.mark.parametrize("length", [0, 1, CS - 1, CS, CS + 1, 3 * CS, 3 * CS + 7])
def test_round_trip_small_chunks(length: int) -> None:
    key = new_content_key()
    data = os.urandom(length)
    blob = seal(data, key, chunk_size=CS)
    # The plaintext does not appear in the blob.
    assert len(data) < 16 or data[:16] not in blob
    assert open_all(blob, key) == data
    assert read_all(blob, key) == data
    with SealedReader(io.BytesIO(blob), key, MID) as r:
        assert r.size == length


@pytest.mark.parametrize(
    "length",
    [0, 1, DEFAULT_CHUNK_SIZE - 1, DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE + 1],
)
def test_round_trip_default_chunks(length: int) -> None:
    key = new_content_key()
    data = os.urandom(length)
    blob = seal(data, key)
    expected_chunks = max(1, -(-length // DEFAULT_CHUNK_SIZE))
    assert len(blob) == HEADER_LEN + length + expected_chunks * TAG
    assert open_all(blob, key) == data
    assert read_all(blob, key) == data


def test_empty_message_is_one_empty_final_chunk() -> None:
    key = new_content_key()
    blob = seal(b"", key)
    assert len(blob) == HEADER_LEN + TAG
    assert blob[:4] == b"PVB1"
    assert list(open_stream(io.BytesIO(blob), key, MID)) == []


def test_same_content_key_twice_gives_unrelated_blobs() -> None:
    key = new_content_key()
    a = seal(b"A" * 100, key)
    b = seal(b"A" * 100, key)
    # Per-blob salt: no keystream reuse even if a caller reuses a content key.
    assert a[HEADER_LEN:] != b[HEADER_LEN:]


def test_seal_reads_from_short_reading_source() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._src = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            chunk = self._src.read(min(len(b), 7))
            b[: len(chunk)] = chunk
            return len(chunk)

    key = new_content_key()
    data = os.urandom(5000)
    dst = io.BytesIO()
    assert seal_stream(Trickle(data), dst, key, MID, 1024) == 5000  # type: ignore[arg-type]
    assert open_all(dst.getvalue(), key) == data
    # open_stream too must cope with short reads.
    assert b"".join(open_stream(Trickle(dst.getvalue()), key, MID)) == data  # type: ignore[arg-type]


@pytest.mark.slow
def test_round_trip_50_mb(tmp_path) -> None:
    key = new_content_key()
    size = 50 * 1024 * 1024
    plain_path = tmp_path / "plain"
    with open(plain_path, "wb") as f:
        for _ in range(size // (1024 * 1024)):
            f.write(os.urandom(1024 * 1024))
    sealed_path = tmp_path / "sealed"
    with open(plain_path, "rb") as src, open(sealed_path, "wb") as dst:
        assert seal_stream(src, dst, key, MID) == size
    with open(plain_path, "rb") as expect, open(sealed_path, "rb") as src:
        for piece in open_stream(src, key, MID):
            assert piece == expect.read(len(piece))
        assert expect.read(1) == b""
    with open(plain_path, "rb") as expect, SealedReader(open(sealed_path, "rb"), key, MID) as r:
        assert r.size == size
        while True:
            piece = r.read(3 * 1024 * 1024 + 5)
            if not piece:
                break
            assert piece == expect.read(len(piece))
        assert expect.read(1) == b""


# ---------------------------------------------------------------- tampering


def assert_refused(blob: bytes, key: bytes, mid: bytes = MID) -> None:
    with pytest.raises(IntegrityError):
        open_all(blob, key, mid)
    with pytest.raises(IntegrityError):
        read_all(blob, key, mid)


def test_every_flipped_byte_is_refused() -> None:
    """Header, ciphertext and tag: no single byte of a blob can change."""
    key = new_content_key()
    blob = seal(os.urandom(3 * 64 + 10), key, chunk_size=64)
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            assert_refused(bytes(bad), key)


@pytest.mark.parametrize("where", ["header", "ciphertext", "tag"])
def test_flipped_byte_default_chunks(where: str) -> None:
    key = new_content_key()
    blob = bytearray(seal(os.urandom(DEFAULT_CHUNK_SIZE * 2 + 100), key))
    pos = {"header": 7, "ciphertext": HEADER_LEN + 1000, "tag": len(blob) - 3}[where]
    blob[pos] ^= 0x10
    assert_refused(bytes(blob), key)


@pytest.mark.parametrize("length", [CS, 3 * CS, 3 * CS + 7])
def test_dropped_last_chunk_is_refused(length: int) -> None:
    key = new_content_key()
    blob = seal(os.urandom(length), key, chunk_size=CS)
    parts = chunks_of(blob, CS)
    truncated = blob[:HEADER_LEN] + b"".join(parts[:-1])
    assert_refused(truncated, key)


def test_truncation_anywhere_is_refused() -> None:
    key = new_content_key()
    blob = seal(os.urandom(200), key, chunk_size=64)
    for cut in range(len(blob)):
        assert_refused(blob[:cut], key)


def test_appended_bytes_are_refused() -> None:
    key = new_content_key()
    blob = seal(os.urandom(200), key, chunk_size=64)
    for extra in (b"\x00", os.urandom(16), os.urandom(17), os.urandom(80)):
        assert_refused(blob + extra, key)


def test_swapped_chunks_are_refused() -> None:
    key = new_content_key()
    blob = seal(os.urandom(4 * CS), key, chunk_size=CS)
    parts = chunks_of(blob, CS)
    assert len(parts) == 4
    parts[1], parts[2] = parts[2], parts[1]
    assert_refused(blob[:HEADER_LEN] + b"".join(parts), key)


def test_chunk_spliced_from_another_blob_is_refused() -> None:
    key = new_content_key()
    a = seal(os.urandom(3 * CS), key, chunk_size=CS)
    b = seal(os.urandom(3 * CS), key, chunk_size=CS)
    pa, pb = chunks_of(a, CS), chunks_of(b, CS)
    assert_refused(a[:HEADER_LEN] + pa[0] + pb[1] + pa[2], key)


def test_blob_moved_to_another_message_is_refused() -> None:
    key = new_content_key()
    blob = seal(b"Subject: lab results\r\n\r\nfine", key)
    assert_refused(blob, key, b"<other@postvault.test>")


def test_wrong_content_key_is_refused() -> None:
    blob = seal(b"hello", new_content_key())
    assert_refused(blob, new_content_key())


def test_error_messages_carry_no_data() -> None:
    key = new_content_key()
    blob = bytearray(seal(b"secret subject line", key, chunk_size=4))
    blob[HEADER_LEN + 25] ^= 1
    with pytest.raises(IntegrityError) as info:
        open_all(bytes(blob), key)
    assert str(info.value) == "sealed message failed authentication at chunk 1"


def test_sealed_reader_refuses_missing_final_chunk_on_construction() -> None:
    key = new_content_key()
    blob = seal(os.urandom(3 * CS), key, chunk_size=CS)
    src = io.BytesIO(blob[: HEADER_LEN + 2 * (CS + TAG)])
    with pytest.raises(IntegrityError):
        SealedReader(src, key, MID)
    # The caller still owns the file when construction fails.
    assert not src.closed


# ---------------------------------------------------------------- random access


class CountingFile(io.BytesIO):
    """A BytesIO that records the offset of every read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        pos = self.tell()
        data = super().read(n)
        self.reads.append((pos, len(data)))
        return data


def chunk_indexes(reads: list[tuple[int, int]], chunk_size: int) -> list[int]:
    full = chunk_size + TAG
    return [(pos - HEADER_LEN) // full for pos, n in reads if pos >= HEADER_LEN and n]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    chunk_size=st.integers(min_value=1, max_value=40),
    length=st.integers(min_value=0, max_value=400),
)
def test_sealed_reader_random_access(data: st.DataObject, chunk_size: int, length: int) -> None:
    key = new_content_key()
    plain = bytes(i % 251 for i in range(length))
    blob = seal(plain, key, chunk_size=chunk_size)
    with SealedReader(io.BytesIO(blob), key, MID) as r:
        assert r.size == length
        for _ in range(data.draw(st.integers(min_value=1, max_value=5))):
            offset = data.draw(st.integers(min_value=0, max_value=length + 10))
            n = data.draw(st.integers(min_value=-1, max_value=length + 10))
            whence = data.draw(st.sampled_from([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END]))
            if whence == io.SEEK_SET:
                pos = r.seek(offset)
            elif whence == io.SEEK_CUR:
                pos = r.seek(offset - r.tell(), io.SEEK_CUR)
            else:
                pos = r.seek(offset - length, io.SEEK_END)
            assert pos == offset == r.tell()
            got = r.read(n)
            want = plain[offset:] if n < 0 else plain[offset : offset + n]
            assert got == want
            assert r.tell() == offset + len(want)
            buf = bytearray(data.draw(st.integers(min_value=0, max_value=50)))
            r.seek(offset)
            k = r.readinto(buf)
            assert bytes(buf[:k]) == plain[offset : offset + len(buf)]


def test_late_offset_opens_only_needed_chunks() -> None:
    cs = 1024
    key = new_content_key()
    plain = os.urandom(100 * cs + 300)
    blob = seal(plain, key, chunk_size=cs)
    src = CountingFile(blob)
    r = SealedReader(src, key, MID)
    n_chunks = 101
    # Construction: header plus the last chunk only.
    assert chunk_indexes(src.reads, cs) == [n_chunks - 1]
    src.reads.clear()
    # The tail is cached from construction: reading it needs no more I/O.
    r.seek(100 * cs + 10)
    assert r.read() == plain[100 * cs + 10 :]
    assert src.reads == []
    # A partial fetch spanning chunks 97 and 98 opens exactly those two.
    r.seek(97 * cs + 1000)
    assert r.read(100) == plain[97 * cs + 1000 : 97 * cs + 1100]
    assert chunk_indexes(src.reads, cs) == [97, 98]
    src.reads.clear()
    # Repeated reads inside one chunk reuse the single cached chunk.
    r.seek(50 * cs)
    r.read(10)
    r.read(10)
    assert chunk_indexes(src.reads, cs) == [50]
    r.close()
    assert src.closed


def test_sealed_reader_read_past_end_and_negative_seek() -> None:
    key = new_content_key()
    blob = seal(b"abcdef", key, chunk_size=4)
    with SealedReader(io.BytesIO(blob), key, MID) as r:
        r.seek(100)
        assert r.read(5) == b""
        assert r.read() == b""
        with pytest.raises(ValueError):
            r.seek(-1)
        r.seek(-2, io.SEEK_END)
        assert r.read() == b"ef"
        assert r.readable() and r.seekable() and not r.writable()
    with pytest.raises(ValueError):
        r.read(1)


def test_buffered_reader_over_sealed_reader() -> None:
    """Callers may wrap it in io.BufferedReader for line-oriented access."""
    key = new_content_key()
    text = b"".join(b"line %d\r\n" % i for i in range(500))
    blob = seal(text, key, chunk_size=100)
    with io.BufferedReader(SealedReader(io.BytesIO(blob), key, MID)) as f:
        assert f.readline() == b"line 0\r\n"
        assert f.read() == text[8:]


def test_bad_arguments() -> None:
    key = new_content_key()
    with pytest.raises(ValueError):
        seal_stream(io.BytesIO(b"x"), io.BytesIO(), key, MID, chunk_size=0)
    with pytest.raises(ValueError):
        seal_stream(io.BytesIO(b"x"), io.BytesIO(), key, MID, chunk_size=crypto.MAX_CHUNK_SIZE + 1)
    with pytest.raises(ValueError):
        seal_stream(io.BytesIO(b"x"), io.BytesIO(), key[:16], MID)
    with pytest.raises(TypeError):
        seal_stream(io.BytesIO(b"x"), io.BytesIO(), key, "not bytes")  # type: ignore[arg-type]


def test_argon2id_lets_other_threads_run() -> None:
    """A login's Argon2id must release the GIL (cryptography >= 50): the
    server's event loop keeps running while a login derives its key, and
    ``AccountStore.login`` overlaps it with bcrypt.

    With a switch interval far longer than the derivation, a thread holding
    the GIL is never preempted: if Argon2id kept it, the main thread could
    not run between the worker's start and its end, and would count 0.
    """
    import sys
    import threading

    kdf = KdfParams.for_password(memory_kib=8192, iterations=2, lanes=1)
    started = threading.Event()
    done = threading.Event()

    def derive() -> None:
        started.set()
        derive_wrapping_key(b"a password", kdf)
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        worker = threading.Thread(target=derive)
        worker.start()
        started.wait()
        turns = 0
        while not done.is_set():
            turns += 1
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert turns > 100, f"the main thread ran {turns} times during Argon2id"


def test_argon2id_from_several_threads_at_once() -> None:
    """Logins and account creation derive keys on several threads at once;
    with cryptography >= 50 unserialised derivations hang or fail with a
    spurious MemoryError (OpenSSL's thread pool), so derive_wrapping_key
    runs one at a time. Each thread's result must be its own key."""
    import threading

    params = [KdfParams.for_password(memory_kib=1024, iterations=1, lanes=4) for _ in range(4)]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def derive(i: int) -> None:
        try:
            for _ in range(5):
                results[i] = derive_wrapping_key(b"password %d" % i, params[i])
        except BaseException as e:  # reported below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=derive, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()], "a derivation hung"
    assert not errors, errors
    assert results == {i: derive_wrapping_key(b"password %d" % i, params[i]) for i in range(4)}
