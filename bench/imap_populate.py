"""Bench-only helper of ``bench/imap_load.py``: realistic messages, and a
fast way to file many of them into one INBOX.

``Store.deliver`` per message pays five fsyncs (three for the blob, one or
two for the database commit) and an ORM transaction: about 50 ms each on
the 2-CPU test machine, i.e. over an hour for 100,000 messages. Here the
same rows are written in large transactions and the blobs without a
per-blob fsync (one ``os.sync`` at the end), while everything that is
*stored* comes from the store's own code:

- ``MailStore._seal`` (the method ``deliver`` and ``append`` call) makes
  each message's summary, seals it and the message under a fresh content
  key, and writes the sealed blob through a writer with the blob store's
  contract (content-addressed path ``root/ab/cdef...``, mode 0600);
- ``crypto.wrap_content_key`` wraps the content key to the recipient,
  ``threads.parse_thread_headers``/``mid_hash`` make the thread-index hash,
  ``audit.event_hash`` chains the ``message.deliver`` audit events.

The rows are those ``Store.deliver(raw, sender, [recipient],
save_sent=False, protocol="smtp")`` writes: a ``messages`` row (origin
"submission", sealed summary), a new ``threads`` row with the sender and
the recipient as participants (a sender that holds no delivered mail joins
no existing thread), one ``message_copies`` row per message with the next
UID and modseq, the mailbox's ``uidnext``/``highestmodseq``, and one audit
event. Two things differ from live delivery, on purpose: the internal dates
are spread over the past (a mailbox that grew over years, none of it
\\Recent), and most copies carry flags (\\Seen, some \\Answered and
\\Flagged) as if the user had read them; both are states the server
itself reaches (APPEND with a date and flags, STORE).

``check_equivalent`` files one message both ways, through
``Store.deliver`` and through ``BulkFiler``, and compares what the store
gives back (plaintext, summary, flags, size, thread participants, audit
event fields), so a change to delivery that this helper does not follow
fails loudly instead of skewing the figures.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update

from postvault.store import audit, crypto, smallblobs, threads
from postvault.store.api import Store
from postvault.store.blobs import FileBlobStore
from postvault.store.smallblobs import SplitBlobStore
from postvault.store.db import unit_of_work
from postvault.store.mail import MailStore
from postvault.store.models import (
    Account,
    AuditEvent,
    Mailbox,
    Message,
    MessageCopy,
    Thread,
    ThreadParticipant,
)
from postvault.store.types import flags_text

# -- realistic messages ----------------------------------------------------------------

_WORDS = (
    "patient referral follow-up appointment results laboratory report imaging consult please "
    "review attached treatment plan history assessment recommend schedule thank you regards "
    "dental orthodontic periapical radiograph crown extraction implant evaluation insurance "
    "authorization prescription allergy medication dosage discussed options next visit "
    "available monday tuesday wednesday thursday friday morning afternoon office practice "
    "doctor colleague question regarding case update confirm received records chart note "
    "the a of to and in for with on at by from is was be as this that we our your will can"
).split()
_SUBJECTS = (
    "Referral: {n}", "Re: Referral: {n}", "Lab results {n}", "Re: Lab results {n}", "Imaging for case {n}",
    "Treatment plan {n}", "Re: Treatment plan {n}", "Consult request {n}", "Records request {n}",
    "Fwd: Records {n}", "Appointment {n} confirmed", "Question about case {n}",
)
# Magic numbers, so that attachments look like what they claim to be.
_PDF_HEAD = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


@dataclass(frozen=True)
class Mix:
    """The size mix of the generated mail (all sizes in bytes)."""

    text_median: int = 2_500        # plain-text body, log-normal around this
    html_share: float = 0.6         # share of messages sent as text + HTML alternative
    reply_share: float = 0.35       # share carrying In-Reply-To/References
    pdf_share: float = 0.05         # share with a PDF attachment
    pdf_median: int = 150_000
    jpeg_share: float = 0.01        # share with a JPEG attachment
    jpeg_median: int = 600_000
    max_attachment: int = 4_000_000


def _lognormal(rng: random.Random, median: int, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, rng.lognormvariate(0.0, sigma) * median)))


class _Pools:
    """Sentences and attachments to draw from, made once per process and
    seed: generating every byte afresh cost more than sealing it."""

    def __init__(self, seed: int, mix: Mix) -> None:
        rng = random.Random(seed)
        self.sentences = [
            " ".join(rng.choices(_WORDS, k=rng.randint(6, 13))).capitalize() + "." for _ in range(4000)
        ]
        self.pdfs = [self._attachment(rng, _PDF_HEAD, _lognormal(rng, mix.pdf_median, 1.0, 20_000,
                                                                   mix.max_attachment)) for _ in range(48)]
        self.jpegs = [self._attachment(rng, _JPEG_HEAD, _lognormal(rng, mix.jpeg_median, 0.8, 50_000,
                                                                     mix.max_attachment)) for _ in range(16)]

    @staticmethod
    def _attachment(rng: random.Random, head: bytes, n: int) -> bytes:
        return _b64_lines(head + rng.randbytes(n - len(head)))

    def text(self, rng: random.Random, size: int) -> str:
        lines: list[str] = []
        total = 0
        while total < size:
            chunk = rng.choices(self.sentences, k=8)
            lines.extend(chunk)
            lines.append("")
            total += sum(len(c) + 2 for c in chunk) + 2
        return "\r\n".join(lines) + "\r\n"


_pools: dict[tuple[int, Mix], _Pools] = {}


def _pools_for(seed: int, mix: Mix) -> _Pools:
    pools = _pools.get((seed, mix))
    if pools is None:
        pools = _pools[(seed, mix)] = _Pools(seed, mix)
    return pools


def _b64_lines(data: bytes) -> bytes:
    enc = base64.encodebytes(data)  # 76-character lines, LF
    return enc.replace(b"\n", b"\r\n")


def make_message(seed: int, i: int, sender: str, recipient: str, when: datetime, mix: Mix = Mix(),
                 hostname: str = "mail.bench.test") -> bytes:
    """Message ``i`` of a mailbox (deterministic for a seed): as Postvault's
    submission server would store it, Received line on top."""
    pools = _pools_for(seed, mix)
    rng = random.Random(seed * 1_000_003 + i)
    subject = rng.choice(_SUBJECTS).format(n=rng.randint(1000, 99999))
    mid = f"<{rng.getrandbits(64):016x}.{i}@{sender.split('@', 1)[1]}>"
    date = format_datetime(when)
    head = [
        "Received: from client.bench.test ([127.0.0.1])",
        f"\tby {hostname} (Postvault) with ESMTPSA",
        "\t(TLSv1.3 TLS_AES_256_GCM_SHA384)",
        f"\tfor <{recipient}>; {date}",
        f'From: "Practice {sender.split("@")[0]}" <{sender}>',
        f"To: <{recipient}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: {mid}",
    ]
    if rng.random() < mix.reply_share:
        ref = f"<{rng.getrandbits(64):016x}.{max(0, i - rng.randint(1, 50))}@{recipient.split('@', 1)[1]}>"
        head += [f"In-Reply-To: {ref}", f"References: {ref}"]
    head.append("MIME-Version: 1.0")
    text = pools.text(rng, _lognormal(rng, mix.text_median, 0.8, 200, 60_000))
    if rng.random() < mix.html_share:
        html = "<html><body>" + "".join(f"<p>{p}</p>\r\n" for p in text.split("\r\n") if p) + "</body></html>\r\n"
        b = f"alt-{i}-{rng.getrandbits(32):08x}"
        body = (
            f'Content-Type: multipart/alternative; boundary="{b}"\r\n\r\n'
            f"--{b}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n{text}"
            f"--{b}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n{html}"
            f"--{b}--\r\n"
        ).encode()
    else:
        body = f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n{text}".encode()
    attachments: list[tuple[str, str, bytes]] = []
    if rng.random() < mix.pdf_share:
        attachments.append(("application/pdf", f"report-{i}.pdf", rng.choice(pools.pdfs)))
    if rng.random() < mix.jpeg_share:
        attachments.append(("image/jpeg", f"xray-{i}.jpg", rng.choice(pools.jpegs)))
    if not attachments:
        return ("\r\n".join(head) + "\r\n").encode() + body
    b = f"mix-{i}-{rng.getrandbits(32):08x}"
    parts = [f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n'.encode(), f"--{b}\r\n".encode(), body]
    for ctype, name, encoded in attachments:
        parts.append(
            f'\r\n--{b}\r\nContent-Type: {ctype}; name="{name}"\r\nContent-Transfer-Encoding: base64\r\n'
            f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'.encode()
        )
        parts.append(encoded)
    parts.append(f"\r\n--{b}--\r\n".encode())
    return ("\r\n".join(head) + "\r\n").encode() + b"".join(parts)


def flags_for(rng: random.Random, i: int, n: int) -> tuple[str, ...]:
    """A mailbox someone reads: older mail seen, some answered or flagged,
    the newest 3 % unread."""
    if i >= n * 0.97:
        return ()
    out = ["\\Seen"]
    if rng.random() < 0.2:
        out.append("\\Answered")
    if rng.random() < 0.03:
        out.append("\\Flagged")
    return tuple(out)


# -- blobs without a per-blob fsync ---------------------------------------------------


class _BulkWriter:
    """``BlobWriter``'s contract (write, commit -> SHA-256 id, context
    manager) and the same file layout, minus the fsyncs: ``BulkBlobs.sync``
    makes everything durable once at the end."""

    def __init__(self, store: FileBlobStore) -> None:
        self._store = store
        fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".blob", dir=store.root)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._id: str | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._file.write(view)
        self._hash.update(view)
        self._size += len(view)
        return len(view)

    def flush(self) -> None:
        pass

    def commit(self) -> str:
        self._file.close()
        blob_id = self._hash.hexdigest()
        final = self._store._path(blob_id)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(self._tmp, final)
        self._id = blob_id
        return blob_id

    def __enter__(self) -> _BulkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._id is None:
            self._file.close()
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass


class BulkBlobs(FileBlobStore):
    def writer(self) -> _BulkWriter:  # type: ignore[override]
        return _BulkWriter(self)

    @staticmethod
    def sync() -> None:
        os.sync()


class _Sealer(MailStore):
    """Just enough of a store for ``MailStore._seal``: a blob store."""

    def __init__(self, blobs: Any) -> None:
        self.blobs = blobs


# -- sealing in worker processes ------------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    index: int
    public_id: str
    blob_id: str
    size: int
    sealed_summary: bytes
    wrapped: bytes
    mid_hash: bytes | None
    inline: bytes | None = None


@dataclass(frozen=True)
class Plan:
    """What to file: message ``i`` comes from ``senders[i % len]``, dated
    ``dates[i]``; generated from ``seed``."""

    seed: int
    recipient: str
    recipient_public: bytes
    recipient_owner: bytes
    senders: tuple[str, ...]
    hostname: str
    thread_key: bytes
    blob_root: str | None  # None: blobs in the database (sealed in this process)
    mix: Mix = Mix()


_worker: dict[str, Any] = {}


def _init_worker(plan: Plan) -> None:
    _worker["plan"] = plan
    _worker["sealer"] = _Sealer(BulkBlobs(Path(plan.blob_root))) if plan.blob_root else None


def seal_one(plan: Plan, sealer: Any, i: int, when: datetime) -> Sealed:
    raw = make_message(plan.seed, i, plan.senders[i % len(plan.senders)], plan.recipient, when, plan.mix,
                       plan.hostname)
    return seal_raw(plan, sealer, i, raw)


def seal_raw(plan: Plan, sealer: Any, i: int, raw: bytes) -> Sealed:
    # The store's own sealing: summary made and sealed, message sealed,
    # blob written (MailStore._seal, as deliver and append call it).
    # A small message's blob comes back in memory, to be written with its
    # row (store/smallblobs.py), as deliver writes it.
    sealed = sealer._seal(raw)
    wrapped = crypto.wrap_content_key(sealed.key, plan.recipient_public, plan.recipient_owner,
                                      sealed.public_id.encode())
    parsed = threads.parse_thread_headers(sealed.head)
    mid = threads.mid_hash(plan.thread_key, parsed.message_id) if parsed.message_id else None
    return Sealed(i, sealed.public_id, sealed.blob_id, sealed.size, sealed.summary, wrapped, mid, sealed.inline)


def _seal_range(args: tuple[int, int, float, float]) -> list[Sealed]:
    start, stop, t0, step = args
    plan: Plan = _worker["plan"]
    return [seal_one(plan, _worker["sealer"], i, _date(t0, step, i)) for i in range(start, stop)]


def _date(t0: float, step: float, i: int) -> datetime:
    return datetime.fromtimestamp(t0 + step * i, timezone.utc).replace(microsecond=0)


# -- filing -----------------------------------------------------------------------


class BulkFiler:
    """Files generated messages into one account's INBOX as ``deliver`` would."""

    def __init__(self, store: Store, recipient: str, senders: Sequence[str], hostname: str, seed: int,
                 mix: Mix = Mix()) -> None:
        self.store = store
        with store._sessions() as s:
            acct = s.scalar(select(Account).where(func.lower(Account.email) == recipient.lower()))
            assert acct is not None, recipient
            self.recipient_id = acct.id
            self.recipient_email = acct.email
            for sender in senders:
                assert s.scalar(select(Account.id).where(Account.email == sender)) is not None, sender
        with unit_of_work(store._sessions) as s:
            thread_key = threads.thread_key(s)  # made now if this is the first message
        blobs = store.blobs
        self.blob_root = str(blobs.files.root) if isinstance(blobs, SplitBlobStore) else None
        self.plan = Plan(seed, acct.email, acct.public_key, acct.key_owner.encode(), tuple(senders), hostname,
                         thread_key, self.blob_root, mix)

    def file(self, n: int, *, days: float = 3 * 365, workers: int = 2, batch: int = 2000,
             progress: Any = None) -> None:
        """File ``n`` messages dated evenly over the last ``days`` days."""
        t0 = (datetime.now(timezone.utc) - timedelta(days=days)).timestamp()
        step = days * 86400 / max(n, 1)
        rng = random.Random(self.plan.seed)
        chunks = [(a, min(n, a + 250), t0, step) for a in range(0, n, 250)]
        pending: list[Sealed] = []
        done = 0
        if self.blob_root is None or workers <= 1:
            _init_worker(self.plan)
            if self.blob_root is None:
                _worker["sealer"] = _Sealer(self.store.blobs)
            results: Iterable[list[Sealed]] = map(_seal_range, chunks)
            pool = None
        else:
            pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(self.plan,))
            results = pool.map(_seal_range, chunks)
        try:
            for sealed in results:
                pending.extend(sealed)
                if len(pending) >= batch:
                    self._write(pending, t0, step, lambda i: flags_for(rng, i, n))
                    done += len(pending)
                    pending = []
                    if progress:
                        progress(done, n)
            if pending:
                self._write(pending, t0, step, lambda i: flags_for(rng, i, n))
                done += len(pending)
                if progress:
                    progress(done, n)
        finally:
            if pool is not None:
                pool.shutdown()
        if self.blob_root is not None:
            BulkBlobs.sync()

    def _write(self, items: list[Sealed], t0: float, step: float,
               flags: Callable[[int], tuple[str, ...]]) -> None:
        plan = self.plan
        with unit_of_work(self.store._sessions) as s:
            conn = s.connection()
            box = s.scalar(select(Mailbox).where(Mailbox.account_id == self.recipient_id, Mailbox.name == "INBOX"))
            assert box is not None
            next_thread = (conn.scalar(select(func.max(Thread.id))) or 0) + 1
            next_msg = (conn.scalar(select(func.max(Message.id))) or 0) + 1
            prev = conn.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)) or audit.GENESIS
            uid, modseq = box.uidnext, box.highestmodseq
            thread_rows, part_rows, msg_rows, copy_rows, audit_rows = [], [], [], [], []
            for k, it in enumerate(items):
                when = _date(t0, step, it.index)
                sender = plan.senders[it.index % len(plan.senders)]
                tid, mid = next_thread + k, next_msg + k
                thread_rows.append({"id": tid, "created_at": when})
                for email in sorted({sender.lower(), self.recipient_email.lower()}):
                    part_rows.append({"thread_id": tid, "email": email})
                msg_rows.append({
                    "id": mid, "public_id": it.public_id, "blob_id": it.blob_id, "size": it.size,
                    "mid_hash": it.mid_hash, "thread_id": tid, "created_at": when, "origin": "submission",
                    "sealed_summary": it.sealed_summary,
                })
                modseq += 1
                copy_rows.append({
                    "mailbox_id": box.id, "uid": uid, "message_id": mid,
                    "flags": flags_text(flags(it.index)), "internal_date": when, "size": it.size,
                    "modseq": modseq, "wrapped_key": it.wrapped,
                })
                uid += 1
                at = datetime.now(timezone.utc)
                fields: dict[str, str | None] = {"at": at.isoformat(), "event": "message.deliver", "actor": sender, "account": sender,
                          "message": it.public_id, "client_ip": "127.0.0.1", "protocol": "smtp",
                          "detail": "recipients=1"}
                h = audit.event_hash(prev, fields)
                audit_rows.append({"at": at, "event": "message.deliver", "actor": sender, "account": sender,
                                   "message": it.public_id, "client_ip": "127.0.0.1", "protocol": "smtp",
                                   "detail": "recipients=1", "prev_hash": prev, "hash": h})
                prev = h
            conn.execute(insert(Thread), thread_rows)
            conn.execute(insert(ThreadParticipant), part_rows)
            smallblobs.write_rows(conn, [(it.blob_id, it.inline) for it in items if it.inline is not None])
            conn.execute(insert(Message), msg_rows)
            conn.execute(insert(MessageCopy), copy_rows)
            conn.execute(insert(AuditEvent), audit_rows)
            conn.execute(update(Mailbox).where(Mailbox.id == box.id)
                         .values(uidnext=uid, highestmodseq=modseq))


