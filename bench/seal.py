"""Benchmark of sealed blobs: throughput against raw AES-GCM, and memory.

Run as ``python bench/seal.py`` (add ``--quick`` for a fast smoke run).
Prints Markdown tables, ready to paste into docs/benchmarks.md:

1. Seal and open throughput (MB/s) for 10 KB, 1 MB and 20 MB messages in
   memory (io.BytesIO), beside one-shot ``AESGCM.encrypt``/``decrypt`` of
   the same bytes measured in the same run, min and median of several
   repetitions, and the ratio of medians.  Goal: sealing >= 50 % of raw
   AES-GCM at 20 MB.
2. Sealing throughput at several chunk sizes (why the default is what it is).
3. Peak extra memory while opening a 50 MB sealed message from a file with
   ``SealedReader`` and with ``open_stream``, by tracemalloc and by the RSS
   high-water mark of a fresh child process.  Goal: < 16 MB.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

# Run from a checkout without installing: make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from postvault.store.crypto import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    SealedReader,
    new_content_key,
    open_stream,
    seal_stream,
)

MB = 1_000_000  # throughput in decimal MB/s, as disks and networks quote it
MID = b"<bench@postvault.test>"
SIZES = [("10 KB", 10_000), ("1 MB", 1_000_000), ("20 MB", 20_000_000)]
OPEN_SIZE = 50 * 1024 * 1024


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import cryptography

    return (
        f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, cryptography {cryptography.__version__}"
    )


def timed(fns: list[Callable[[], object]], inner: int, reps: int) -> list[list[float]]:
    """Seconds per call of each function, one figure per repetition.

    The functions are interleaved within each repetition, so that a burst of
    load from elsewhere on the machine hits the sealed and the raw figures
    alike and the ratio stays meaningful.
    """
    for fn in fns:
        fn()  # warm up: first-call allocations out of the figures
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            gc.collect()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            out[i].append((time.perf_counter() - start) / inner)
    return out


def mbps(size: int, seconds: float) -> float:
    return size / seconds / MB


def bench_throughput(reps: int, quick: bool) -> None:
    print("### Throughput (MB/s; higher is better)\n")
    print(
        "| size | seal | raw encrypt | seal/raw | "
        "open | raw decrypt | open/raw |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    key = new_content_key()
    aead = AESGCM(key)
    nonce = os.urandom(12)
    for label, size in SIZES:
        data = os.urandom(size)
        # Enough calls per repetition that each repetition lasts ~0.1 s.
        inner = max(1, int(0.1 * 1e9 / max(size * 1.5, 1))) if not quick else 1

        # Default arguments bind this iteration's values into each closure.
        def seal(data: bytes = data) -> bytes:
            dst = io.BytesIO()
            seal_stream(io.BytesIO(data), dst, key, MID)
            return dst.getvalue()

        blob = seal()

        def open_(blob: bytes = blob) -> bytes:
            return b"".join(open_stream(io.BytesIO(blob), key, MID))

        assert open_() == data
        raw_ct = aead.encrypt(nonce, data, MID)

        def raw_encrypt(data: bytes = data) -> bytes:
            return aead.encrypt(nonce, data, MID)

        def raw_decrypt(raw_ct: bytes = raw_ct) -> bytes:
            return aead.decrypt(nonce, raw_ct, MID)

        t_seal, t_enc, t_open, t_dec = timed(
            [
                seal,
                raw_encrypt,
                open_,
                raw_decrypt,
            ],
            inner,
            reps,
        )

        def pair(ts: list[float], size: int = size) -> str:
            return f"{mbps(size, min(ts)):.0f} / {mbps(size, statistics.median(ts)):.0f}"

        def ratio(ours: list[float], raw: list[float]) -> str:
            best = min(raw) / min(ours)
            typical = statistics.median(raw) / statistics.median(ours)
            return f"{best:.0%} / {typical:.0%}"

        print(
            f"| {label} | {pair(t_seal)} | {pair(t_enc)} | {ratio(t_seal, t_enc)} | "
            f"{pair(t_open)} | {pair(t_dec)} | {ratio(t_open, t_dec)} |"
        )
    print(
        "\nEach cell: best / median repetition, as throughput. "
        f"{reps} repetitions, each of enough calls to last ~0.1 s. "
        "seal/raw and open/raw: ratio of best / ratio of median throughputs. "
        "Raw is one AESGCM.encrypt/decrypt call over the whole message with an "
        "AESGCM object built beforehand; seal/open include everything "
        "(per-blob key derivation, header, BytesIO copies).\n"
    )


def bench_chunk_sizes(reps: int) -> None:
    print("### 20 MB by chunk size (MB/s, best / median)\n")
    print("| chunk size | seal | open |")
    print("| --- | --- | --- |")
    key = new_content_key()
    data = os.urandom(20_000_000)
    sizes = (16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024)
    fns: list[Callable[[], object]] = []
    for cs in sizes:
        # Default arguments bind this iteration's values into each closure.
        def seal(cs: int = cs) -> bytes:
            dst = io.BytesIO()
            seal_stream(io.BytesIO(data), dst, key, MID, cs)
            return dst.getvalue()

        blob = seal()

        def open_(blob: bytes = blob) -> bytes:
            return b"".join(open_stream(io.BytesIO(blob), key, MID))

        fns += [seal, open_]
    # All chunk sizes interleaved, so machine noise spreads over all rows.
    times = timed(fns, 1, reps)
    for i, cs in enumerate(sizes):
        t_seal, t_open = times[2 * i], times[2 * i + 1]
        mark = " (default)" if cs == DEFAULT_CHUNK_SIZE else ""
        print(
            f"| {cs // 1024} KiB{mark} | {mbps(len(data), min(t_seal)):.0f} / "
            f"{mbps(len(data), statistics.median(t_seal)):.0f} | "
            f"{mbps(len(data), min(t_open)):.0f} / "
            f"{mbps(len(data), statistics.median(t_open)):.0f} |"
        )
    print()


def _consume(path: str, key: bytes, how: str) -> int:
    """Read a sealed file through and throw the bytes away; return the count."""
    total = 0
    if how == "SealedReader":
        with SealedReader(open(path, "rb"), key, MID) as r:
            while True:
                piece = r.read(1024 * 1024)
                if not piece:
                    break
                total += len(piece)
    else:
        with open(path, "rb") as f:
            for piece in open_stream(f, key, MID):
                total += len(piece)
    return total


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(path: str, key_hex: str, how: str) -> None:
    """Run in a fresh process, so its RSS high-water mark means something.

    Prints the byte count and the peak RSS minus the RSS just before
    reading.  On Linux the high-water mark is reset first (clear_refs "5"),
    so interpreter start-up and imports do not hide the reader's peak.
    """
    key = bytes.fromhex(key_hex)
    gc.collect()
    rss_before = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        rss_before = None
    if rss_before is None:
        # Elsewhere: the process high-water mark, a lower bound on the peak.
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_before = usage if sys.platform != "darwin" else usage // 1024
    total = _consume(path, key, how)
    hwm = _proc_status_kib("VmHWM")
    if hwm is None:
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = usage if sys.platform != "darwin" else usage // 1024
    print(f"{total} {(hwm - rss_before) * 1024}")


def bench_memory() -> None:
    print(f"### Opening a {OPEN_SIZE // (1024 * 1024)} MiB sealed message from a file\n")
    print("| reader | tracemalloc peak | peak RSS minus RSS before (fresh process) |")
    print("| --- | --- | --- |")
    key = new_content_key()
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain"
        sealed = Path(tmp) / "sealed"
        with open(plain, "wb") as f:
            for _ in range(OPEN_SIZE // (1024 * 1024)):
                f.write(os.urandom(1024 * 1024))
        with open(plain, "rb") as src, open(sealed, "wb") as dst:
            seal_stream(src, dst, key, MID)
        plain.unlink()
        for how in ("SealedReader", "open_stream"):
            gc.collect()
            tracemalloc.start()
            total = _consume(str(sealed), key, how)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert total == OPEN_SIZE
            child = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(sealed), key.hex(), how],
                check=True,
                capture_output=True,
                text=True,
            )
            child_total, rss_delta = map(int, child.stdout.split())
            assert child_total == OPEN_SIZE
            print(
                f"| {how} | {peak / 2**20:.2f} MiB | {rss_delta / 2**20:.2f} MiB |"
            )
    print(
        "\nSealedReader is read in 1 MiB pieces (its read buffer is part of "
        "the figure); open_stream yields one chunk at a time.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    reps = 3 if args.quick else 15
    print("## Seal and open\n")
    print(f"Machine: {machine_line()}. Chunk size {DEFAULT_CHUNK_SIZE // 1024} KiB.\n")
    bench_throughput(reps, args.quick)
    bench_chunk_sizes(reps)
    bench_memory()


if __name__ == "__main__":
    main()
