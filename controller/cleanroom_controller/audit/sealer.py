"""Accepted messages into the audit trail by the batch: one ``verdict.batch`` entry holds the Merkle root over
the messages stored since the last one, instead of one entry per message.

The leaves are the ``messages`` rows themselves (the de-duplication table ingest writes anyway): sealing
picks the rows no batch covers yet (``batch IS NULL``), audits their root and count, and writes the entry's
id and each row's leaf index back, all in the caller's transaction. A batch is sealed when
:class:`SealPolicy` says so (enough leaves waiting, or the oldest waited long enough), so the audit cost per
message shrinks as the rate grows; a message stays uncovered at most ``max_age_s`` plus one tick. Rows left
unsealed by a crashed process (or another process of a share group) are sealed by whoever ticks next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import merkle
from .chain import AuditEntry

if TYPE_CHECKING:
    from ..store import Store
    from .recorder import Recorder

BATCH_KIND = "verdict.batch"
BATCH_SUBJECT = "messages"
MAX_LEAVES_PER_ENTRY = 100_000  # bounds the memory of one seal; the rest go into the next entry


@dataclass(frozen=True, slots=True)
class SealPolicy:
    """When the messages waiting are sealed into one entry (pure)."""

    max_leaves: int = 1_000
    max_age_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_leaves < 1 or not 0 <= self.max_age_s <= 3600:
            raise ValueError(f"seal policy out of range: {self.max_leaves} leaves, {self.max_age_s} s")

    def due(self, pending: int, oldest_at: float | None, now: float) -> bool:
        if pending <= 0 or oldest_at is None:
            return False
        return pending >= self.max_leaves or now - oldest_at >= self.max_age_s


def batch_data(leaves: list[merkle.Leaf]) -> dict[str, object]:
    """The audited content of a batch: its Merkle root (hex) and its size."""
    return {"count": len(leaves), "root": merkle.root([leaf.hash() for leaf in leaves]).hex()}


class Sealer:
    def __init__(self, store: Store, recorder: Recorder, policy: SealPolicy | None = None) -> None:
        self._store = store
        self._recorder = recorder
        self.policy = policy or SealPolicy()
        self._pending = 0  # accepted by this process since its last seal (a hint: the rows decide)
        self._oldest: float | None = None

    def accepted(self, now: float) -> None:
        """A message was stored (in the current transaction)."""
        self._pending += 1
        if self._oldest is None:
            self._oldest = now

    def after_batch(self, now: float) -> AuditEntry | None:
        """End of an ingest batch, still inside its transaction: seal if the policy says so."""
        if not self.policy.due(self._pending, self._oldest, now):
            return None
        return self.seal()

    def tick(self, now: float) -> AuditEntry | None:
        """Every second or so: rows waiting too long (a quiet moment, another process's, a crashed one's)."""
        oldest = self._store.oldest_unsealed()
        if oldest is None or now - oldest < self.policy.max_age_s:
            return None
        with self._store.transaction():
            return self.seal()

    def seal(self) -> AuditEntry | None:
        """Cover every stored message no batch covers yet (up to ``MAX_LEAVES_PER_ENTRY``) with one entry."""
        with self._store.transaction():
            rows = self._store.unsealed_messages(MAX_LEAVES_PER_ENTRY)
            self._pending, self._oldest = 0, None
            if not rows:
                return None
            leaves = [merkle.Leaf(agent, seq, kind, digest) for agent, seq, kind, digest in rows]
            entry = self._recorder.record(BATCH_KIND, BATCH_SUBJECT, batch_data(leaves))
            self._store.mark_sealed(entry.id, [(leaf.agent, leaf.seq) for leaf in leaves])
            return entry

    def seal_all(self) -> int:
        """Shutdown: nothing stored is left uncovered. Returns how many entries were written."""
        written = 0
        while self.seal() is not None:
            written += 1
        return written