def check_equivalent(store: Store, a: str, b: str, sender: str, password: str, hostname: str) -> None:
    """File one message into ``a`` by ``Store.deliver`` and into ``b`` by
    ``BulkFiler``; raise AssertionError if what the store gives back
    differs in anything but ids, keys and times."""
    raw = make_message(7, 1, sender, a, datetime.now(timezone.utc), Mix(pdf_share=1.0, pdf_median=30_000),
                       hostname)
    store.deliver(raw, sender, [a], save_sent=False, client_ip="127.0.0.1", protocol="smtp")
    filer = BulkFiler(store, b, [sender], hostname, seed=0)
    sealer = _Sealer(BulkBlobs(Path(filer.blob_root)) if filer.blob_root else store.blobs)
    item = seal_raw(filer.plan, sealer, 0, raw)
    filer._write([item], datetime.now(timezone.utc).timestamp(), 0.0, lambda i: ())  # unread, as delivered
    got = []
    for email in (a, b):
        sess = store.login(email, password)
        snap = store.snapshot(sess, "INBOX")
        m = snap.messages[-1]
        with store.open_message(sess, "INBOX", m.uid) as r:
            plain = r.read()
        summary = store.summaries(sess, "INBOX", [m.uid])[m.uid]
        with store._sessions() as s:
            row = s.execute(select(Message).where(Message.public_id == m.message_id)).scalar_one()
            parts = sorted(s.scalars(select(ThreadParticipant.email).where(ThreadParticipant.thread_id == row.thread_id)))
            ev = s.execute(select(AuditEvent).where(AuditEvent.message == m.message_id)).scalar_one()
            ev_fields = (ev.event, ev.actor, ev.account, ev.client_ip, ev.protocol, ev.detail)
            mid_hash, origin = row.mid_hash, row.origin
        got.append((plain, summary, m.flags, m.size, [p for p in parts if p != email.lower()], ev_fields,
                    mid_hash, origin, snap.mailbox.uidnext - m.uid))
    assert got[0] == got[1], "bulk filing no longer matches Store.deliver: " + repr(
        [i for i, (x, y) in enumerate(zip(*got)) if x != y])
    # And the audit chain still links up across the bulk rows.
    with store._sessions() as s:
        prev = audit.GENESIS
        for prev_hash, h in s.execute(select(AuditEvent.prev_hash, AuditEvent.hash).order_by(AuditEvent.id)):
            assert prev_hash == prev, "audit chain broken"
            prev = h


def sizes(seed: int, n: int, mix: Mix = Mix()) -> Iterator[int]:
    """Sizes of the first ``n`` generated messages (for the docs)."""
    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    for i in range(n):
        yield len(make_message(seed, i, "s@a.test", "r@b.test", when, mix))

