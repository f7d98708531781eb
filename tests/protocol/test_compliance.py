"""The shared compliance check: named reasons, stable order."""

from __future__ import annotations

from cleanroom_protocol import (
    EnforcerState,
    EnforcerStatus,
    Mode,
    MountInfo,
    PolicyRef,
    Posture,
    ProcessInfo,
    parse_policy,
    policy_hash,
    violations,
)

POLICY = parse_policy(
    'id = "p"\nversion = 3\n[processes]\ndeny = ["anydesk", "obs"]\n'
    '[compliance]\nrequire_enforcers = ["clipboard"]\nallow_audit_mode = false\nallow_removable_mounts = false\n'
)


def posture(**changes: object) -> Posture:
    base: dict[str, object] = {
        "agent_id": "a", "agent_version": "0", "mode": Mode.ENFORCE,
        "policy": PolicyRef(id="p", version=3, hash=policy_hash(POLICY)), "hostname": "h", "os": "o",
        "kernel": "k", "display_server": "x11", "boot_time": 0.0, "users": [], "mounts": [],
        "denied_processes": [], "sessions": [],
        "enforcers": [EnforcerStatus(name="clipboard", state=EnforcerState.ACTIVE, policy=policy_hash(POLICY))],
    }  # fmt: skip
    base.update(changes)
    return Posture.model_validate(base)


def test_compliant() -> None:
    assert violations(posture(), POLICY) == []


def test_each_reason_is_named() -> None:
    bad = posture(
        policy=PolicyRef(id="p", version=2, hash="h"),
        denied_processes=[
            ProcessInfo(name="obs", pid=2),
            ProcessInfo(name="anydesk", pid=1),
            ProcessInfo(name="obs", pid=3),
        ],
        mode=Mode.AUDIT,
        enforcers=[EnforcerStatus(name="clipboard", state=EnforcerState.UNSUPPORTED, reason="no display")],
        mounts=[
            MountInfo(
                device="/dev/sdb1", mountpoint="/media/usb", fstype="vfat", removable=True, writable=True
            )
        ],
        spool_full=True,
        spool_refused=4,
    )
    assert violations(bad, POLICY) == [
        "policy_outdated:p@2<p@3",
        "denied_process:anydesk",
        "denied_process:obs",
        "audit_mode",
        "enforcer_not_active:clipboard:unsupported",
        "removable_mount:/media/usb",
        "spool_full",
    ]


def test_a_full_spool_is_a_violation_but_a_past_gap_alone_is_not() -> None:
    """An endpoint that cannot record what it does is not compliant; once drained it is again, and the
    events it refused meanwhile (``spool_refused``) stay reported as a count, not judged for ever."""
    assert violations(posture(spool_full=True), POLICY) == ["spool_full"]
    assert violations(posture(spool_refused=12), POLICY) == []


def test_missing_policy_and_absent_enforcer() -> None:
    assert violations(posture(policy=None, enforcers=[]), POLICY) == [
        "policy_missing",
        "enforcer_not_active:clipboard:absent",
    ]


def test_newer_policy_on_the_agent_is_not_outdated() -> None:
    newer = EnforcerStatus(name="clipboard", state=EnforcerState.ACTIVE, policy="h")
    assert violations(posture(policy=PolicyRef(id="p", version=4, hash="h"), enforcers=[newer]), POLICY) == []


def test_same_version_with_other_content_is_a_mismatch() -> None:
    assert violations(posture(policy=PolicyRef(id="p", version=3, hash="sha256:other")), POLICY) == [
        "policy_mismatch:p@3",
        "enforcer_policy_mismatch:clipboard",
    ]


def test_an_active_enforcer_must_enforce_the_reported_policy() -> None:
    """`active` with the shipped defaults (no hash, or another policy's) is not the policy judged."""
    for enforced in (None, "sha256:defaults"):
        stale = EnforcerStatus(name="clipboard", state=EnforcerState.ACTIVE, policy=enforced)
        assert violations(posture(enforcers=[stale]), POLICY) == ["enforcer_policy_mismatch:clipboard"]
