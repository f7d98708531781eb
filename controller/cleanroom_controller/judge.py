"""Posture + policy → compliant or violation with named reasons (pure).

The reasons come from :func:`cleanroom_protocol.violations`, the one compliance check the agent uses too,
so both sides give the same answer for the same posture.
"""

from __future__ import annotations

from dataclasses import dataclass

from cleanroom_protocol import Policy, Posture, violations


@dataclass(frozen=True, slots=True)
class Judgement:
    compliant: bool
    reasons: tuple[str, ...]


def judge(posture: Posture, policy: Policy) -> Judgement:
    reasons = tuple(violations(posture, policy))
    return Judgement(compliant=not reasons, reasons=reasons)
