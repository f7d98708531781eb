"""Pure decisions: policy selection, fail-closed, the launch gate."""

from __future__ import annotations

import pytest

from cleanroom_agent import (
    NO_POLICY,
    HostFacts,
    PolicyChoice,
    PolicyInForce,
    PolicySource,
    assemble_posture,
    choose_policy,
    fail_closed_reason,
    launch_decision,
)
from cleanroom_agent.decisions import SpoolLevel, is_evidence_ack, is_evidence_event, spool_reserve_rows
from cleanroom_protocol import AckResult, Mode, Policy, Posture, ProcessInfo

P3 = Policy(id="billing", version=3)
FACTS = HostFacts("h", "Debian", "6.1", "x11", 1.0, ["alice"], [])


def signed(policy: Policy) -> PolicyInForce:
    return PolicyInForce(policy, PolicySource.SIGNED)


def test_signed_policy_replaces_bootstrap_or_none_whatever_its_version() -> None:
    assert choose_policy(NO_POLICY, P3) is PolicyChoice.APPLY
    bootstrap = PolicyInForce(Policy(id="local", version=99), PolicySource.BOOTSTRAP)
    assert choose_policy(bootstrap, P3) is PolicyChoice.APPLY


def test_among_signed_policies_older_versions_are_refused() -> None:
    assert choose_policy(signed(P3), Policy(id="billing", version=2)) is PolicyChoice.OLDER
    assert choose_policy(signed(P3), Policy(id="billing", version=4)) is PolicyChoice.APPLY
    assert choose_policy(signed(P3), Policy(id="billing", version=3)) is PolicyChoice.UNCHANGED
    changed = Policy(id="billing", version=3, description="same version, other content")
    assert choose_policy(signed(P3), changed) is PolicyChoice.APPLY


def fc(**kw: object) -> str | None:
    args: dict[str, object] = {
        "mode": Mode.ENFORCE,
        "in_force": signed(P3),
        "offline_since": 1000.0,
        "now": 1000.0 + 121,
        "local_violations": [],
        "session_count": 1,
    }
    args.update(kw)
    return fail_closed_reason(**args)  # type: ignore[arg-type]


def test_fail_closed_when_offline_too_long() -> None:
    assert fc() == "offline_for_121s"
    assert fc(now=1000.0 + 119) is None  # within max_offline_s (120)


def test_fail_closed_when_offline_and_locally_non_compliant() -> None:
    assert (
        fc(now=1001.0, local_violations=["denied_process:scrot"])
        == "offline_non_compliant:denied_process:scrot"
    )


def test_never_fail_closed_online_in_audit_without_sessions_or_without_the_action() -> None:
    assert fc(offline_since=None, local_violations=["x"]) is None
    assert fc(mode=Mode.AUDIT) is None
    assert fc(session_count=0) is None
    assert fc(in_force=NO_POLICY) is None
    assert fc(in_force=signed(Policy(id="p", version=1, on_violation={"actions": []}))) is None


SIGNED_P3 = signed(P3)


def posture(
    mode: Mode = Mode.ENFORCE, in_force: PolicyInForce = SIGNED_P3, denied: list[ProcessInfo] | None = None
) -> Posture:
    return assemble_posture(
        agent_id="ep",
        mode=mode,
        policy=in_force.ref,
        facts=FACTS,
        denied=denied or [],
        sessions=[],
        enforcers=[],
        offline_since=None,
    )


def test_launch_allowed_when_compliant_and_a_known_client() -> None:
    d = launch_decision(posture=posture(), in_force=signed(P3), client="xfreerdp", offline_since=None, now=0)
    assert d.allowed and d.reasons == []


def test_launch_denied_with_named_reasons() -> None:
    policy = Policy(id="billing", version=3, processes={"deny": ["scrot"]})
    bad = posture(in_force=signed(policy), denied=[ProcessInfo(name="scrot", pid=7)])
    d = launch_decision(posture=bad, in_force=signed(policy), client="firefox", offline_since=0.0, now=500)
    assert not d.allowed
    assert d.reasons == ["denied_process:scrot", "not_a_session_client:firefox", "offline_for_500s"]
    assert launch_decision(
        posture=posture(in_force=NO_POLICY), in_force=NO_POLICY, client="xfreerdp", offline_since=None, now=0
    ).reasons == ["policy_missing"]


