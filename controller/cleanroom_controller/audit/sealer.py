"""Accepted messages into the audit trail by the batch: one ``verdict.batch`` entry holds the Merkle root over
the messages stored since the last one, instead of one entry per message.

The leaves are the ``messages`` rows themselves (the de-duplication table ingest writes anyway): sealing
picks the rows no batch covers yet (``batch IS NULL``), audits their root and count, and writes the entry's
id and each row's leaf index back, all in the caller's transaction. A batch is sealed when
:class:`SealPolicy` says so (enough leaves waiting, or the oldest waited long enough), so the audit cost per
message shrinks as the rate grows; a message stays uncovered at most ``max_age_s`` plus one tick. Rows left
unsealed by a crashed process (or another process of a share group) are sealed by whoever ticks next.

What the sealer keeps in memory (how many messages wait, since when: :class:`Waiting`) changes inside the
caller's transaction, so it is transactional like the rows: a transaction that does not commit (ingest
retries a failed commit with backoff) hands back the :class:`Waiting` it started from (:meth:`Sealer.undo`),
and the sealer's own transactions (tick, shutdown) undo themselves. Otherwise a failed batch would count its
messages twice on the retry (sealing early) or, when it had sealed, forget messages still waiting in the
rows (sealing them only at the next tick).

Each entry also records how many of its messages came late: ``late`` (signed longer ago than the freshness
window: history, e.g. a spool emptied after an outage), ``max_late_s`` (the latest of them) and ``ahead``
(signed in the controller's future beyond the window: a clock off), from the ``late_s`` ingest stores beside
each message (``NULL`` when fresh). The leaf itself is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        if not 1 <= self.max_leaves <= MAX_LEAVES_PER_ENTRY or not 0 <= self.max_age_s <= 3600:
            raise ValueError(
                f"seal policy out of range: {self.max_leaves} leaves (1 to {MAX_LEAVES_PER_ENTRY:,}), "
                f"{self.max_age_s} s (0 to 3600)"
            )

    def due(self, pending: int, oldest_at: float | None, now: float) -> bool:
        if pending <= 0 or oldest_at is None:
            return False
        return pending >= self.max_leaves or now - oldest_at >= self.max_age_s


def batch_data(leaves: list[merkle.Leaf], late_s: Sequence[float | None] = ()) -> dict[str, object]:
    """The audited content of a batch: its Merkle root (hex) and size, and how many of its messages came late
    (``late_s``: per leaf, seconds late when outside the freshness window, negative when ahead, else None)."""
    late = [s for s in late_s if s is not None and s > 0]
    return {
        "ahead": sum(1 for s in late_s if s is not None and s < 0),
        "count": len(leaves),
        "late": len(late),
        "max_late_s": max(late, default=0.0),
        "root": merkle.root([leaf.hash() for leaf in leaves]).hex(),
    }


@dataclass(frozen=True, slots=True)
class Waiting:
    """Messages this process stored since its last seal, and when the first of them was (a hint for the
    policy: the rows decide what a seal covers)."""

    count: int = 0
    oldest: float | None = None

    def plus(self, now: float) -> Waiting:
        return Waiting(self.count + 1, now if self.oldest is None else self.oldest)


NOTHING_WAITING = Waiting()


class Sealer:
    def __init__(self, store: Store, recorder: Recorder, policy: SealPolicy | None = None) -> None:
        self._store = store
        self._recorder = recorder
        self.policy = policy or SealPolicy()
        self.waiting = NOTHING_WAITING

    def accepted(self, now: float) -> None:
        """A message was stored (in the current transaction)."""
        self.waiting = self.waiting.plus(now)

    def undo(self, before: Waiting) -> None:
        """The transaction that started with ``before`` did not commit: its messages and any seal it made
        are gone with it, so what waits is what waited then."""
        self.waiting = before

    def after_batch(self, now: float) -> AuditEntry | None:
        """End of an ingest batch, still inside its transaction: seal if the policy says so. The caller
        undoes (:meth:`undo`) when that transaction does not commit."""
        if not self.policy.due(self.waiting.count, self.waiting.oldest, now):
            return None
        return self.seal()

    def tick(self, now: float) -> AuditEntry | None:
        """Every second or so: rows waiting too long (a quiet moment, another process's, a crashed one's)."""
        oldest = self._store.oldest_unsealed()
        if oldest is None or now - oldest < self.policy.max_age_s:
            return None
        return self.seal()

    def seal(self) -> AuditEntry | None:
        """Cover every stored message no batch covers yet (up to ``MAX_LEAVES_PER_ENTRY``) with one entry.
        In its own transaction, or the caller's (joined): then the caller undoes on failure."""
        before = self.waiting
        try:
            with self._store.transaction():
                rows = self._store.unsealed_messages(MAX_LEAVES_PER_ENTRY)
                self.waiting = NOTHING_WAITING
                if not rows:
                    return None
                leaves = [merkle.Leaf(agent, seq, kind, digest) for agent, seq, kind, digest, _ in rows]
                data = batch_data(leaves, [late for *_, late in rows])
                entry = self._recorder.record(BATCH_KIND, BATCH_SUBJECT, data)
                self._store.mark_sealed(entry.id, [(leaf.agent, leaf.seq) for leaf in leaves])
                return entry
        except BaseException:
            self.waiting = before
            raise

    def seal_all(self) -> int:
        """Shutdown: nothing stored is left uncovered. Returns how many entries were written."""
        written = 0
        while self.seal() is not None:
            written += 1
        return written
