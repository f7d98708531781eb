"""``audit verify`` over a store: the chain streamed from its base, through every signed checkpoint, to the
recorded head. Constant memory: entries are read in chunks and only a small window is kept."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .chain import GENESIS_HEAD, ChainHead, ChainProblem, Mark, Tamper, walk_chain

if TYPE_CHECKING:
    from ..store import Store


@dataclass(frozen=True, slots=True)
class VerifyReport:
    entries: int
    base: ChainHead
    last: ChainHead
    problem: ChainProblem | None
    checkpoints_passed: int
    checkpoints: int
    seconds: float
    checkpoint_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.checkpoint_problems


def verify_store(
    store: Store, marks: list[Mark] | None = None, checkpoint_problems: list[str] | None = None
) -> VerifyReport:
    """Walk the stored chain. ``marks``: the verified checkpoints (``None``: none kept)."""
    started = time.perf_counter()
    marks = marks or []
    with store.audit_snapshot():
        base, head = store.audit_base(), store.audit_head()
        problem: ChainProblem | None = None
        if base != GENESIS_HEAD and not any(m.at == base for m in marks):
            problem = ChainProblem(
                base.id + 1,
                Tamper.DELETED,
                f"entries 1..{base.id} are recorded as archived, but no signed checkpoint has entry {base.id} "
                "with that hash",
            )
            walk = None
        else:
            walk = walk_chain(store.audit_entries(base.id), start=base, head=head, marks=marks)
    return VerifyReport(
        entries=walk.count if walk else 0,
        base=base,
        last=walk.last if walk else base,
        problem=walk.problem if walk else problem,
        checkpoints_passed=walk.marks_passed if walk else 0,
        checkpoints=len(marks),
        seconds=time.perf_counter() - started,
        checkpoint_problems=list(checkpoint_problems or []),
    )
