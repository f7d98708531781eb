"""Pure decisions of the agent: which policy is in force, when the spool is full, when to fail closed,
whether a launch may go.

No I/O here: the daemon gathers the facts and acts on the answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from cleanroom_protocol import AckResult, Mode, Policy, PolicyRef, Posture, policy_hash, violations


class PolicySource(StrEnum):
    NONE = "none"
    BOOTSTRAP = "bootstrap"  # the local --policy file, unsigned, used until a signed one arrives
    SIGNED = "signed"  # verified against the controller key


@dataclass(frozen=True, slots=True)
class PolicyInForce:
    policy: Policy | None
    source: PolicySource

    @property
    def ref(self) -> PolicyRef | None:
        if self.policy is None:
            return None
        return PolicyRef(id=self.policy.id, version=self.policy.version, hash=policy_hash(self.policy))

    @property
    def effective(self) -> Policy:
        """The policy to act with; with none in force, the protocol defaults (known clients, nothing denied)."""
        return self.policy if self.policy is not None else Policy(id="none", version=0)


NO_POLICY = PolicyInForce(None, PolicySource.NONE)


class PolicyChoice(StrEnum):
    APPLY = "apply"
    UNCHANGED = "unchanged"  # the same document again (retained re-delivery): nothing to do
    OLDER = "older"  # refused: version below the one in force


def choose_policy(current: PolicyInForce, candidate: Policy) -> PolicyChoice:
    """Should a correctly signed ``candidate`` replace ``current``?

    A signed policy always replaces an unsigned bootstrap or no policy (the controller is the authority);
    among signed policies the version must not be older.
    """
    if current.source is not PolicySource.SIGNED or current.policy is None:
        return PolicyChoice.APPLY
    if candidate.version < current.policy.version:
        return PolicyChoice.OLDER
    if candidate.version == current.policy.version and policy_hash(candidate) == policy_hash(current.policy):
        return PolicyChoice.UNCHANGED
    return PolicyChoice.APPLY


def may_end_sessions(mode: Mode, policy: Policy) -> bool:
    """Does this agent end sessions by itself (enforce mode and ``end_session`` among the actions)?"""
    return mode is Mode.ENFORCE and "end_session" in policy.on_violation.actions


# A full spool stays full until a watermark has drained it to this fraction of its bound (hysteresis).
SPOOL_LOW_WATER = 0.9
# Beyond its bound the spool keeps a reserve for the record of the agent ending sessions (see
# ``is_evidence_event``): this fraction of the bound, and at least ``SPOOL_RESERVE_MIN_ROWS`` rows, so even a
# small spool holds the fail-closed evidence of several attempts. The reserve is bounded too: full, the
# evidence is refused and counted like any event.
SPOOL_RESERVE = 0.01
SPOOL_RESERVE_MIN_ROWS = 32
# What the agent did about a full spool (or a cut-off): the events that must reach the controller even
# when nothing else fits. ``session.ended`` also covers a session that exited by itself meanwhile: the
# record of sessions must close.
EVIDENCE_EVENTS = frozenset({"agent.fail_closed", "session.ended"})


def is_evidence_event(kind: str) -> bool:
    """May this event use the spool's reserve (the record of the agent ending sessions)?"""
    return kind in EVIDENCE_EVENTS


def is_evidence_ack(result: AckResult) -> bool:
    """May this ack use the spool's reserve? Every answer to ``end_session`` (ended, failed, not found,
    audit only) is; ``rejected`` (an unknown action, an invalid command) is not: nothing was ended."""
    return result is not AckResult.REJECTED


def spool_reserve_rows(max_rows: int) -> int:
    """Rows kept beyond ``max_rows`` for evidence only: 1 % of the bound, at least 32."""
    return max(SPOOL_RESERVE_MIN_ROWS, math.ceil(max_rows * SPOOL_RESERVE))


class SpoolLevel:
    """Is the outbox full? Full from the moment it holds ``max_rows`` rows (the next event would be
    refused), and full until the controller's watermarks drain it to ``low_water`` of that: an endpoint at
    the edge of its bound does not flap between failing closed and launching with every row."""

    def __init__(self, max_rows: int, *, low_water: float = SPOOL_LOW_WATER) -> None:
        if max_rows < 1:
            raise ValueError(f"spool bound must be at least 1 row, not {max_rows}")
        if not 0.0 <= low_water < 1.0:
            raise ValueError(f"spool low-water mark must be a fraction in [0, 1), not {low_water}")
        self.max_rows = max_rows
        self.low_rows = int(max_rows * low_water)
        self.reserve_rows = spool_reserve_rows(max_rows)
        self.full = False

    def admits(self, rows: int, *, evidence: bool) -> bool:
        """May one more non-coalescing row join the ``rows`` held? Below the bound anything may; from the
        bound on only evidence, into the reserve, until ``max_rows + reserve_rows``."""
        return rows < self.max_rows + (self.reserve_rows if evidence else 0)

    def update(self, rows: int) -> bool:
        """The spool holds ``rows`` now; ``True`` when that changed :attr:`full`."""
        was = self.full
        if rows >= self.max_rows:
            self.full = True
        elif rows <= self.low_rows:
            self.full = False
        return self.full is not was


def fail_closed_reason(
    *,
    mode: Mode,
    in_force: PolicyInForce,
    offline_since: float | None,
    now: float,
    local_violations: list[str],
    session_count: int,
    spool_full: bool = False,
) -> str | None:
    """Why the agent must end its sessions itself right now, or ``None``.

    A full spool (``spool_full``: :class:`SpoolLevel`), online or not: an endpoint that cannot record what
    it does must not go on as if it could. Otherwise only while cut off from the controller (online, the
    controller judges): offline longer than ``report.max_offline_s``, or offline and locally non-compliant.
    Needs a policy in force whose actions include ``end_session``, enforce mode, and something to end.
    """
    policy = in_force.policy
    if policy is None or session_count == 0 or not may_end_sessions(mode, policy):
        return None
    if spool_full:
        return "spool_full"
    if offline_since is None:
        return None
    offline_for = now - offline_since
    if offline_for > policy.report.max_offline_s:
        return f"offline_for_{int(offline_for)}s"
    if local_violations:
        return "offline_non_compliant:" + ",".join(local_violations)
    return None


@dataclass(frozen=True, slots=True)
class LaunchDecision:
    allowed: bool
    reasons: list[str]
    audit_only: bool = False  # audit mode: would have been denied, allowed anyway and reported


def launch_decision(
    *,
    posture: Posture,
    in_force: PolicyInForce,
    client: str,
    offline_since: float | None,
    now: float,
) -> LaunchDecision:
    """May the VDI client ``client`` start now? Same compliance check the controller uses, plus: the
    executable must be a configured client (else it would not be tracked as a session) and the agent
    must not be cut off longer than ``max_offline_s``."""
    policy = in_force.effective
    reasons = list(violations(posture, policy)) if in_force.policy is not None else ["policy_missing"]
    if client not in policy.sessions.clients:
        reasons.append(f"not_a_session_client:{client}")
    if offline_since is not None and now - offline_since > policy.report.max_offline_s:
        reasons.append(f"offline_for_{int(now - offline_since)}s")
    if not reasons:
        return LaunchDecision(True, [])
    if posture.mode is Mode.AUDIT:
        return LaunchDecision(True, reasons, audit_only=True)
    return LaunchDecision(False, reasons)
