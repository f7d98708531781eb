"""The audit trail: the hash chain (:mod:`.chain`), Merkle batches over accepted messages (:mod:`.merkle`),
signed checkpoints kept outside the database (:mod:`.checkpoints`), archived segments (:mod:`.archive`).

The chain's public names stay importable from ``cleanroom_controller.audit`` as before the split.
"""

from __future__ import annotations

from .chain import (
    GENESIS,
    GENESIS_HEAD,
    AuditEntry,
    ChainHead,
    ChainProblem,
    ChainWalk,
    Mark,
    Tamper,
    canonical_json,
    entry_bytes,
    entry_hash,
    make_entry,
    verify_chain,
    walk_chain,
)

__all__ = [
    "GENESIS",
    "GENESIS_HEAD",
    "AuditEntry",
    "ChainHead",
    "ChainProblem",
    "ChainWalk",
    "Mark",
    "Tamper",
    "canonical_json",
    "entry_bytes",
    "entry_hash",
    "make_entry",
    "verify_chain",
    "walk_chain",
]
