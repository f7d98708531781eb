"""Applies what ingest verified to the endpoint/session state, asks the pure ``decide`` module what it means,
records decisions and hands actions to the runner. The only place that turns facts into stored state."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import structlog

from cleanroom_protocol import Ack, Event, Policy, Posture, Status

from .audit.recorder import Recorder
from .decisions import decide
from .decisions.decide import Decision, EndSession
from .decisions.judge import judge
from .models import CommandState, Condition, EndpointState, SessionRecord, SessionState
from .store import Store

log = structlog.get_logger("cleanroom.controller.tracker")

ActionSink = Callable[[EndSession], None]


class DesktopSessions(Protocol):
    """What the tracker tells the desktops (desktops/runner.py) about sessions."""

    def session_started(
        self,
        agent: str,
        session_id: str,
        *,
        address: str | None,
        name: str | None,
        user: str | None,
        now: float,
    ) -> object: ...

    def session_ended(self, agent: str, session_id: str, *, reason: str, now: float) -> object: ...


def _older(ep: EndpointState, seq: int) -> bool:
    return ep.last_seq is not None and seq <= ep.last_seq


class Tracker:
    def __init__(
        self,
        *,
        store: Store,
        recorder: Recorder,
        policy: Callable[[], Policy],
        act: ActionSink,
        recovered: Callable[[str], None] | None = None,
        desktops: DesktopSessions | None = None,
    ) -> None:
        self._store = store
        self._recorder = recorder
        self._policy = policy
        self._act = act
        self._recovered = recovered
        self._desktops = desktops

    # -- facts ---------------------------------------------------------------------------------------------
    # ``before``: the endpoint as the caller just read it in the same transaction (saves a read); ``None``
    # reads it. Endpoint state only moves forward: a message whose seq is not above the stored last_seq
    # (possible with a shared subscription, where another process already applied a newer one) counts as
    # liveness only and never overwrites newer state.
    def on_posture(
        self,
        agent: str,
        posture: Posture,
        *,
        seq: int,
        now: float,
        before: EndpointState | None = None,
        posture_json: str | None = None,
    ) -> Decision | None:
        before = self._store.endpoint(agent) if before is None else before
        if _older(before, seq):
            return self._conclude(before, decide.after_liveness(before, now=now, seq=seq), now=now, cause=seq)
        policy = self._policy()
        verdict = judge(posture, policy)
        ref = f"{posture.policy.id}@{posture.policy.version}" if posture.policy else None
        after = decide.after_posture(
            before, verdict, now=now, seq=seq, mode=posture.mode.value, policy_ref=ref
        )
        # The agent's open sessions and the stored records of reported ids only: work bounded by what is
        # open and what this posture reports, never by how many sessions the agent ever had.
        open_sessions = self._store.open_sessions(agent)
        open_ids = {s.id for s in open_sessions}
        others = [info.id for info in posture.sessions if info.id not in open_ids]
        known = [*open_sessions, *self._store.sessions_among(agent, others).values()]
        result = decide.reconcile(agent, known, posture.sessions)
        for change in result.changes:
            self._save_session_change(change, now=now)
        if self._desktops is not None:
            new_ids = {
                c.id for c in result.changes if c.id not in open_ids and c.state is SessionState.RUNNING
            }
            for info in posture.sessions:
                if info.id in new_ids and (info.desktop_address or info.desktop_name):
                    self._desktops.session_started(
                        agent,
                        info.id,
                        address=info.desktop_address,
                        name=info.desktop_name,
                        user=info.desktop_user,
                        now=now,
                    )
        if result.refused:
            self._refuse_sessions(agent, result.refused, seq)
        by_id = {s.id: s for s in known}
        by_id.update((c.id, c) for c in result.changes)
        sessions = [s for s in by_id.values() if s.state is not SessionState.ENDED]
        if posture_json is None:
            posture_json = json.dumps(posture.model_dump(mode="json"), separators=(",", ":"))
        return self._conclude(before, after, posture=posture_json, now=now, sessions=sessions, cause=seq)

    def on_status(
        self,
        agent: str,
        status: Status,
        *,
        seq: int,
        now: float,
        is_will: bool,
        before: EndpointState | None = None,
    ) -> Decision | None:
        before = self._store.endpoint(agent) if before is None else before
        if not is_will and _older(before, seq):
            return self._conclude(before, decide.after_liveness(before, now=now, seq=seq), now=now, cause=seq)
        after = decide.after_status(before, status, now=now, seq=seq, is_will=is_will)
        return self._conclude(before, after, now=now, cause=seq)

    def on_revoked(self, agent: str, *, now: float, reason: str) -> Decision | None:
        """An operator revoked the agent (`agents revoke`): it is judged in violation ``agent_revoked`` from
        now on (its messages are refused, so no posture can clear it), and the policy's actions for a
        violation apply to its sessions."""
        before = self._store.endpoint(agent)
        after = replace(
            before, compliant=False, condition=Condition.VIOLATION, reasons=(f"agent_revoked:{reason}"[:200],)
        )
        return self._conclude(before, after, now=now)

    def on_event(
        self, agent: str, event: Event, *, seq: int, now: float, before: EndpointState | None = None
    ) -> Decision | None:
        before = self._store.endpoint(agent) if before is None else before
        after = decide.after_liveness(before, now=now, seq=seq)
        session_id = event.details.get("session")
        if isinstance(session_id, str) and event.kind in ("session.started", "session.ended"):
            known = self._store.session(agent, session_id)
            if event.kind == "session.started" and known is None:
                if not decide.may_open_session(self._store.count_open_sessions(agent)):
                    self._refuse_sessions(agent, (session_id,), seq)
                    return self._conclude(before, after, now=now, cause=seq)
                pid = event.details.get("pid")
                user = event.details.get("user")
                self._save_session_change(
                    decide.started(
                        agent,
                        session_id,
                        str(event.details.get("client") or ""),
                        pid if isinstance(pid, int) else None,
                        user if isinstance(user, str) else None,
                        event.at,
                    )
                )
                address, name = event.details.get("desktop_address"), event.details.get("desktop_name")
                desktop_user = event.details.get("desktop_user")
                if self._desktops is not None and (isinstance(address, str) or isinstance(name, str)):
                    self._desktops.session_started(
                        agent,
                        session_id,
                        address=address if isinstance(address, str) else None,
                        name=name if isinstance(name, str) else None,
                        user=desktop_user if isinstance(desktop_user, str) else None,
                        now=now,
                    )
            elif (
                event.kind == "session.ended" and known is not None and known.state is not SessionState.ENDED
            ):
                self._save_session_change(
                    decide.ended(known, str(event.details.get("reason") or "ended")), now=now
                )
        return self._conclude(before, after, now=now, cause=seq)

    def on_ack(
        self, agent: str, ack: Ack, *, seq: int, now: float, before: EndpointState | None = None
    ) -> Decision | None:
        before = self._store.endpoint(agent) if before is None else before
        after = decide.after_liveness(before, now=now, seq=seq)
        command = self._store.command(ack.command_id)
        if command is None or command.agent != agent:
            self._recorder.record(
                "ack.unmatched",
                agent,
                {"command_id": ack.command_id, "result": ack.result.value},
                actor=agent,
            )
        else:
            self._store.save_command(
                replace(command, state=CommandState.ACKED, result=ack.result.value, detail=ack.detail)
            )
            self._recorder.record(
                "ack",
                agent,
                {
                    "command_id": ack.command_id,
                    "result": ack.result.value,
                    "sessions": list(ack.sessions),
                    "detail": ack.detail,
                    "session_id": command.session_id,
                },
                actor=agent,
            )
            for sid in {command.session_id, *ack.sessions} - {None}:
                session = self._store.session(agent, str(sid))
                if session is not None and session.state is not SessionState.ENDED:
                    self._save_session_change(
                        replace(decide.after_ack(session, ack.result.value), command_id=command.id)
                    )
        return self._conclude(before, after, now=now, cause=seq)

    def tick(self, now: float) -> list[Decision]:
        """Silence check: every endpoint with nothing accepted for 3 × heartbeat becomes silent. One
        transaction, so that processes of a share group do not both decide the same silence."""
        heartbeat = self._policy().report.heartbeat_s
        decisions: list[Decision] = []
        with self._store.transaction():
            return self._tick(now, heartbeat, decisions)

    def _tick(self, now: float, heartbeat: float, decisions: list[Decision]) -> list[Decision]:
        for ep in self._store.endpoints():
            if decide.silence_due(ep, now=now, heartbeat_s=heartbeat):
                decision = self._conclude(ep, decide.silent(ep, now=now), now=now)
                if decision is not None:
                    decisions.append(decision)
        return decisions

    # -- conclusions ---------------------------------------------------------------------------------------
    def _refuse_sessions(self, agent: str, ids: tuple[str, ...], seq: int) -> None:
        """Sessions an agent reported while at its cap: not tracked (so never a command either), audited."""
        self._recorder.record(
            "limit.refused",
            agent,
            {
                "what": "sessions",
                "limit": decide.MAX_OPEN_SESSIONS,
                "count": len(ids),
                "ids": list(ids[:8]),
                "cause_seq": seq,
            },
        )
        log.warning("sessions_refused", agent=agent, count=len(ids), limit=decide.MAX_OPEN_SESSIONS)

    def _save_session_change(self, session: SessionRecord, *, now: float | None = None) -> None:
        self._store.save_session(session)
        if self._desktops is not None and session.state is SessionState.ENDED:
            # Over at the endpoint: its desktop is logged off on its side too and wiped (non-persistent).
            self._desktops.session_ended(
                session.agent, session.id, reason=session.ended_reason or "ended", now=now or time.time()
            )
        self._recorder.record(
            "session",
            session.agent,
            {
                "id": session.id,
                "state": session.state.value,
                "ended_reason": session.ended_reason,
                "command_result": session.command_result,
            },
        )

    def _conclude(
        self,
        before: EndpointState,
        after: EndpointState,
        *,
        now: float,
        posture: str | None = None,
        sessions: list[SessionRecord] | None = None,
        cause: int | None = None,
    ) -> Decision | None:
        """``cause``: the seq of the agent's message that led here (None for the silence clock), recorded
        in the decision's audit entry so an auditor can follow a decision back to its evidence."""
        self._store.save_endpoint(after, posture=posture)
        if (
            self._recovered is not None
            and after.condition is Condition.COMPLIANT
            and before.condition is not Condition.COMPLIANT
        ):
            self._recovered(after.agent)  # pending end requests are moot now
        acting = after.condition in decide.ACTING_CONDITIONS
        if sessions is None:
            # Sessions matter only for a condition that ends them (a cheap skip for the common compliant
            # case); only open ones can be ended.
            sessions = self._store.open_sessions(after.agent) if acting else []
        room = None
        if acting and any(s.state is SessionState.RUNNING for s in sessions):
            room = decide.command_room(self._store.count_pending_commands(after.agent))
        decision = decide.decide(before, after, sessions, self._policy(), now=now, room=room)
        if decision is None:
            return None
        actions = [
            {"action": name, "session": a.session_id, "reason": a.reason}
            for a in decision.actions
            for name in a.names()
        ]
        self._store.add_decision(
            decision.agent, now, decision.condition.value, list(decision.reasons), actions
        )
        data: dict[str, object] = {
            "condition": decision.condition.value,
            "reasons": list(decision.reasons),
            "actions": actions,
            "cause_seq": cause,
        }
        if decision.deferred:
            # Over MAX_PENDING_COMMANDS: these sessions stay running and are asked once commands finish.
            data["deferred"] = {
                "limit": decide.MAX_PENDING_COMMANDS,
                "sessions": [a.session_id for a in decision.deferred],
            }
        self._recorder.record("decision", decision.agent, data)
        log.info(
            "decision",
            agent=decision.agent,
            condition=decision.condition.value,
            reasons=list(decision.reasons),
            actions=len(actions),
        )
        for action in decision.actions:
            session = self._store.session(action.agent, action.session_id)
            if session is not None:
                self._store.save_session(
                    decide.ending(session, command_id="", reason=action.reason, key=action.condition_key)
                )
            self._act(action)
        return decision
