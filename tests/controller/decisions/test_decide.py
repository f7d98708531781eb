"""decide: state + facts + time → conditions, edge-triggered decisions and end_session actions (pure)."""

from __future__ import annotations

from dataclasses import replace

from cleanroom_controller import Condition, EndpointState, SessionRecord, SessionState
from cleanroom_controller.decisions.decide import (
    after_ack,
    after_liveness,
    after_posture,
    after_status,
    ending,
    plan_end_sessions,
    reconcile_sessions,
    retry_delay,
    silence_due,
    silent,
)
from cleanroom_controller.decisions.decide import (
    decide as decide_fn,
)
from cleanroom_controller.decisions.judge import Judgement
from cleanroom_protocol import AgentState, Status
from cleanroom_protocol.policy import OnViolationSection
from tests.controller.helpers import session, shipped_policy

POLICY = shipped_policy()
RUNNING = SessionRecord("a1", "s-100-1", SessionState.RUNNING, "xfreerdp", 100)


def online(now: float = 100.0) -> EndpointState:
    return EndpointState("a1", Condition.COMPLIANT, True, True, (), now, 5, 3)


def test_violation_ends_running_sessions() -> None:
    before = online()
    after = after_posture(before, Judgement(False, ("denied_process:scrot",)), now=101, seq=6, mode="enforce",
                          policy_ref="offshore-billing@3")  # fmt: skip
    d = decide_fn(before, after, [RUNNING], POLICY, now=101)
    assert d is not None
    assert d.condition is Condition.VIOLATION
    assert d.reasons == ("denied_process:scrot",)
    assert [(a.agent, a.session_id) for a in d.actions] == [("a1", "s-100-1")]
    assert after.last_seq == 6


def test_no_action_without_end_session_in_policy() -> None:
    policy = POLICY.model_copy(update={"on_violation": OnViolationSection(actions=[])})
    after = replace(online(), condition=Condition.VIOLATION, reasons=("x",))
    d = decide_fn(online(), after, [RUNNING], policy, now=1)
    assert d is not None
    assert d.actions == ()


def test_unchanged_compliant_posture_decides_nothing() -> None:
    before = online()
    after = after_posture(before, Judgement(True, ()), now=102, seq=7, mode="enforce", policy_ref=None)
    assert decide_fn(before, after, [RUNNING], POLICY, now=102) is None


def test_will_makes_offline_and_keeps_last_seq() -> None:
    before = online()
    after = after_status(
        before, Status(state=AgentState.OFFLINE, reason="will"), now=110, seq=3, is_will=True
    )
    assert after.condition is Condition.OFFLINE
    assert after.online is False
    assert after.last_seq == 5  # the Will's old seq does not rewind replay protection
    d = decide_fn(before, after, [RUNNING], POLICY, now=110)
    assert d is not None
    assert d.reasons == ("will",)
    assert len(d.actions) == 1


def test_silent_after_three_heartbeats() -> None:
    ep = online(now=100.0)
    hb = POLICY.report.heartbeat_s
    assert not silence_due(ep, now=100 + 3 * hb - 1, heartbeat_s=hb)
    assert silence_due(ep, now=100 + 3 * hb + 1, heartbeat_s=hb)
    quiet = silent(ep, now=100 + 3 * hb + 1)
    assert quiet.condition is Condition.SILENT
    d = decide_fn(ep, quiet, [RUNNING], POLICY, now=200)
    assert d is not None
    assert d.actions
    # Already silent or offline: not decided again; back alive → unknown until the next posture.
    assert not silence_due(quiet, now=10_000, heartbeat_s=hb)
    assert after_liveness(quiet, now=300, seq=9).condition is Condition.UNKNOWN


def test_session_already_ending_is_not_asked_again() -> None:
    ep = replace(online(), condition=Condition.VIOLATION, reasons=("x",))
    asked = ending(RUNNING, command_id="c1", reason="violation:x", key="violation:x")
    assert plan_end_sessions(ep, [asked], POLICY) == ()


def test_audit_only_answer_is_not_repeated_for_the_same_condition() -> None:
    ep = replace(online(), condition=Condition.VIOLATION, reasons=("x",))
    answered = after_ack(
        ending(RUNNING, command_id="c1", reason="violation:x", key="violation:x"), "audit_only"
    )
    assert answered.state is SessionState.RUNNING
    assert plan_end_sessions(ep, [answered], POLICY) == ()
    other = replace(ep, reasons=("y",))
    assert len(plan_end_sessions(other, [answered], POLICY)) == 1


def test_ack_ended_ends_the_session_with_the_reason() -> None:
    s = after_ack(ending(RUNNING, command_id="c1", reason="violation:x", key="k"), "ended")
    assert s.state is SessionState.ENDED
    assert s.ended_reason == "violation:x"


def test_expired_command_keeps_the_session_ending_until_the_agent_reports() -> None:
    s = after_ack(ending(RUNNING, command_id="c1", reason="offline:will", key="k"), "expired")
    assert s.state is SessionState.ENDING
    # The agent comes back still running it: it can be asked again.
    changes = reconcile_sessions("a1", [s], [session()])
    assert [c.state for c in changes] == [SessionState.RUNNING]
    # ... or without it: ended with the reason it was being ended for.
    changes = reconcile_sessions("a1", [s], [])
    assert changes[0].state is SessionState.ENDED
    assert changes[0].ended_reason == "offline:will"


def test_reconcile_adds_new_and_ends_missing_sessions() -> None:
    changes = reconcile_sessions("a1", [RUNNING], [session("s-200-2", pid=200)])
    by_id = {c.id: c for c in changes}
    assert by_id["s-200-2"].state is SessionState.RUNNING
    assert by_id["s-100-1"].state is SessionState.ENDED
    assert by_id["s-100-1"].ended_reason == "gone_from_posture"


def test_retry_backoff_doubles_and_caps() -> None:
    assert [retry_delay(n, 2.0) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]


def test_a_session_that_ends_by_itself_after_audit_only_is_not_blamed_on_the_controller() -> None:
    answered = after_ack(
        ending(RUNNING, command_id="c1", reason="violation:x", key="violation:x"), "audit_only"
    )
    (gone,) = reconcile_sessions("a1", [answered], [])
    assert gone.state is SessionState.ENDED
    assert gone.ended_reason == "gone_from_posture"
