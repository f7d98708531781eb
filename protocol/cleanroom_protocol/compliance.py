"""Is this posture compliant with this policy? Pure; shared by the agent (launch gate, fail-closed) and
the controller (judge), so both sides give the same answer and the same reasons."""

from __future__ import annotations

from .messages import EnforcerState, Mode, Posture
from .policy import Policy, policy_hash


def violations(posture: Posture, policy: Policy) -> list[str]:
    """Named reasons this posture violates ``policy``; empty when compliant. Order is stable."""
    reasons: list[str] = []
    if posture.policy is None:
        reasons.append("policy_missing")
    elif posture.policy.id != policy.id or posture.policy.version < policy.version:
        reasons.append(
            f"policy_outdated:{posture.policy.id}@{posture.policy.version}<{policy.id}@{policy.version}"
        )
    elif posture.policy.version == policy.version and posture.policy.hash != policy_hash(policy):
        # Same id and version but other content: a hand-edited or forged copy is not the policy judged.
        # (A newer version on the agent is a roll-out in progress, judged like today.)
        reasons.append(f"policy_mismatch:{posture.policy.id}@{posture.policy.version}")
    denied = {name.lower() for name in policy.processes.deny}
    for name in sorted({p.name for p in posture.denied_processes if p.name.lower() in denied}):
        reasons.append(f"denied_process:{name}")
    if posture.mode is Mode.AUDIT and not policy.compliance.allow_audit_mode:
        reasons.append("audit_mode")
    enforcers = {e.name: e for e in posture.enforcers}
    for name in policy.compliance.require_enforcers:
        enforcer = enforcers.get(name)
        if enforcer is None or enforcer.state is not EnforcerState.ACTIVE:
            reasons.append(f"enforcer_not_active:{name}:{enforcer.state.value if enforcer else 'absent'}")
        elif posture.policy is None or enforcer.policy != posture.policy.hash:
            # Active, but with rules other than the policy the agent reports: a policy that arrived while
            # the enforcer started, or an apply that failed half way.
            reasons.append(f"enforcer_policy_mismatch:{name}")
    if not policy.compliance.allow_removable_mounts:
        for mount in posture.mounts:
            if mount.removable:
                reasons.append(f"removable_mount:{mount.mountpoint}")
    if posture.spool_full:
        # The endpoint cannot record what it does (its outbox waits on the controller's watermark).
        reasons.append("spool_full")
    return reasons
