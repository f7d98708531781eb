"""Archived segments of the audit chain: gzip JSON lines that verify on their own.

``audit archive --before DATE`` moves the entries up to the last signed checkpoint older than DATE out of the
database: the segment (from the previous archive's end, or genesis, to that checkpoint) is written to
``audit-<from>-<to>.jsonl.gz`` (0600, fsynced, renamed into place), read back and verified, and only then
deleted from the table through the one delete its trigger allows. The database keeps the segment's last
id and hash as the chain's base; the remaining chain verifies from there, and that base must itself be a
signed checkpoint.

File: line 1 is a header ``{format, from, to, start: {id, hash}, start_checkpoint, end_checkpoint}`` (the
signed checkpoints the segment starts after and ends at; no start checkpoint for a segment from genesis),
then one entry per line ``{id, ts, kind, actor, subject, data_json, prev_hash, hash}`` (``data_json``: the
stored text, hashed as is). Format 2 adds the leaves of each ``verdict.batch`` entry, right after it, in leaf
order and at most :data:`LEAVES_PER_LINE` a line: ``{batch: id, leaves: [[agent, seq, kind, digest], ...]}``,
so that a proof for a message can still be printed (:func:`prove_from_archive`) once its ``messages`` row is
pruned. Verifying a segment checks that each batch's leaves give the root and count its entry holds. A batch
whose rows were pruned before it was archived (24 h after they were stored) is written without leaves and
counted (``batches_without_leaves``): its root still commits to its messages, but nothing proves one of them.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import merkle
from .chain import GENESIS, GENESIS_HEAD, AuditEntry, ChainHead, Mark, walk_chain
from .checkpoints import Checkpoint, CheckpointError, CheckpointLog, check_checkpoints, signature_ok
from .proofs import build_proof, check_proof
from .sealer import BATCH_KIND, MAX_LEAVES_PER_ENTRY

if TYPE_CHECKING:
    from ..store import Store

ARCHIVE_FORMAT = "cleanroom-audit-archive/2"
_READABLE_FORMATS = ("cleanroom-audit-archive/1", ARCHIVE_FORMAT)  # 1: entries only, no leaves
ARCHIVE_DIR = "audit-archive"
LEAVES_PER_LINE = 1_000  # ~130 kB a line, well under the line bound
_READ_CHUNK = 1_000  # entries read from the store at a time while archiving
_MAX_LINE = 1 << 20


class ArchiveError(ValueError):
    """An archive that cannot be read or does not verify (names the file)."""


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    path: Path
    first: int
    last: int
    entries: int
    leaves: int = 0  # messages whose leaves the archive carries (provable from it)
    batches_without_leaves: int = 0  # batch entries whose rows were pruned before archiving


Segment = Iterable[tuple[AuditEntry, Sequence[merkle.Leaf] | None]]


def _entry_line(e: AuditEntry) -> bytes:
    return (
        json.dumps(
            {
                "id": e.id,
                "ts": e.ts,
                "kind": e.kind,
                "actor": e.actor,
                "subject": e.subject,
                "data_json": e.data_json,
                "prev_hash": e.prev_hash,
                "hash": e.hash,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
        + b"\n"
    )


def _leaf_lines(batch: int, leaves: Sequence[merkle.Leaf]) -> Iterator[bytes]:
    for i in range(0, len(leaves), LEAVES_PER_LINE):
        chunk = [[leaf.agent, leaf.seq, leaf.kind, leaf.digest] for leaf in leaves[i : i + LEAVES_PER_LINE]]
        yield (
            json.dumps({"batch": batch, "leaves": chunk}, ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n"
        )


def write_archive(
    path: Path,
    entries: Segment,
    *,
    start: ChainHead,
    start_checkpoint: Checkpoint | None,
    end_checkpoint: Checkpoint,
) -> None:
    """Write the segment whole: a temporary file, fsynced, renamed into place (never half a file)."""
    header = {
        "format": ARCHIVE_FORMAT,
        "from": start.id + 1,
        "to": end_checkpoint.count,
        "start": {"id": start.id, "hash": start.hash},
        "start_checkpoint": None if start_checkpoint is None else json.loads(start_checkpoint.to_json()),
        "end_checkpoint": json.loads(end_checkpoint.to_json()),
    }
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n")
            for e, leaves in entries:
                gz.write(_entry_line(e))
                if leaves:
                    for line in _leaf_lines(e.id, leaves):
                        gz.write(line)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _lines(f: gzip.GzipFile, path: Path) -> Iterator[tuple[int, Any]]:
    n = 0
    while line := f.readline(_MAX_LINE + 1):
        n += 1
        if len(line) > _MAX_LINE:
            raise ArchiveError(f"{path}: line {n} longer than {_MAX_LINE} bytes")
        try:
            yield n, json.loads(line)
        except ValueError as exc:
            raise ArchiveError(f"{path}: line {n} is not JSON ({exc})") from None


def _entry(n: int, raw: Any, path: Path) -> AuditEntry:
    try:
        return AuditEntry(
            int(raw["id"]),
            float(raw["ts"]),
            str(raw["kind"]),
            str(raw["actor"]),
            str(raw["subject"]),
            str(raw["data_json"]),
            str(raw["prev_hash"]),
            str(raw["hash"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"{path}: line {n} is not an audit entry ({exc!r})") from None


def _leaves(n: int, raw: dict[str, Any], path: Path) -> list[merkle.Leaf]:
    items = raw.get("leaves")
    if not isinstance(items, list) or not 0 < len(items) <= LEAVES_PER_LINE:
        raise ArchiveError(f"{path}: line {n}: leaves must be a list of 1 to {LEAVES_PER_LINE}")
    out = []
    for item in items:
        if not (
            isinstance(item, list)
            and len(item) == 4
            and isinstance(item[0], str)
            and type(item[1]) is int
            and isinstance(item[2], str)
            and isinstance(item[3], str)
            and len(item[3]) == 64
        ):
            raise ArchiveError(f"{path}: line {n}: a leaf is [agent, seq, kind, sha256 hex]")
        out.append(merkle.Leaf(item[0], item[1], item[2], item[3]))
    return out


@dataclass(slots=True)
class _Batch:
    """The batch entry being read and the leaves that followed it."""

    entry: AuditEntry
    leaves: list[merkle.Leaf]


class _Reader:
    """Streams a segment's entries (for the chain walk) and checks each batch's leaves against the root and
    count its entry holds; ``on_batch`` sees each batch whose leaves were archived, once checked."""

    def __init__(
        self, path: Path, on_batch: Callable[[AuditEntry, list[merkle.Leaf]], None] | None = None
    ) -> None:
        self.path = path
        self.on_batch = on_batch
        self.leaves = 0
        self.batches_without_leaves = 0
        self._batch: _Batch | None = None

    def entries(self, lines: Iterator[tuple[int, Any]]) -> Iterator[AuditEntry]:
        for n, raw in lines:
            if isinstance(raw, dict) and "batch" in raw:
                self._add_leaves(n, raw)
                continue
            entry = _entry(n, raw, self.path)
            self._finish()
            if entry.kind == BATCH_KIND:
                self._batch = _Batch(entry, [])
            yield entry
        self._finish()

    def _add_leaves(self, n: int, raw: dict[str, Any]) -> None:
        batch = self._batch
        if batch is None or raw.get("batch") != batch.entry.id:
            raise ArchiveError(
                f"{self.path}: line {n}: leaves of batch {raw.get('batch')!r} not after its entry"
            )
        batch.leaves.extend(_leaves(n, raw, self.path))
        if len(batch.leaves) > MAX_LEAVES_PER_ENTRY:
            raise ArchiveError(
                f"{self.path}: batch {batch.entry.id} has more than {MAX_LEAVES_PER_ENTRY} leaves"
            )

    def _finish(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if not batch.leaves:
            self.batches_without_leaves += 1
            return
        try:
            data = json.loads(batch.entry.data_json)
        except ValueError:
            data = None
        root = merkle.root([leaf.hash() for leaf in batch.leaves]).hex()
        if not isinstance(data, dict) or data.get("root") != root or data.get("count") != len(batch.leaves):
            raise ArchiveError(
                f"{self.path}: audit entry {batch.entry.id}: its {len(batch.leaves)} archived leaves do not give "
                "the root and count the entry holds"
            )
        self.leaves += len(batch.leaves)
        if self.on_batch is not None:
            self.on_batch(batch.entry, batch.leaves)


def verify_archive(
    path: Path,
    key: Ed25519PublicKey,
    *,
    on_batch: Callable[[AuditEntry, list[merkle.Leaf]], None] | None = None,
) -> ArchiveReport:
    """Check a segment on its own: both checkpoints signed by ``key``, the entries chain from the start to the
    end checkpoint's hash, each batch's archived leaves give its root. Raises :class:`ArchiveError` naming
    what does not hold. ``on_batch``: called with each batch entry whose leaves were archived, once checked."""
    reader = _Reader(path, on_batch)
    try:
        with gzip.open(path, "rb") as f:
            lines = _lines(f, path)
            first = next(lines, None)
            if (
                first is None
                or not isinstance(first[1], dict)
                or first[1].get("format") not in _READABLE_FORMATS
            ):
                raise ArchiveError(f"{path}: not an audit archive ({ARCHIVE_FORMAT})")
            header = first[1]
            end = Checkpoint.parse(header.get("end_checkpoint"), where=f"{path}: end checkpoint")
            if not signature_ok(end, key):
                raise ArchiveError(f"{path}: the end checkpoint's signature does not verify")
            raw_start = header.get("start_checkpoint")
            if raw_start is None:
                start = GENESIS_HEAD
            else:
                start_cp = Checkpoint.parse(raw_start, where=f"{path}: start checkpoint")
                if not signature_ok(start_cp, key):
                    raise ArchiveError(f"{path}: the start checkpoint's signature does not verify")
                start = start_cp.at
            walk = walk_chain(
                reader.entries(lines), start=start, head=end.at, marks=[Mark(end.at, end.label())]
            )
    except (OSError, EOFError, CheckpointError) as exc:
        raise ArchiveError(f"{path}: {exc}") from None
    if walk.problem is not None:
        raise ArchiveError(f"{path}: {walk.problem}")
    return ArchiveReport(
        path, start.id + 1, end.count, walk.count, reader.leaves, reader.batches_without_leaves
    )


def prove_from_archive(path: Path, key: Ed25519PublicKey, agent: str, seq: int) -> dict[str, Any]:
    """The inclusion proof of message (agent, seq) from an archived segment, which is verified whole on the
    way (so the proof's entry is in a chain ending at a signed checkpoint). Raises :class:`ArchiveError` when
    the segment does not verify or does not carry the message's leaf."""
    found: list[dict[str, Any]] = []

    def look(entry: AuditEntry, leaves: list[merkle.Leaf]) -> None:
        if found:
            return
        for index, leaf in enumerate(leaves):
            if leaf.agent == agent and leaf.seq == seq:
                found.append(build_proof(leaves, index, entry))
                return

    report = verify_archive(path, key, on_batch=look)
    if not found:
        without = report.batches_without_leaves
        note = f" ({without} batch entries in it were archived without their leaves)" if without else ""
        raise ArchiveError(f"{path}: no archived leaf for {agent} seq {seq}{note}")
    problems = check_proof(found[0])
    if problems:  # cannot happen for a segment that verified: the same checks
        raise ArchiveError(f"{path}: the archived batch does not prove the message: {'; '.join(problems)}")
    return found[0]


def archive_before(
    store: Store, log: CheckpointLog, key: Ed25519PublicKey, before: float, out_dir: Path
) -> ArchiveReport | None:
    """Move the entries up to the last checkpoint signed before ``before`` into an archive file; ``None`` when
    no such checkpoint lies beyond what is archived already."""
    checked = check_checkpoints(log, key)
    if checked.problems:
        raise ArchiveError("; ".join(checked.problems))
    base, head = store.audit_base(), store.audit_head()
    head_id = head.id if head is not None else 0
    cps = [cp for _, cp in log.read() if signature_ok(cp, key)]
    candidates = [cp for cp in cps if cp.time < before and base.id < cp.count <= head_id]
    if not candidates:
        return None
    end = max(candidates, key=lambda cp: cp.count)
    start_cp = None
    if base.id > 0:
        start_cp = next((cp for cp in cps if cp.at == base), None)
        if start_cp is None:
            raise ArchiveError(f"the chain's base (entry {base.id}) is not a signed checkpoint")
    elif base.hash != GENESIS:
        raise ArchiveError("the chain's base is not genesis")
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = out_dir / f"audit-{base.id + 1:012d}-{end.count:012d}.jsonl.gz"
    write_archive(
        path,
        _segment(store, base.id, end.count),
        start=base,
        start_checkpoint=start_cp,
        end_checkpoint=end,
    )
    report = verify_archive(path, key)  # what is deleted next must be readable and whole
    store.drop_archived_audit(end.at)
    return report


def _complete_leaves(store: Store, entry: AuditEntry) -> list[merkle.Leaf] | None:
    """A batch entry's leaves while all its ``messages`` rows are still there (they give its root); ``None``
    once pruning took any of them (they are pruned by age, not by batch)."""
    leaves = [merkle.Leaf(*row) for row in store.batch_leaves(entry.id)]
    try:
        data = json.loads(entry.data_json)
    except ValueError:
        return None  # not ours: the verify after writing names the entry
    if not leaves or not isinstance(data, dict) or len(leaves) != data.get("count"):
        return None
    return leaves if merkle.root([leaf.hash() for leaf in leaves]).hex() == data.get("root") else None


def _segment(store: Store, after: int, upto: int) -> Segment:
    """Entries ``after`` < id <= ``upto`` with each batch entry's leaves, read in chunks (no statement is
    left open while another runs: PostgreSQL's streamed reads hold the connection)."""
    while after < upto:
        chunk = list(store.audit_entries(after, min(_READ_CHUNK, upto - after)))
        if not chunk:
            return
        for entry in chunk:
            yield entry, (_complete_leaves(store, entry) if entry.kind == BATCH_KIND else None)
        after = chunk[-1].id
