"""Posture + policy → compliant or violation with named reasons (pure).

The reasons come from :func:`cleanroom_protocol.violations`, the one compliance check the agent uses too,
so both sides give the same answer for the same posture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when judging: the package re-exports ``judge`` and must stay quick to import
    from cleanroom_protocol import Policy, Posture


@dataclass(frozen=True, slots=True)
class Judgement:
    compliant: bool
    reasons: tuple[str, ...]


def judge(posture: Posture, policy: Policy) -> Judgement:
    from cleanroom_protocol import violations

    reasons = tuple(violations(posture, policy))
    return Judgement(compliant=not reasons, reasons=reasons)
