"""judge: posture + policy → compliant / violation with the protocol's named reasons."""

from __future__ import annotations

from cleanroom_controller import judge
from cleanroom_protocol import Mode
from tests.controller.helpers import posture, shipped_policy


def test_compliant_posture() -> None:
    verdict = judge(posture(), shipped_policy())
    assert verdict.compliant
    assert verdict.reasons == ()


def test_denied_process_is_a_named_violation() -> None:
    verdict = judge(posture(denied=("scrot", "anydesk")), shipped_policy())
    assert not verdict.compliant
    assert verdict.reasons == ("denied_process:anydesk", "denied_process:scrot")


def test_outdated_policy_and_forbidden_audit_mode() -> None:
    policy = shipped_policy()
    newer = policy.model_copy(
        update={
            "version": policy.version + 1,
            "compliance": policy.compliance.model_copy(update={"allow_audit_mode": False}),
        }
    )
    verdict = judge(posture(policy=policy, mode=Mode.AUDIT), newer)
    assert not verdict.compliant
    assert verdict.reasons[0].startswith("policy_outdated:")
    assert "audit_mode" in verdict.reasons
