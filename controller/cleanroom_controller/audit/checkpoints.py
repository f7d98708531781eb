"""Signed checkpoints of the audit chain, kept outside the database.

At a fixed cadence (:class:`CheckpointPolicy`: every N entries or S seconds) the controller signs
``{v, count, head, time}`` (count = the id of the head entry: ids never restart, archived or not) with its
Ed25519 key and appends it to a :class:`CheckpointLog`. The one implementation here is a JSON-lines file in
the data directory (0600, each line fsynced); anything else that can carry a line (a feed shipping it
off-host) implements the same two methods. Someone who rewrites the database and recomputes every later
hash cannot make the chain pass through a checkpoint signed before the rewrite: ``audit verify`` names the
first that disagrees.

Signing and checking are pure functions of a key and a checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .chain import ChainHead, Mark, canonical_json

CHECKPOINTS_NAME = "audit-checkpoints.jsonl"
_MAX_LINE = 4096  # a checkpoint line is ~250 bytes: anything much longer is not one


class CheckpointError(ValueError):
    """A checkpoint log that cannot be read as one (names the file and line)."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    count: int  # the head entry's id
    head: str  # its hash
    time: float  # when it was signed (epoch s)
    sig: str  # base64 Ed25519 signature over signed_bytes()

    def signed_bytes(self) -> bytes:
        return canonical_json({"v": 1, "count": self.count, "head": self.head, "time": self.time})

    def to_json(self) -> str:
        return json.dumps(
            {"v": 1, "count": self.count, "head": self.head, "time": self.time, "sig": self.sig},
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def at(self) -> ChainHead:
        return ChainHead(self.count, self.head)

    def label(self, line: int | None = None) -> str:
        when = datetime.fromtimestamp(self.time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        where = f" (line {line})" if line is not None else ""
        return f"checkpoint of {when} at entry {self.count}{where}"

    @classmethod
    def parse(cls, raw: object, *, where: str) -> Checkpoint:
        if not isinstance(raw, dict) or raw.get("v") != 1:
            raise CheckpointError(f"{where}: not a version 1 checkpoint")
        count, head, time, sig = raw.get("count"), raw.get("head"), raw.get("time"), raw.get("sig")
        if type(count) is not int or count < 0:
            raise CheckpointError(f"{where}: count must be a non-negative integer")
        if not isinstance(head, str) or len(head) != 64:
            raise CheckpointError(f"{where}: head must be a 64-character hash")
        if type(time) not in (int, float):
            raise CheckpointError(f"{where}: time must be a number")
        if not isinstance(sig, str) or len(sig) > 200:
            raise CheckpointError(f"{where}: sig must be a base64 signature")
        return cls(count, head, float(time), sig)  # type: ignore[arg-type]


def sign_checkpoint(key: Ed25519PrivateKey, head: ChainHead, time: float) -> Checkpoint:
    unsigned = Checkpoint(head.id, head.hash, time, "")
    return Checkpoint(head.id, head.hash, time, base64.b64encode(key.sign(unsigned.signed_bytes())).decode())


def signature_ok(checkpoint: Checkpoint, key: Ed25519PublicKey) -> bool:
    try:
        key.verify(base64.b64decode(checkpoint.sig, validate=True), checkpoint.signed_bytes())
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When the next checkpoint is due (pure)."""

    every_entries: int = 10_000
    every_s: float = 60.0

    def __post_init__(self) -> None:
        if self.every_entries < 1 or not 0 < self.every_s <= 86_400:
            raise ValueError(
                f"checkpoint cadence out of range: every {self.every_entries} entries (at least 1) or "
                f"{self.every_s} s (more than 0, at most a day)"
            )

    def due(self, last: Checkpoint | None, head: ChainHead, now: float) -> bool:
        if head.id == 0 or (last is not None and last.count == head.id):
            return False  # nothing new to sign
        if last is None:
            return True
        return head.id - last.count >= self.every_entries or now - last.time >= self.every_s


class CheckpointLog(Protocol):
    """Where checkpoints go. The file below; a feed can carry the same lines off-host."""

    def append(self, checkpoint: Checkpoint) -> None: ...

    def read(self) -> Iterator[tuple[int, Checkpoint]]: ...


class CheckpointFile:
    """JSON lines in the data directory: created 0600, appended with O_APPEND, fsynced per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, checkpoint: Checkpoint) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            os.write(fd, (checkpoint.to_json() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> Iterator[tuple[int, Checkpoint]]:
        """(line number, checkpoint) in file order; a line that is not a checkpoint raises, naming it."""
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            for n, line in enumerate(f, start=1):
                where = f"{self.path}:{n}"
                if len(line) > _MAX_LINE:
                    raise CheckpointError(f"{where}: line longer than {_MAX_LINE} bytes")
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise CheckpointError(f"{where}: not JSON ({exc})") from None
                yield n, Checkpoint.parse(raw, where=where)

    def last(self) -> Checkpoint | None:
        """The last checkpoint written (the file is small: a line a minute is ~13 MB a year)."""
        found = None
        for _, cp in self.read():
            found = cp
        return found


@dataclass(frozen=True, slots=True)
class CheckedCheckpoints:
    marks: list[Mark]
    problems: list[str]  # checkpoints that do not verify: each one is tampering with the log or the key


def check_checkpoints(log: CheckpointLog, key: Ed25519PublicKey) -> CheckedCheckpoints:
    """Every checkpoint's signature, and the marks the chain must pass through (ascending)."""
    marks: list[Mark] = []
    problems: list[str] = []
    for line, cp in log.read():
        # Not necessarily ascending: processes sharing a data directory append their own.
        if not signature_ok(cp, key):
            problems.append(f"{cp.label(line)}: signature does not verify with the controller key")
            continue
        marks.append(Mark(cp.at, cp.label(line)))
    return CheckedCheckpoints(marks, problems)


class Checkpointer:
    """The daemon's side: signs the head when due (called every second or so, and at shutdown)."""

    def __init__(
        self, log: CheckpointFile, key: Ed25519PrivateKey, policy: CheckpointPolicy | None = None
    ) -> None:
        self._log = log
        self._key = key
        self.policy = policy or CheckpointPolicy()
        self._last: Checkpoint | None = log.last()

    def maybe(self, head: ChainHead | None, now: float, *, force: bool = False) -> Checkpoint | None:
        if head is None:
            return None
        due = self.policy.due(self._last, head, now)
        if not due and not (force and head.id > 0 and (self._last is None or self._last.count != head.id)):
            return None
        cp = sign_checkpoint(self._key, head, now)
        self._log.append(cp)
        self._last = cp
        return cp
