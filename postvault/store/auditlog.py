"""The audit log's integrity: signed checkpoints, verification, retention
and export (issue 7 item 1). ``audit.record`` appends the events; this
module checks and maintains the chain they form.

The chain. Each event's ``hash`` is SHA-256 of the previous event's hash and
the canonical JSON of its own fields (``audit.event_hash``), and it keeps
the previous hash in ``prev_hash``. Ids are consecutive. So editing an
event's fields, deleting, inserting or reordering events shows at the first
event where the stored values stop agreeing (``verify``), unless whoever did
it also recomputed every hash after it, which needs no secret.

Checkpoints close that gap. Every ``[audit] checkpoint_events`` events or
``checkpoint_seconds`` (whichever first; ``postvault serve``), at shutdown,
when pruning, and on ``postvault audit checkpoint``, an ``audit_checkpoints``
row signs with Ed25519 "the chain up to event N has head hash H", plus the
previous checkpoint's signature hash and a sequence number. The private key
is a file in the home folder (``auditsign``), never in the database; the
newest checkpoint is also copied to ``certs/audit-head.json``.

What that buys, honestly:

- Someone who can write only the database (SQL access, a PostgreSQL
  account, a restored old dump, a bug in the server) cannot change, remove
  or reorder any event that a checkpoint covers without ``audit verify``
  naming where: the recomputed chain no longer reaches the signed head, and
  they cannot sign a new one. Removing the newest checkpoints to widen the
  unsigned window shows too (the head file, the sequence numbers).
  They can append events that look real, and change or delete the events
  written after the newest checkpoint (at most ``checkpoint_events`` or
  ``checkpoint_seconds`` worth): nothing signed covers them yet.
- Someone who can read the home folder's files (a disk copy, a backup)
  learns the signing key and can, with write access too, rewrite the whole
  log and sign it again; so can an admin with a shell on the server. What
  stops them is a copy kept elsewhere: a checkpoint line that an auditor
  took earlier (``postvault audit checkpoint`` prints one, ``audit verify
  --anchor FILE`` checks the log still agrees with it) or the public key
  fingerprint an auditor noted. Everything after the newest checkpoint an
  auditor holds can be rewritten undetectably by whoever holds the key.
- Nobody can use the log to read mail: events never carry content,
  subjects or file names, only ids, addresses, counts and rule names.

Retention. Events older than ``[audit] retention_days`` are deleted by
``prune`` (daily from ``serve``, or ``postvault audit prune``) after the
part to go is verified. Just before it deletes, a checkpoint signs the hash
of the newest deleted event: the ``prev_hash`` of the oldest kept event,
which is what ``verify`` then starts from instead of the genesis value.

Concurrency: ``verify`` reads one snapshot (a single read transaction), and
reads ``audit-head.json`` before it, so a checkpoint written meanwhile (the
database first, then the file) is never half seen.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import AuditChainBroken
from ..progress import Progress
from . import audit
from .auditsign import (
    HEAD_FILE,
    checkpoint_fields,
    checkpoint_line,
    ensure_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    read_head,
    signature_ok,
    signed_bytes,
    utc_iso,
    write_head,
)
from .db import unit_of_work
from .sqlcompat import lock_audit_chain
from .models import AuditCheckpoint, AuditEvent

log = logging.getLogger("postvault.audit")

NO_SIGNATURE = b"\x00" * 32
BATCH = 1000
EXPORT_FIELDS = ("id", "at", "event", "actor", "account", "message", "client_ip", "protocol", "detail", "hash")


@dataclass(frozen=True)
class Problem:
    """The first place where the log stops verifying."""

    position: int           # the event id where it shows (orders problems)
    what: str
    entry: int | None = None
    at: datetime | None = None
    event: str | None = None
    checkpoint: int | None = None

    def __str__(self) -> str:
        if self.entry is not None:
            where = f"entry {self.entry}"
            if self.at is not None:
                where += f" ({utc_iso(self.at)}, {self.event})"
        else:
            where = f"checkpoint #{self.checkpoint}"
        return f"{where}: {self.what}"


@dataclass(frozen=True)
class VerifyReport:
    events: int
    checkpoints: int
    first_id: int | None
    last_id: int | None
    # The newest event a valid signed checkpoint covers (0: none).
    signed_through: int
    key: str | None
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.problem is not None:
            return f"audit chain broken at {self.problem}"
        line = f"audit chain intact: {self.events} events, {self.checkpoints} checkpoints"
        unsigned = (self.last_id or 0) - self.signed_through
        if self.events and unsigned > 0:
            line += f"; the newest {min(unsigned, self.events)} not yet signed"
        if self.key:
            line += f"; signing key {self.key}"
        return line


@dataclass(frozen=True)
class CheckpointInfo:
    seq: int
    event_id: int
    kind: str
    # The checkpoint as one JSON line, for an auditor to keep (``--anchor``).
    line: str


@dataclass(frozen=True)
class PruneResult:
    deleted: int
    oldest_kept: int | None


def _fields_of(row: Any) -> dict[str, str | None]:
    # Exactly the dict audit.record hashed.
    return {
        "at": utc_iso(row.at), "event": row.event, "actor": row.actor, "account": row.account,
        "message": row.message, "client_ip": row.client_ip, "protocol": row.protocol, "detail": row.detail,
    }


def _cp_fields(cp: AuditCheckpoint) -> dict[str, Any]:
    return checkpoint_fields(cp.seq, cp.at, cp.kind, cp.event_id, cp.event_hash, cp.prev_sig_hash, cp.key_id)


def _checkpoint_problems(cps: list[AuditCheckpoint], public: Ed25519PublicKey | None,
                         anchors: Iterable[tuple[str, dict[str, Any]]]) -> tuple[list[Problem], set[int]]:
    """What is wrong with the checkpoints themselves, and the seqs of the
    valid ones (signature good, chained to the one before)."""
    problems: list[Problem] = []
    valid: set[int] = set()
    kid = key_id(public) if public is not None else None
    prev: AuditCheckpoint | None = None
    for cp in cps:
        position = cp.event_id
        want_seq = 1 if prev is None else prev.seq + 1
        want_link = NO_SIGNATURE if prev is None else hashlib.sha256(prev.signature).digest()
        if cp.seq != want_seq:
            problems.append(Problem(prev.event_id if prev else 0, checkpoint=want_seq,
                                    what=f"missing (deleted): the checkpoints jump to #{cp.seq}"))
        elif cp.prev_sig_hash != want_link:
            problems.append(Problem(position, checkpoint=cp.seq, what=f"link to checkpoint #{want_seq - 1} broken"))
        elif public is None:
            problems.append(Problem(position, checkpoint=cp.seq,
                                    what="cannot be checked: the public key file certs/audit-signing.pub is missing"))
        elif cp.key_id != kid:
            problems.append(Problem(position, checkpoint=cp.seq,
                                    what=f"signed by key {cp.key_id}, not by this home's key {kid}"))
        elif not signature_ok(public, _cp_fields(cp), cp.signature):
            problems.append(Problem(position, checkpoint=cp.seq,
                                    what=f"signature does not verify (forged or altered; covers entries up to "
                                         f"{cp.event_id})"))
        else:
            valid.add(cp.seq)
        prev = cp
    by_seq = {cp.seq: cp for cp in cps}
    for where, anchor in anchors:
        seq, sig = anchor["seq"], anchor["signature"]
        if public is not None and not signature_ok(public, anchor, sig):
            problems.append(Problem(anchor["event_id"], checkpoint=seq, what=f"in {where}: signature does not verify"))
            continue
        cp = by_seq.get(seq)
        if cp is None:
            problems.append(Problem(anchor["event_id"], checkpoint=seq,
                                    what=f"named in {where} (covering entries up to {anchor['event_id']}) is "
                                         "missing from the database: checkpoints deleted or the database rolled back"))
        elif cp.signature != sig or _cp_fields(cp) != {k: v for k, v in anchor.items() if k != "signature"}:
            problems.append(Problem(anchor["event_id"], checkpoint=seq,
                                    what=f"differs from the one in {where}: checkpoints were replaced"))
    return problems, valid


class AuditLog:
    """The audit-chain part of ``Store`` (a mixin: it uses ``_sessions``)."""

    _sessions: sessionmaker[Session]

    # -- checkpoints --------------------------------------------------------

    @staticmethod
    def _sign(s: Session, key: Ed25519PrivateKey, kind: str, event_id: int, event_hash: bytes) \
            -> tuple[dict[str, Any], bytes]:
        last = s.scalar(select(AuditCheckpoint).order_by(AuditCheckpoint.seq.desc()).limit(1))
        seq = 1 if last is None else last.seq + 1
        prev = NO_SIGNATURE if last is None else hashlib.sha256(last.signature).digest()
        kid = key_id(key.public_key())
        at = datetime.now(timezone.utc)
        fields = checkpoint_fields(seq, at, kind, event_id, event_hash, prev, kid)
        signature = key.sign(signed_bytes(fields))
        s.add(AuditCheckpoint(seq=seq, at=at, kind=kind, event_id=event_id, event_hash=event_hash,
                              prev_sig_hash=prev, key_id=kid, signature=signature))
        s.flush()
        return fields, signature

    def audit_checkpoint(self, home: Path, kind: str = "manual", *, only_if_new: bool = False) \
            -> CheckpointInfo | None:
        """Sign the chain's current head; with ``only_if_new``, nothing (None)
        if the newest checkpoint covers it already."""
        key = ensure_signing_key(home)
        for attempt in range(3):
            try:
                with unit_of_work(self._sessions) as s:
                    # No event may join the chain between reading its head
                    # and signing it (PostgreSQL: other processes append).
                    lock_audit_chain(s.connection())
                    head = s.execute(select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc())
                                     .limit(1)).first()
                    event_id, event_hash = (head[0], head[1]) if head is not None else (0, audit.GENESIS)
                    if only_if_new:
                        last = s.scalar(select(AuditCheckpoint.event_id).order_by(AuditCheckpoint.seq.desc())
                                        .limit(1))
                        if last is not None and last >= event_id:
                            return None
                    fields, signature = self._sign(s, key, kind, event_id, event_hash)
                break
            except DBIntegrityError:
                # Another process took this seq (PostgreSQL has no
                # BEGIN IMMEDIATE); sign again on top of theirs.
                if attempt == 2:
                    raise
        write_head(home, fields, signature)
        return CheckpointInfo(fields["seq"], event_id, kind, checkpoint_line(fields, signature))

    def audit_unsigned(self) -> tuple[int, datetime | None]:
        """(events after the newest checkpoint, that checkpoint's time)."""
        with self._sessions() as s:
            last_id = s.scalar(select(func.max(AuditEvent.id))) or 0
            cp = s.execute(select(AuditCheckpoint.event_id, AuditCheckpoint.at)
                           .order_by(AuditCheckpoint.seq.desc()).limit(1)).first()
        if cp is None:
            return last_id, None
        at = cp[1].replace(tzinfo=timezone.utc) if cp[1].tzinfo is None else cp[1]
        return max(last_id - cp[0], 0), at

    # -- verification -------------------------------------------------------

    def audit_verify(self, home: Path, *, anchors: Iterable[tuple[str, dict[str, Any]]] = (),
                     through: int | None = None, progress: Progress | None = None) -> VerifyReport:
        """Check every event and checkpoint; the report names the first
        problem. ``anchors`` are checkpoints kept elsewhere (where, fields):
        the database must still hold each. ``through`` stops after that
        event (pruning checks only what it is about to delete). ``progress``
        advances once per event (its total: ``audit_count``)."""
        public = load_public_key(home)
        if public is None:
            private = load_signing_key(home)
            public = private.public_key() if private is not None else None
        # Before the snapshot: the file is written after its checkpoint commits.
        head = read_head(home)
        outside = list(anchors)
        if head is not None:
            outside.insert(0, (str(HEAD_FILE), head))
        with self._sessions() as s:
            cps = list(s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.seq)))
            problems, valid = _checkpoint_problems(cps, public, outside)
            q = select(AuditEvent.id)
            if through is not None:
                q = q.where(AuditEvent.id <= through)
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            by_event: dict[int, list[AuditCheckpoint]] = {}
            for cp in cps:
                if cp.seq in valid:
                    by_event.setdefault(cp.event_id, []).append(cp)
            walk, first_id, last_id = self._walk(s, by_event, through, progress)
        if walk is not None:
            problems.append(walk)
        elif through is None:
            end = last_id or 0
            for cp in cps:
                if cp.seq in valid and cp.event_id > end:
                    problems.append(Problem(end + 1, entry=end + 1,
                                            what=f"missing (deleted): checkpoint #{cp.seq} covers entries up to "
                                                 f"{cp.event_id} but the log ends at {end}"))
                    break
                if cp.seq in valid and cp.event_id == 0 and cp.event_hash != audit.GENESIS:
                    problems.append(Problem(0, checkpoint=cp.seq, what="covers an empty log with a wrong hash"))
        signed = [cp.event_id for cp in cps if cp.seq in valid and cp.event_id <= (last_id or 0)]
        first = min(problems, key=lambda p: p.position) if problems else None
        return VerifyReport(total, len(cps), first_id, last_id, max(signed, default=0),
                            key_id(public) if public is not None else None, first)

    @staticmethod
    def _walk(s: Session, by_event: dict[int, list[AuditCheckpoint]], through: int | None,
              progress: Progress | None) -> tuple[Problem | None, int | None, int | None]:
        """Stream every event in id order (constant memory); the first
        problem, and the first and last ids seen."""
        q = select(AuditEvent.id, AuditEvent.at, AuditEvent.event, AuditEvent.actor, AuditEvent.account,
                   AuditEvent.message, AuditEvent.client_ip, AuditEvent.protocol, AuditEvent.detail,
                   AuditEvent.prev_hash, AuditEvent.hash).order_by(AuditEvent.id)
        if through is not None:
            q = q.where(AuditEvent.id <= through)
        first_id: int | None = None
        prev_id: int | None = None
        prev_hash = b""
        signed_id = 0  # the newest event a valid checkpoint matched so far
        for row in s.execute(q).yield_per(BATCH):
            if progress is not None:
                progress.advance()

            def broken(what: str, entry: int = row.id, with_row: bool = True) -> Problem:
                return Problem(entry, what, entry=entry, at=row.at if with_row else None,
                               event=row.event if with_row else None)

            if prev_id is None:
                first_id = row.id
                if row.id == 1:
                    if row.prev_hash != audit.GENESIS:
                        return broken("does not start the chain (prev_hash is not the genesis value)"), first_id, row.id
                else:
                    # Only a pruning checkpoint (its kind is signed) may stand
                    # for the entries before: any other would let deleting
                    # the oldest entries up to it pass for a prune.
                    anchored = [cp for cp in by_event.get(row.id - 1, [])
                                if cp.kind == "prune" and cp.event_hash == row.prev_hash]
                    if not anchored:
                        gone = "entry 1" if row.id == 2 else f"entries 1-{row.id - 1}"
                        return broken(f"{gone} are gone and no signed checkpoint (written when pruning) anchors "
                                      "this entry: rows deleted outside of pruning"), first_id, row.id
                    signed_id = row.id - 1
            elif row.id != prev_id + 1:
                gone = f"entry {prev_id + 1}" if row.id == prev_id + 2 else f"entries {prev_id + 1}-{row.id - 1}"
                return broken(f"missing (deleted): the chain jumps from entry {prev_id} to {row.id} ({gone})",
                              prev_id + 1, False), first_id, row.id
            elif row.prev_hash != prev_hash:
                return broken(f"link to entry {prev_id} broken (prev_hash differs): an entry was changed, "
                              "inserted or reordered"), first_id, row.id
            if audit.event_hash(row.prev_hash, _fields_of(row)) != row.hash:
                return broken("contents changed (hash mismatch)"), first_id, row.id
            for cp in by_event.get(row.id, []):
                if cp.event_hash != row.hash:
                    return broken(f"the chain differs from signed checkpoint #{cp.seq}: an entry from "
                                  f"{signed_id + 1} to {row.id} was rewritten and the hashes recomputed"), \
                        first_id, row.id
                signed_id = row.id
            prev_id, prev_hash = row.id, row.hash
        return None, first_id, prev_id

    # -- retention ----------------------------------------------------------

    def audit_prune(self, home: Path, older_than: datetime, *, actor: str = "admin", protocol: str | None = None,
                    progress: Progress | None = None) -> PruneResult:
        """Delete the events before ``older_than`` (always keeping the newest
        one), once the part to go verifies; a signed checkpoint of the newest
        deleted event anchors the oldest kept one. Raises AuditChainBroken."""
        with self._sessions() as s:
            keep_from = s.scalar(select(func.min(AuditEvent.id)).where(AuditEvent.at >= older_than))
            first = s.scalar(select(func.min(AuditEvent.id)))
        if first is None or (keep_from is not None and keep_from <= first):
            return PruneResult(0, first)
        through = keep_from - 1 if keep_from is not None else None
        report = self.audit_verify(home, through=through, progress=progress)
        if not report.ok:
            raise AuditChainBroken(f"not pruning: {report.summary()}")
        key = ensure_signing_key(home)
        with unit_of_work(self._sessions) as s:
            lock_audit_chain(s.connection())
            last = s.scalar(select(func.max(AuditEvent.id))) or 0
            # Only what was verified above goes (events may have come since).
            cut = through if through is not None else min(report.last_id or 0, last)
            doomed = s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.id <= cut)) or 0
            anchor = s.scalar(select(AuditEvent.hash).where(AuditEvent.id == cut))
            assert anchor is not None
            audit.record(s, "audit.prune", actor=actor, protocol=protocol,
                         detail=f"before={utc_iso(older_than)} deleted={doomed} through={cut}")
            s.flush()
            self._sign(s, key, "prune", cut, anchor)
            s.execute(delete(AuditEvent).where(AuditEvent.id <= cut))
            head = s.execute(select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).one()
            fields, signature = self._sign(s, key, "after-prune", head[0], head[1])
        write_head(home, fields, signature)
        log.info("audit: pruned %d events through %d", doomed, cut)
        return PruneResult(doomed, cut + 1)

    # -- export -------------------------------------------------------------

    def audit_count(self, since: datetime | None = None, until: datetime | None = None,
                    account: str | None = None) -> int:
        with self._sessions() as s:
            q = self._export_query(select(func.count()).select_from(AuditEvent), since, until, account)
            return s.scalar(q) or 0

    @staticmethod
    def _export_query(q: Any, since: datetime | None, until: datetime | None, account: str | None) -> Any:
        if since is not None:
            q = q.where(AuditEvent.at >= since)
        if until is not None:
            q = q.where(AuditEvent.at < until)
        if account is not None:
            who = account.strip().lower()
            # Events about the account and events it caused (a member
            # inviting a colleague is about the colleague).
            q = q.where(or_(func.lower(AuditEvent.account) == who, func.lower(AuditEvent.actor) == who))
        return q

    def audit_events(self, since: datetime | None = None, until: datetime | None = None,
                     account: str | None = None) -> Iterator[dict[str, Any]]:
        """Events in id order, as plain values (``EXPORT_FIELDS``), streamed."""
        q = self._export_query(
            select(AuditEvent.id, AuditEvent.at, AuditEvent.event, AuditEvent.actor, AuditEvent.account,
                   AuditEvent.message, AuditEvent.client_ip, AuditEvent.protocol, AuditEvent.detail,
                   AuditEvent.hash).order_by(AuditEvent.id), since, until, account)
        with self._sessions() as s:
            for row in s.execute(q).yield_per(BATCH):
                yield {"id": row.id, "at": utc_iso(row.at), "event": row.event, "actor": row.actor,
                       "account": row.account, "message": row.message, "client_ip": row.client_ip,
                       "protocol": row.protocol, "detail": row.detail, "hash": row.hash.hex()}