def test_audit_mode_allows_but_reports_what_would_deny() -> None:
    policy = Policy(id="billing", version=3, processes={"deny": ["scrot"]})
    bad = posture(Mode.AUDIT, signed(policy), [ProcessInfo(name="scrot", pid=7)])
    d = launch_decision(posture=bad, in_force=signed(policy), client="xfreerdp", offline_since=None, now=0)
    assert d.allowed and d.audit_only and d.reasons == ["denied_process:scrot"]


def test_spool_level_is_full_at_its_bound_and_until_drained_to_the_low_water_mark() -> None:
    level = SpoolLevel(100)  # low water: 90 rows
    assert [level.update(rows) for rows in (0, 50, 99)] == [False, False, False] and not level.full
    assert level.update(100) and level.full  # the next event would be refused
    assert not level.update(101)  # a posture or status row past the bound: still full, no change
    assert not level.update(91) and level.full, "above the low-water mark: not flapping back"
    assert level.update(90) and not level.full
    assert not level.update(99) and not level.full, "below the bound again: not full"
    assert level.update(100) and level.full


def test_only_evidence_enters_the_reserve_beyond_the_bound_and_the_reserve_is_bounded() -> None:
    level = SpoolLevel(1000)  # reserve: 1 % = 10 rows, but at least 32
    assert level.reserve_rows == 32 and spool_reserve_rows(100_000) == 1000 and spool_reserve_rows(3201) == 33
    assert level.admits(999, evidence=False) and not level.admits(1000, evidence=False)
    assert level.admits(1000, evidence=True) and level.admits(1031, evidence=True)
    assert not level.admits(1032, evidence=True), "the reserve fills too"


def test_evidence_is_the_record_of_ending_sessions() -> None:
    assert is_evidence_event("agent.fail_closed") and is_evidence_event("session.ended")
    assert not any(map(is_evidence_event, ("session.started", "launch.denied", "spool.overflow", "x")))
    assert all(map(is_evidence_ack, (AckResult.ENDED, AckResult.FAILED, AckResult.NOT_FOUND)))
    assert is_evidence_ack(AckResult.AUDIT_ONLY) and not is_evidence_ack(AckResult.REJECTED)


def test_spool_level_refuses_a_nonsense_bound() -> None:
    with pytest.raises(ValueError, match="spool bound"):
        SpoolLevel(0)
    with pytest.raises(ValueError, match="low-water"):
        SpoolLevel(10, low_water=1.0)


def test_fail_closed_when_the_spool_is_full_even_online() -> None:
    assert fc(offline_since=None, spool_full=True) == "spool_full"
    assert fc(spool_full=True) == "spool_full"  # offline too long as well: the spool is named
    assert fc(offline_since=None, spool_full=False) is None


def test_a_full_spool_ends_nothing_in_audit_without_sessions_or_without_the_action() -> None:
    assert fc(offline_since=None, spool_full=True, mode=Mode.AUDIT) is None
    assert fc(offline_since=None, spool_full=True, session_count=0) is None
    no_action = signed(Policy(id="p", version=1, on_violation={"actions": []}))
    assert fc(offline_since=None, spool_full=True, in_force=no_action) is None


def test_launch_denied_while_the_spool_is_full_and_allowed_once_drained() -> None:
    full = posture().model_copy(update={"spool_full": True, "spool_refused": 3})
    d = launch_decision(posture=full, in_force=SIGNED_P3, client="xfreerdp", offline_since=None, now=0)
    assert not d.allowed and d.reasons == ["spool_full"]
    drained = posture().model_copy(update={"spool_refused": 3})
    assert launch_decision(
        posture=drained, in_force=SIGNED_P3, client="xfreerdp", offline_since=None, now=0
    ).allowed
