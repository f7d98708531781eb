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
stored text, hashed as is).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .chain import GENESIS, GENESIS_HEAD, AuditEntry, ChainHead, Mark, walk_chain
from .checkpoints import Checkpoint, CheckpointError, CheckpointLog, check_checkpoints, signature_ok

if TYPE_CHECKING:
    from ..store import Store

ARCHIVE_FORMAT = "cleanroom-audit-archive/1"
ARCHIVE_DIR = "audit-archive"
_MAX_LINE = 1 << 20


class ArchiveError(ValueError):
    """An archive that cannot be read or does not verify (names the file)."""


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    path: Path
    first: int
    last: int
    entries: int


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


def write_archive(
    path: Path,
    entries: Iterable[AuditEntry],
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
            for e in entries:
                gz.write(_entry_line(e))
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


def _entries(lines: Iterator[tuple[int, Any]], path: Path) -> Iterator[AuditEntry]:
    for n, raw in lines:
        try:
            yield AuditEntry(
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


def verify_archive(path: Path, key: Ed25519PublicKey) -> ArchiveReport:
    """Check a segment on its own: both checkpoints signed by ``key``, the entries chain from the start to the
    end checkpoint's hash. Raises :class:`ArchiveError` naming what does not hold."""
    try:
        with gzip.open(path, "rb") as f:
            lines = _lines(f, path)
            first = next(lines, None)
            if first is None or not isinstance(first[1], dict) or first[1].get("format") != ARCHIVE_FORMAT:
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
                _entries(lines, path), start=start, head=end.at, marks=[Mark(end.at, end.label())]
            )
    except (OSError, EOFError, CheckpointError) as exc:
        raise ArchiveError(f"{path}: {exc}") from None
    if walk.problem is not None:
        raise ArchiveError(f"{path}: {walk.problem}")
    return ArchiveReport(path, start.id + 1, end.count, walk.count)


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
        store.audit_entries(base.id, end.count - base.id),
        start=base,
        start_checkpoint=start_cp,
        end_checkpoint=end,
    )
    report = verify_archive(path, key)  # what is deleted next must be readable and whole
    store.drop_archived_audit(end.at)
    return report
