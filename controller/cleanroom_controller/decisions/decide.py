"""Endpoint state + what was just learnt + time → decisions and actions (pure, no I/O).

Conditions: ``compliant``, ``violation`` (named reasons), ``offline`` (Last Will or shutdown) and ``silent``
(nothing accepted for 3 × the policy heartbeat). Decisions are edge-triggered: one is recorded when the
condition or its reasons change, or when a running session has to be ended. A session is ended at most once
per condition: an agent in audit mode answers ``audit_only`` and is not asked again until the condition
changes.

Session lifecycle: ``running`` → ``ending`` (end_session sent) → ``ended`` (ack ``ended``/``not_found``, the
agent's ``session.ended`` event, or the session missing from a later posture). An offline or frozen agent
cannot receive the command now: it stays queued (QoS 1, persistent session) and retried, the session stays
``ending``, and the agent's own fail-closed rule ends it locally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from cleanroom_protocol import AckResult, AgentState, Policy, SessionInfo, Status

from ..models import Condition, EndpointState, SessionRecord, SessionState
from .judge import Judgement

SILENCE_HEARTBEATS = 3
# What one agent can make the controller track and send, whatever it (or a thief of its key) reports. A thin
# client runs one or two VDI clients; 32 leaves room for reconnect churn. Every open session has at most one
# pending end_session, so commands are bounded by sessions; the command cap is a second fence.
MAX_OPEN_SESSIONS = 32
MAX_PENDING_COMMANDS = 32
ACTING_CONDITIONS = frozenset({Condition.VIOLATION, Condition.OFFLINE, Condition.SILENT})
# Outcomes after which the same condition does not ask again (the agent said it will not or could not).
_NO_REPEAT = frozenset({AckResult.AUDIT_ONLY.value, AckResult.FAILED.value, AckResult.REJECTED.value})


@dataclass(frozen=True, slots=True)
class EndSession:
    """Action: end one session: on the endpoint (``end_session``: the agent ends the client) and/or on its
    desktop (``wipe_desktop``: logged off there, the desktop wiped), as the policy says for the condition."""

    agent: str
    session_id: str
    reason: str
    condition_key: str
    endpoint: bool = True
    desktop: bool = False

    def names(self) -> list[str]:
        return [n for n, on in (("end_session", self.endpoint), ("wipe_desktop", self.desktop)) if on]


@dataclass(frozen=True, slots=True)
class Decision:
    agent: str
    condition: Condition
    reasons: tuple[str, ...]
    at: float
    actions: tuple[EndSession, ...]
    deferred: tuple[EndSession, ...] = ()  # over MAX_PENDING_COMMANDS: not sent now


def condition_key(ep: EndpointState) -> str:
    return ep.condition.value + (":" + ",".join(ep.reasons) if ep.reasons else "")


# -- state transitions on what the controller learns -----------------------------------------------------
def seen(ep: EndpointState, *, now: float, seq: int) -> EndpointState:
    """Any accepted message: the endpoint is alive; a silent one is back (its condition comes next)."""
    last_seq = seq if ep.last_seq is None else max(ep.last_seq, seq)
    return replace(ep, last_seen=now, last_seq=last_seq)


def after_posture(
    ep: EndpointState, judgement: Judgement, *, now: float, seq: int, mode: str, policy_ref: str | None
) -> EndpointState:
    return replace(
        ep,
        last_seen=now,
        last_seq=seq if ep.last_seq is None else max(ep.last_seq, seq),
        online=True,
        compliant=judgement.compliant,
        reasons=judgement.reasons,
        condition=Condition.COMPLIANT if judgement.compliant else Condition.VIOLATION,
        mode=mode,
        policy=policy_ref,
    )


def after_status(ep: EndpointState, status: Status, *, now: float, seq: int, is_will: bool) -> EndpointState:
    if status.state is AgentState.OFFLINE:
        # The Will carries an old seq reserved at connect time: it must not lower last_seq.
        last_seq = ep.last_seq if is_will else (seq if ep.last_seq is None else max(ep.last_seq, seq))
        reason = "will" if is_will else status.reason
        return replace(ep, online=False, condition=Condition.OFFLINE, reasons=(reason,), last_seq=last_seq)
    ep = seen(ep, now=now, seq=seq)
    will_seq = status.will_seq if status.will_seq is not None else ep.will_seq
    if ep.condition in (Condition.OFFLINE, Condition.SILENT, Condition.UNKNOWN):
        # Back online; compliance is unknown until its next posture.
        return replace(ep, online=True, will_seq=will_seq, condition=Condition.UNKNOWN, reasons=())
    return replace(ep, online=True, will_seq=will_seq)


def after_liveness(ep: EndpointState, *, now: float, seq: int) -> EndpointState:
    """An event or ack: alive. A silent endpoint goes back to unknown until its next posture."""
    ep = seen(ep, now=now, seq=seq)
    if ep.condition is Condition.SILENT:
        return replace(ep, condition=Condition.UNKNOWN, reasons=())
    return ep


def silence_due(ep: EndpointState, *, now: float, heartbeat_s: float) -> bool:
    if ep.condition in (Condition.OFFLINE, Condition.SILENT) or ep.last_seen is None:
        return False
    return now - ep.last_seen > SILENCE_HEARTBEATS * heartbeat_s


def silent(ep: EndpointState, *, now: float) -> EndpointState:
    quiet = 0.0 if ep.last_seen is None else now - ep.last_seen
    return replace(ep, condition=Condition.SILENT, reasons=(f"no_report_for:{quiet:.0f}s",))


# -- decisions -----------------------------------------------------------------------------------------------
def plan_end_sessions(
    ep: EndpointState, sessions: Sequence[SessionRecord], policy: Policy
) -> tuple[EndSession, ...]:
    if ep.condition not in ACTING_CONDITIONS:
        return ()
    actions = policy.actions_for(ep.condition.value)
    endpoint, desktop = "end_session" in actions, "wipe_desktop" in actions
    if not (endpoint or desktop):
        return ()
    key = condition_key(ep)
    return tuple(
        EndSession(ep.agent, s.id, key, key, endpoint=endpoint, desktop=desktop)
        for s in sessions
        if s.state is SessionState.RUNNING
        and not (s.command_condition == key and s.command_result in _NO_REPEAT)
    )


def command_room(pending: int) -> int:
    """How many more end_session commands an agent with ``pending`` unanswered ones may be sent."""
    return max(0, MAX_PENDING_COMMANDS - pending)


def decide(
    before: EndpointState,
    after: EndpointState,
    sessions: Sequence[SessionRecord],
    policy: Policy,
    *,
    now: float,
    room: int | None = None,
) -> Decision | None:
    """A decision when the condition or its reasons changed, or when sessions must be ended now.

    ``room``: how many commands may still be sent (:func:`command_room`); ends beyond it are left for a
    later message (their sessions stay running) and named in ``Decision.deferred``."""
    actions = plan_end_sessions(after, sessions, policy)
    deferred: tuple[EndSession, ...] = ()
    if room is not None and len(actions) > room:
        actions, deferred = actions[:room], actions[room:]
    changed = (before.condition, before.reasons) != (after.condition, after.reasons)
    if not changed and not actions:
        return None  # ends still deferred are not news: they go when there is room
    return Decision(after.agent, after.condition, after.reasons, now, actions, deferred)


# -- sessions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reconciled:
    changes: list[SessionRecord]
    refused: tuple[str, ...]  # reported sessions not tracked: the agent is at its open-session cap


def reconcile(
    agent: str,
    known: Sequence[SessionRecord],
    reported: Sequence[SessionInfo],
    *,
    max_open: int = MAX_OPEN_SESSIONS,
) -> Reconciled:
    """The records that change given the sessions a posture reports (the agent's list is authoritative).

    ``known``: the agent's open sessions plus any stored record of a reported id (an ended one stays ended).
    New sessions are tracked while fewer than ``max_open`` would be open, in the order reported."""
    by_id = {s.id: s for s in known}
    changed: list[SessionRecord] = []
    refused: list[str] = []
    reported_ids: set[str] = set()
    staying = {
        info.id for info in reported if info.id in by_id and by_id[info.id].state is not SessionState.ENDED
    }
    room = max_open - len(staying)
    for info in reported:
        if info.id in reported_ids:
            continue  # the same id twice in one posture: the first one counts
        reported_ids.add(info.id)
        old = by_id.get(info.id)
        if old is None:
            if room <= 0:
                refused.append(info.id)
                continue
            room -= 1
            changed.append(
                SessionRecord(
                    agent, info.id, SessionState.RUNNING, info.client, info.pid, info.user, info.started
                )
            )
        elif old.state is SessionState.ENDING and old.command_result == "expired":
            # The end request never got through and the session still runs: it can be asked again.
            changed.append(replace(old, state=SessionState.RUNNING))
    for old in known:
        if old.state is not SessionState.ENDED and old.id not in reported_ids:
            changed.append(ended(old, "gone_from_posture"))
    return Reconciled(changed, tuple(refused))


def reconcile_sessions(
    agent: str, known: Sequence[SessionRecord], reported: Sequence[SessionInfo]
) -> list[SessionRecord]:
    """:func:`reconcile`'s changes (with the open-session cap)."""
    return reconcile(agent, known, reported).changes


def may_open_session(open_sessions: int) -> bool:
    """Whether one more session of an agent with ``open_sessions`` running or ending may be tracked."""
    return open_sessions < MAX_OPEN_SESSIONS


def ended(s: SessionRecord, reason: str) -> SessionRecord:
    """Ended; the reason is the controller's when it was ending it, otherwise what was observed."""
    why = s.ending_reason if s.state is SessionState.ENDING and s.ending_reason else reason
    return replace(s, state=SessionState.ENDED, ended_reason=why)


def started(
    agent: str, session_id: str, client: str, pid: int | None, user: str | None, at: float
) -> SessionRecord:
    return SessionRecord(agent, session_id, SessionState.RUNNING, client, pid, user, at)


def ending(s: SessionRecord, *, command_id: str, reason: str, key: str) -> SessionRecord:
    return replace(
        s,
        state=SessionState.ENDING,
        ending_reason=reason,
        command_id=command_id,
        command_result=None,
        command_condition=key,
    )


def after_ack(s: SessionRecord, result: str) -> SessionRecord:
    """Apply a command outcome (an ack result, or ``expired`` when retries ran out) to its session."""
    if result in (AckResult.ENDED.value, AckResult.NOT_FOUND.value):
        return replace(ended(s, s.ending_reason or "ended_by_command"), command_result=result)
    if result == "expired":
        # Still ending: queued for the agent's persistent session; the agent fails closed by itself.
        return replace(s, command_result=result)
    # Not ended (audit mode, failure, refusal): it runs on, and a later end is not ours to explain.
    return replace(s, state=SessionState.RUNNING, command_result=result, ending_reason=None)


def retry_delay(attempt: int, timeout_s: float) -> float:
    """How long to wait for an ack after send number ``attempt`` (1-based): doubling, capped at 8 ×."""
    return timeout_s * float(min(2 ** max(0, attempt - 1), 8))
