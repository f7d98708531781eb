"""The audit trail's hash chain (pure) and its streaming verification.

Entry = ``{id, ts, kind, actor, subject, data}``; ``hash = sha256(prev_hash + canonical_json(entry))`` in hex,
the first entry chaining from :data:`GENESIS`. Storage (append-only, in the controller's SQLite) is in
``store.py``; this module only computes and checks. :func:`verify_chain` streams: it keeps a bounded window of
entries (for naming what happened at the first bad one), never the whole chain.

Verification walks the entries in storage (id) order and, at the first entry that does not fit, tells what
most likely happened: ``edited`` (content no longer matches its hash, or a predecessor was rewritten with a
recomputed hash), ``deleted`` (a link skips entries), ``inserted`` (an entry nobody chained to sits in the
chain) or ``reordered`` (an entry chains to one that is stored after it). The chain has no secret: someone
who can write the database *and* recomputes every later hash and the recorded head is not detected. The
head (last id and hash) kept beside the chain catches truncation and appends at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from json.encoder import encode_basestring as _encode_str
from typing import Any, NamedTuple

GENESIS = "0" * 64


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN: the same encoding as ``cleanroom_protocol.canonical_json``
    (a test holds them equal), defined here because the audit format is the controller's own and because
    ``audit verify`` should not pay for importing the protocol's models."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


# How far an entry's original id is searched for around its stored id, to tell a renumbered
# (deleted / inserted / reordered) entry from an edited one. Only runs on the first bad entry.
_ID_SEARCH = 64


class AuditEntry(NamedTuple):
    """One stored entry. A named tuple: the verifier builds millions of them from database rows."""

    id: int
    ts: float
    kind: str
    actor: str
    subject: str
    data_json: str  # canonical JSON text of ``data`` as stored
    prev_hash: str
    hash: str

    @property
    def data(self) -> Any:
        return json.loads(self.data_json)


def entry_hash(
    prev_hash: str, *, id: int, ts: float, kind: str, actor: str, subject: str, data_json: str
) -> str:
    """sha256 over the previous hash and the canonical JSON of the entry (data parsed back from its text)."""
    entry = {
        "id": id,
        "ts": ts,
        "kind": kind,
        "actor": actor,
        "subject": subject,
        "data": json.loads(data_json),
    }
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(entry)).hexdigest()


def _scalar(value: object) -> bytes:
    """Canonical JSON of one scalar, without a ``json.dumps`` call for the common types (same bytes)."""
    if type(value) is str:
        return _encode_str(value).encode("utf-8")
    if type(value) is int:
        return str(value).encode("ascii")
    if type(value) is float and math.isfinite(value):
        return repr(value).encode("ascii")  # what json does for a finite float
    return canonical_json(value)


def entry_bytes(*, id: int, ts: float, kind: str, actor: str, subject: str, data_json: str) -> bytes:
    """``canonical_json({id, ts, kind, actor, subject, data})`` assembled from ``data_json`` (already canonical)
    without parsing it back: keys in sorted order (actor, data, id, kind, subject, ts). Byte-identical to what
    :func:`entry_hash` hashes when ``data_json`` is canonical JSON of a string-keyed mapping (tested)."""
    return b"".join(
        (
            b'{"actor":',
            _scalar(actor),
            b',"data":',
            data_json.encode("utf-8"),
            b',"id":',
            _scalar(id),
            b',"kind":',
            _scalar(kind),
            b',"subject":',
            _scalar(subject),
            b',"ts":',
            _scalar(ts),
            b"}",
        )
    )


def make_entry(
    prev_id: int, prev_hash: str, *, ts: float, kind: str, actor: str, subject: str, data: Mapping[str, Any]
) -> AuditEntry:
    """The entry that follows ``(prev_id, prev_hash)`` (``(0, GENESIS)`` for the first).

    ``data`` is encoded once; its keys must be strings (as JSON would make them anyway)."""
    data_json = canonical_json(data if isinstance(data, dict) else dict(data)).decode("utf-8")
    new_id = prev_id + 1
    body = entry_bytes(id=new_id, ts=ts, kind=kind, actor=actor, subject=subject, data_json=data_json)
    digest = hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()
    return AuditEntry(new_id, ts, kind, actor, subject, data_json, prev_hash, digest)


class Tamper(StrEnum):
    EDITED = "edited"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    REWRITTEN = "rewritten"  # consistent chain, but not the one a checkpoint signed


@dataclass(frozen=True, slots=True)
class ChainProblem:
    entry_id: int  # the first bad entry (for a deletion: the first missing id)
    tamper: Tamper
    detail: str

    def __str__(self) -> str:
        return f"audit entry {self.entry_id}: {self.tamper.value}: {self.detail}"


@dataclass(frozen=True, slots=True)
class ChainHead:
    id: int
    hash: str


def _content_hash(e: AuditEntry, as_id: int) -> str | None:
    try:
        return entry_hash(
            e.prev_hash,
            id=as_id,
            ts=e.ts,
            kind=e.kind,
            actor=e.actor,
            subject=e.subject,
            data_json=e.data_json,
        )
    except (ValueError, TypeError, UnicodeEncodeError):
        return None  # data no longer JSON, hash not ASCII: certainly edited


GENESIS_HEAD = ChainHead(0, GENESIS)


@dataclass(frozen=True, slots=True)
class Mark:
    """A point the chain must pass through: entry ``at.id`` has hash ``at.hash`` (a signed checkpoint, the
    end of an archived segment). ``label`` names it in a problem."""

    at: ChainHead
    label: str


@dataclass(frozen=True, slots=True)
class ChainWalk:
    count: int  # entries walked
    last: ChainHead  # the last good entry (``start`` when none)
    problem: ChainProblem | None
    marks_passed: int = 0  # how many marks the chain passed through as recorded


def walk_chain(
    entries: Iterable[AuditEntry],
    *,
    start: ChainHead = GENESIS_HEAD,
    head: ChainHead | None = None,
    marks: Iterable[Mark] = (),
) -> ChainWalk:
    """Stream ``entries`` (storage order) from ``start`` (the entry before the first: genesis, or the last entry
    of an archived segment), holding at most a small window of them. Stops at the first problem: an entry
    that does not fit (named as edited, deleted, inserted or reordered), a mark (``marks``, ascending by id)
    the chain does not pass through as recorded (entries rewritten with recomputed hashes: only a record kept
    outside the database shows it), or an end other than ``head``."""
    pending = sorted(marks, key=lambda m: m.at.id)
    mark_i, passed = 0, 0
    while mark_i < len(pending) and pending[mark_i].at.id <= start.id:
        mark_i += 1  # before this walk (archived): checked against the archive, not here
    next_mark = pending[mark_i].at.id if mark_i < len(pending) else -1
    prev_hash, expected_id = start.hash, start.id + 1
    prev_mark_id = start.id
    window: deque[AuditEntry] = deque(maxlen=_ID_SEARCH + 1)
    sha256 = hashlib.sha256
    it: Iterator[AuditEntry] = iter(entries)
    count = 0
    enc = _encode_str
    for e in it:
        if e.id == expected_id and e.prev_hash == prev_hash:
            # entry_bytes inlined as one str (the hot loop of ``audit verify``; same bytes, tested).
            ts = e.ts
            ts_text = repr(ts) if type(ts) is float and math.isfinite(ts) else _scalar(ts).decode("utf-8")
            text = (
                f'{prev_hash}{{"actor":{enc(e.actor)},"data":{e.data_json},"id":{e.id},"kind":{enc(e.kind)},'
                f'"subject":{enc(e.subject)},"ts":{ts_text}}}'
            )
            if sha256(text.encode("utf-8")).hexdigest() == e.hash:
                count += 1
                prev_hash, expected_id = e.hash, expected_id + 1
                window.append(e)
                while e.id == next_mark:  # several marks may name one entry
                    mark = pending[mark_i]
                    if mark.at.hash != e.hash:
                        problem = ChainProblem(
                            prev_mark_id + 1,
                            Tamper.REWRITTEN,
                            f"{mark.label} recorded entry {e.id} with hash {mark.at.hash[:16]}…, the chain has "
                            f"{e.hash[:16]}…: entries {prev_mark_id + 1}..{e.id} were rewritten with "
                            "recomputed hashes",
                        )
                        return ChainWalk(count, _last(window, start), problem, passed)
                    passed += 1
                    prev_mark_id = e.id
                    mark_i += 1
                    next_mark = pending[mark_i].at.id if mark_i < len(pending) else -1
                continue
        # The first bad entry: read a little further so that the diagnosis sees what follows it.
        before = list(window)
        after = [e]
        for nxt in it:
            after.append(nxt)
            if len(after) > _ID_SEARCH:
                break
        chain = before + after
        position = {x.hash: i for i, x in enumerate(chain)}
        problem = _diagnose(chain, len(before), prev_hash, expected_id, position)
        return ChainWalk(count, _last(window, start), problem, passed)
    last = _last(window, start)
    if head is not None and (head.id, head.hash) != (last.id, last.hash):
        return ChainWalk(count, last, _head_problem(head, last), passed)
    if mark_i < len(pending):
        mark = pending[mark_i]
        problem = ChainProblem(
            last.id + 1,
            Tamper.DELETED,
            f"the chain ends at entry {last.id} but {mark.label} covers entries up to {mark.at.id}",
        )
        return ChainWalk(count, last, problem, passed)
    return ChainWalk(count, last, None, passed)


def _last(window: deque[AuditEntry], start: ChainHead) -> ChainHead:
    return ChainHead(window[-1].id, window[-1].hash) if window else start


def _head_problem(head: ChainHead, last: ChainHead) -> ChainProblem:
    if head.id > last.id:
        return ChainProblem(
            last.id + 1, Tamper.DELETED, f"entries {last.id + 1}..{head.id} are missing from the end"
        )
    if head.id < last.id:
        return ChainProblem(
            head.id + 1, Tamper.INSERTED, f"entries after the recorded head {head.id} were appended"
        )
    return ChainProblem(last.id, Tamper.EDITED, "the last entry differs from the recorded head")


def verify_chain(entries: Iterable[AuditEntry], head: ChainHead | None = None) -> ChainProblem | None:
    """``None`` when the chain is intact (and ends at ``head`` if given), else the first problem."""
    return walk_chain(entries, head=head).problem


def _diagnose(
    chain: list[AuditEntry], i: int, prev_hash: str, expected_id: int, position: dict[str, int]
) -> ChainProblem:
    e = chain[i]
    original_id = next(
        (
            cand
            for cand in sorted(
                range(max(1, e.id - _ID_SEARCH), e.id + _ID_SEARCH + 1), key=lambda c: abs(c - e.id)
            )
            if _content_hash(e, cand) == e.hash
        ),
        None,
    )
    if original_id is None:
        # The content does not match its own hash under any nearby id.
        nxt = chain[i + 1] if i + 1 < len(chain) else None
        if nxt is not None and nxt.prev_hash == prev_hash:
            return ChainProblem(e.id, Tamper.INSERTED, "the next entry chains past it; nothing chains to it")
        return ChainProblem(e.id, Tamper.EDITED, "its content no longer matches its hash")
    linked_at = position.get(e.prev_hash)
    if linked_at is not None and linked_at > i:
        return ChainProblem(
            e.id,
            Tamper.REORDERED,
            f"it chains to entry stored as {chain[linked_at].id}, which comes after it (originally {original_id})",
        )
    if e.prev_hash == prev_hash:
        # Links correctly but carries another id than it was written with.
        return ChainProblem(e.id, Tamper.EDITED, f"its id was changed (written as {original_id})")
    if original_id > expected_id:
        missing = f"{expected_id}" if original_id == expected_id + 1 else f"{expected_id}..{original_id - 1}"
        return ChainProblem(expected_id, Tamper.DELETED, f"entry {missing} is missing before entry {e.id}")
    if original_id < expected_id and linked_at is not None and linked_at < i - 1:
        first = chain[linked_at + 1]
        return ChainProblem(
            first.id,
            Tamper.INSERTED,
            f"entries {first.id}..{chain[i - 1].id} sit between {chain[linked_at].id} and the entry written next",
        )
    if linked_at is None and i > 0:
        if original_id == expected_id:
            return ChainProblem(
                chain[i - 1].id,
                Tamper.EDITED,
                f"entry {e.id} chains to a different version of it (rewritten with a recomputed hash)",
            )
        return ChainProblem(e.id, Tamper.REORDERED, f"it was written as entry {original_id}")
    return ChainProblem(e.id, Tamper.EDITED, "it does not chain to the entry before it")
