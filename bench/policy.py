"""Benchmark of the attachment policy against sealing the same message.

Run as ``python bench/policy.py`` (``--quick`` for a smoke run, ``--profile``
to print where the policy's time goes).  Prints Markdown, ready to paste
into docs/benchmarks.md.

For a 20 MB message with three base64 attachments it measures, in the same
run and interleaved (so load from elsewhere on the machine hits all alike):

* ``check_attachments`` with the default policy;
* ``seal_stream`` of the same bytes into an ``io.BytesIO`` (what delivery
  does with every message anyway);
* for reference, what a straightforward walk costs: the email package
  parsing the whole message and decoding every attachment
  (``get_payload(decode=True)``).

Goal: policy time under 5 % of seal time.  Two messages: one with a PDF, a
JPEG and a DICOM image (no archive: only the first bytes of each file are
decoded), and one where the third attachment is a .docx, which is a zip and
so is decoded and opened in full.
"""

from __future__ import annotations

import argparse
import cProfile
import email.policy
import gc
import io
import os
import platform
import pstats
import random
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

# Run from a checkout without installing: make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postvault.policy.attachments import check_attachments  # noqa: E402
from postvault.policy.decision import ALLOW  # noqa: E402
from postvault.policy.schema import AttachmentPolicy  # noqa: E402
from postvault.store.crypto import new_content_key, seal_stream  # noqa: E402

MID = b"<bench-policy@postvault.test>"
TARGET = 20_000_000  # bytes of message, as the issue asks


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
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def _noise(rnd: random.Random, n: int) -> bytes:
    return rnd.randbytes(n)


def _docx(rnd: random.Random, n: int) -> bytes:
    """A .docx-shaped zip of about n bytes: XML parts and a large embedded image."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        zf.writestr("_rels/.rels", '<?xml version="1.0"?><Relationships/>')
        zf.writestr(
            "word/document.xml", "<w:document>" + "<w:p>Referral letter.</w:p>" * 2000 + "</w:document>"
        )
        zf.writestr("word/media/image1.jpeg", b"\xff\xd8\xff\xe0" + _noise(rnd, n))
    return buf.getvalue()


def build_message(with_docx: bool) -> bytes:
    """About 20 MB: a text body and three base64 attachments."""
    rnd = random.Random(20)
    # Base64 with CRLF every 76 characters is 4/3 * 78/76 of the file size.
    budget = int(TARGET / (4 / 3 * 78 / 76)) - 2000
    sizes = [budget * 2 // 5, budget * 2 // 5, budget - 2 * (budget * 2 // 5)]
    pdf = b"%PDF-1.7\n" + _noise(rnd, sizes[0] - 9)
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + _noise(rnd, sizes[1] - 11)
    msg = EmailMessage()
    msg["From"] = "Front Desk <front@clinic.test>"
    msg["To"] = "Dr Ortho <dr@ortho.test>"
    msg["Subject"] = "Referral with imaging"
    msg.set_content("Please find the referral, the x-ray and the scan attached.\n")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="referral.pdf")
    msg.add_attachment(jpeg, maintype="image", subtype="jpeg", filename="xray.jpg")
    if with_docx:
        docx = _docx(rnd, sizes[2] - 20_000)
        msg.add_attachment(
            docx,
            maintype="application",
            subtype="vnd.openxmlformats-officedocument.wordprocessingml.document",
            filename="letter.docx",
        )
    else:
        dicom = bytes(128) + b"DICM" + _noise(rnd, sizes[2] - 132)
        msg.add_attachment(dicom, maintype="application", subtype="dicom", filename="scan.dcm")
    return msg.as_bytes()


def timed(fns: list[Callable[[], object]], reps: int) -> list[list[float]]:
    """Seconds per call of each function, one figure per repetition, the
    functions interleaved within each repetition."""
    for fn in fns:
        fn()  # warm up
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            gc.collect()
            start = time.perf_counter()
            fn()
            out[i].append(time.perf_counter() - start)
    return out


def ms(ts: list[float]) -> str:
    return f"{min(ts) * 1000:.1f} / {statistics.median(ts) * 1000:.1f}"


def bench(reps: int, naive: bool) -> None:
    policy = AttachmentPolicy()
    key = new_content_key()
    print("| message | size | policy (ms) | seal (ms) | policy/seal | full parse + decode (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, with_docx in (("pdf + jpg + dcm", False), ("pdf + jpg + docx", True)):
        raw = build_message(with_docx)
        assert check_attachments(raw, policy) == ALLOW

        def policy_check(raw: bytes = raw) -> object:
            return check_attachments(raw, policy)

        def seal(raw: bytes = raw) -> object:
            dst = io.BytesIO()
            seal_stream(io.BytesIO(raw), dst, key, MID)
            return dst

        def full_parse(raw: bytes = raw) -> object:
            msg = BytesParser(policy=email.policy.default).parsebytes(raw)
            return [p.get_payload(decode=True) for p in msg.walk() if not p.is_multipart()]

        t_policy, t_seal = timed([policy_check, seal], reps)
        ratio = (
            f"{min(t_policy) / min(t_seal):.0%} / "
            f"{statistics.median(t_policy) / statistics.median(t_seal):.0%}"
        )
        # The reference walk allocates hundreds of MB; timed apart so that
        # it does not disturb the allocator under the two figures that matter.
        t_naive = ms(timed([full_parse], 3)[0]) if naive else "not run"
        print(f"| {label} | {len(raw) / 1e6:.1f} MB | {ms(t_policy)} | {ms(t_seal)} | {ratio} | {t_naive} |")
    print(
        f"\nEach time: best / median of {reps} repetitions, policy and seal interleaved; the full "
        "parse is timed apart (3 repetitions). policy/seal: ratio of best / ratio of medians.\n"
    )


def profile() -> None:
    raw = build_message(with_docx=False)
    policy = AttachmentPolicy()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        check_attachments(raw, policy)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, no full-parse reference")
    parser.add_argument("--profile", action="store_true", help="print a profile of the policy check")
    args = parser.parse_args()
    if args.profile:
        profile()
        return
    print("## Policy decisions\n")
    print(f"Machine: {machine_line()}.\n")
    bench(3 if args.quick else 15, naive=not args.quick)


if __name__ == "__main__":
    main()
