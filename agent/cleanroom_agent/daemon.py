"""Composition root of ``cleanroom-agent run``: one TaskGroup with named tasks.

Tasks: ``link`` (MQTT), ``posture`` (probe every poll interval, report on change), ``heartbeat`` (posture
at least every ``report.heartbeat_s``), ``failclosed`` (end sessions itself while cut off), ``localsock``
(the launch gate), ``enforcers`` (their lifecycle) and ``shutdown`` (SIGTERM/SIGINT → offline status,
drain, stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cleanroom_protocol import (
    Ack,
    AckResult,
    AgentState,
    Command,
    CommandAction,
    Event,
    Kind,
    Mode,
    Policy,
    PolicyDocument,
    PolicyError,
    Posture,
    ProcessInfo,
    SessionInfo,
    Severity,
    Status,
    load_policy,
    policy_hash,
    verify,
    violations,
)

from . import __version__
from .decisions import (
    NO_POLICY,
    PolicyChoice,
    PolicyInForce,
    PolicySource,
    choose_policy,
    fail_closed_reason,
    launch_decision,
)
from .enforcers import Enforcer, build_configured_enforcers, client_clipboard_off
from .link import Link, LinkCallbacks
from .localsock import LocalSocketServer, Peer
from .outbox import Outbox
from .posture import HostFacts, HostProbe, LinuxHostProbe, assemble_posture, find_denied, fingerprint
from .sessions import (
    EndResult,
    ProcessSnapshot,
    ProcessTable,
    PsutilProcessTable,
    PsutilTreeEnder,
    TreeEnder,
    diff_sessions,
    find_sessions,
    session_id,
)
from .settings import AgentSettings
from .spool import Spool

log = structlog.get_logger("cleanroom_agent.daemon")

POLICY_DOCUMENT = "policy_document"
SHUTDOWN_DRAIN_S = 3.0
MAX_REMEMBERED_IDS = 10_000


class _Shutdown(Exception):
    """Raised by the shutdown task to end the TaskGroup."""


class StartupError(Exception):
    """The agent cannot start (unreadable bootstrap policy, ...); the message says what and where."""


@dataclass
class Observation:
    """The latest probe results and what was derived from them."""

    facts: HostFacts
    processes: list[ProcessSnapshot]
    sessions: list[SessionInfo]
    denied: list[ProcessInfo]
    posture: Posture
    at: float = field(default_factory=time.time)


def load_signed_policy(raw: str | None, controller_id: str, key: Ed25519PublicKey) -> Policy | None:
    """Re-verify the signed policy document persisted in the spool (the key may have changed since)."""
    if raw is None:
        return None
    verdict = verify(
        raw.encode(),
        public_key_for=lambda s: key if s == controller_id else None,
        max_skew_s=None,
        expected_kind=Kind.POLICY,
    )
    if not verdict.ok or not isinstance(verdict.body, PolicyDocument):
        log.warning("persisted_policy_rejected", status=verdict.status.value, detail=verdict.detail)
        return None
    return verdict.body.policy


def initial_policy(
    settings: AgentSettings, spool: Spool | None, controller_key: Ed25519PublicKey | None
) -> PolicyInForce:
    """Signed persisted policy if it still verifies, else the bootstrap ``--policy`` file, else none."""
    if controller_key is not None and spool is not None:
        signed = load_signed_policy(spool.get_state(POLICY_DOCUMENT), settings.controller_id, controller_key)
        if signed is not None:
            return PolicyInForce(signed, PolicySource.SIGNED)
    if settings.policy is not None:
        try:
            return PolicyInForce(load_policy(settings.policy), PolicySource.BOOTSTRAP)
        except PolicyError as exc:
            raise StartupError(str(exc)) from exc
    return NO_POLICY


def snapshot_posture(
    settings: AgentSettings, in_force: PolicyInForce, enforcers: Sequence[Enforcer]
) -> tuple[Posture, list[str]]:
    """One posture of this endpoint, outside the daemon (``cleanroom-agent check``), and its violations."""
    policy = in_force.effective
    procs = PsutilProcessTable().snapshot()
    posture = assemble_posture(
        agent_id=settings.id,
        mode=settings.mode,
        policy=in_force.ref,
        facts=LinuxHostProbe().host_facts(),
        denied=find_denied(procs, policy.processes.deny),
        sessions=find_sessions(procs, policy.sessions.clients, set()),
        enforcers=[e.status() for e in enforcers],
        offline_since=None,
    )
    reasons = violations(posture, policy) if in_force.policy is not None else ["policy_missing"]
    return posture, reasons


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        key: Ed25519PrivateKey,
        controller_key: Ed25519PublicKey,
        spool: Spool,
        probe: HostProbe | None = None,
        processes: ProcessTable | None = None,
        ender: TreeEnder | None = None,
        enforcers: Sequence[Enforcer] | None = None,
    ) -> None:
        self.settings = settings
        self.mode = settings.mode
        self.spool = spool
        self.outbox = Outbox(spool, agent_id=settings.id, key=key)
        self.probe = probe or LinuxHostProbe()
        self.processes = processes or PsutilProcessTable()
        self.ender = ender or PsutilTreeEnder()
        self.enforcers = (
            list(enforcers)
            if enforcers is not None
            else build_configured_enforcers(
                self.emit,
                settings.enforcers,
                sysfs_root=settings.sysfs_root,
                exec_backend=settings.exec_backend,
            )
        )
        self.in_force = initial_policy(settings, spool, controller_key)
        self.link = Link(
            broker=settings.broker_address,
            agent_id=settings.id,
            controller_id=settings.controller_id,
            controller_key=controller_key,
            outbox=self.outbox,
            keepalive=settings.keepalive,
            callbacks=LinkCallbacks(
                on_command=self.handle_command,
                on_command_replayed=self.resend_ack,
                on_policy=self.handle_policy,
                on_reject=self._on_reject,
                on_connected=self._on_connected,
            ),
        )
        self.server = LocalSocketServer(settings.socket, self.handle_local)
        self.latest: Observation | None = None
        self._sessions: dict[str, SessionInfo] = {}
        self._launched: set[str] = set()
        self._ended_by_us: set[str] = set()
        self._denied_seen: set[tuple[int, str]] = set()
        self._last_fingerprint: str | None = None
        self._last_posture_sent = 0.0
        self._end_lock = asyncio.Lock()
        # Snapshots are digested in the order they were taken: an older snapshot digested after a newer one
        # would report a session as ended and started again.
        self._observe_lock = asyncio.Lock()
        self._fail_closed_backoff = 0.0
        self._posture_due = asyncio.Event()
        self._stop = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        log.info(
            "agent_starting",
            id=self.settings.id,
            mode=self.mode.value,
            policy=self.in_force.ref.model_dump() if self.in_force.ref else None,
            policy_source=self.in_force.source.value,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._enforcers_task(), name="enforcers")
                tg.create_task(self.link.run(), name="link")
                tg.create_task(self._posture_loop(), name="posture")
                tg.create_task(self._heartbeat_loop(), name="heartbeat")
                tg.create_task(self._failclosed_loop(), name="failclosed")
                tg.create_task(self.server.serve(), name="localsock")
                tg.create_task(self._shutdown_task(), name="shutdown")
        except* _Shutdown:
            log.info("agent_stopped")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _shutdown_task(self) -> None:
        await self._stop.wait()
        log.info("agent_stopping")
        was_connected = self.link.connected
        self.outbox.status(Status(state=AgentState.OFFLINE, agent_version=__version__, reason="shutdown"))
        if was_connected:
            drained = await self.link.drain(SHUTDOWN_DRAIN_S)
            log.info("outbox_drained" if drained else "outbox_not_drained", pending=self.spool.count())
        self.link.request_stop()
        raise _Shutdown

    async def _enforcers_task(self) -> None:
        policy = self.in_force.effective
        for enforcer in self.enforcers:
            try:
                await enforcer.start(policy, self.mode)
            except Exception:
                log.exception("enforcer_start_failed", enforcer=getattr(enforcer, "name", "?"))
        try:
            await asyncio.Event().wait()
        finally:
            for enforcer in self.enforcers:
                try:
                    await enforcer.stop()
                except Exception:
                    log.exception("enforcer_stop_failed", enforcer=getattr(enforcer, "name", "?"))

    # --- events ------------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Queue an event for publishing at once (also the sink handed to enforcers)."""
        try:
            self.outbox.event(event)
        except Exception:
            log.exception("event_not_queued", kind=event.kind)
            return
        log.info("event", kind=event.kind, **{k: v for k, v in event.details.items() if k != "reasons"})
        if event.kind == "enforcer.status":
            self._posture_due.set()

    def _event(
        self, kind: str, severity: Severity = Severity.INFO, *, blocked: bool = False, **details: Any
    ) -> None:
        self.emit(Event(kind=kind, at=time.time(), severity=severity, blocked=blocked, details=details))

    def _on_reject(self, what: str, reason: str) -> None:
        self._event(f"{what}.rejected", Severity.WARNING, reason=reason)

    def _on_connected(self) -> None:
        if self.latest is not None:
            self._send_posture(self._rebuild_posture(self.latest), force=True)

    # --- observing ---------------------------------------------------------------------------------
    async def observe(self) -> Observation:
        """Probe the host and process table now, report what started and ended, remember the result."""
        async with self._observe_lock:
            procs, facts = await asyncio.gather(
                asyncio.to_thread(self.processes.snapshot), asyncio.to_thread(self.probe.host_facts)
            )
            return self._digest(procs, facts)

    def _digest(self, procs: list[ProcessSnapshot], facts: HostFacts) -> Observation:
        policy = self.in_force.effective
        found = [
            s
            for s in find_sessions(procs, policy.sessions.clients, self._launched)
            if s.id not in self._ended_by_us
        ]
        changes = diff_sessions(list(self._sessions.values()), found)
        for s in changes.started:
            self._event("session.started", session=s.id, client=s.client, pid=s.pid, user=s.user)
        for s in changes.ended:
            if s.id in self._ended_by_us:
                continue  # reported by end_sessions
            self._event("session.ended", session=s.id, client=s.client, reason="exited")
            self._launched.discard(s.id)
        self._sessions = {s.id: s for s in found}
        denied = find_denied(procs, policy.processes.deny)
        by_pid = {p.pid: p for p in procs}
        current = set()
        for info in denied:
            key = (info.pid, f"{by_pid[info.pid].create_time:.3f}")
            current.add(key)
            if key not in self._denied_seen:
                self._event(
                    "process.denied_running", Severity.WARNING, name=info.name, pid=info.pid, user=info.user
                )
        self._denied_seen = current  # first sight only: forget processes that are gone
        obs = Observation(facts, procs, found, denied, self._posture(facts, denied, found))
        self.latest = obs
        return obs

    def _posture(self, facts: HostFacts, denied: list[ProcessInfo], sessions: list[SessionInfo]) -> Posture:
        return assemble_posture(
            agent_id=self.settings.id,
            mode=self.mode,
            policy=self.in_force.ref,
            facts=facts,
            denied=denied,
            sessions=sessions,
            enforcers=[e.status() for e in self.enforcers],
            offline_since=self.link.offline_since,
        )

    def _rebuild_posture(self, obs: Observation) -> Posture:
        obs.posture = self._posture(obs.facts, obs.denied, list(self._sessions.values()))
        return obs.posture

    def _send_posture(self, posture: Posture, *, force: bool = False) -> None:
        fp = fingerprint(posture)
        if not force and fp == self._last_fingerprint:
            return
        try:
            self.outbox.posture(posture)
        except ValueError as exc:  # over the message size limit
            log.error("posture_not_sent", error=str(exc))
            return
        self._last_fingerprint = fp
        self._last_posture_sent = time.monotonic()

    async def _posture_loop(self) -> None:
        while True:
            try:
                obs = await self.observe()
                self._send_posture(obs.posture)
            except Exception:
                log.exception("posture_probe_failed")
            self._posture_due.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._posture_due.wait(), self.settings.poll_interval)

    async def _heartbeat_loop(self) -> None:
        while True:
            heartbeat = self.in_force.effective.report.heartbeat_s
            due = self._last_posture_sent + heartbeat - time.monotonic()
            if due <= 0 and self.latest is not None:
                self._send_posture(self._rebuild_posture(self.latest), force=True)
                continue
            await asyncio.sleep(max(0.1, min(due, 1.0)))

    async def _failclosed_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            obs = self.latest
            if obs is None:
                continue
            reason = fail_closed_reason(
                mode=self.mode,
                in_force=self.in_force,
                offline_since=self.link.offline_since,
                now=time.time(),
                local_violations=violations(obs.posture, self.in_force.effective),
                session_count=len(self._sessions),
            )
            if reason is None:
                self._fail_closed_backoff = 0.0
                continue
            if self._fail_closed_backoff > time.monotonic():
                continue  # the last attempt left survivors: do not spin (and spam events) every poll
            log.warning("failing_closed", reason=reason, sessions=list(self._sessions))
            ended, failed = await self.end_sessions(list(self._sessions.values()), reason="fail_closed")
            if failed:
                self._fail_closed_backoff = time.monotonic() + 10.0
            self._event(
                "agent.fail_closed",
                Severity.CRITICAL,
                blocked=True,
                reason=reason,
                sessions=",".join(ended + failed),
            )

    # --- ending sessions ---------------------------------------------------------------------------
    async def end_sessions(self, targets: list[SessionInfo], *, reason: str) -> tuple[list[str], list[str]]:
        """End each session's process tree; returns (ended ids, failed ids). Never in audit mode."""
        if self.mode is not Mode.ENFORCE:  # audit mode ends nothing, whoever asks
            return [], []
        ended, failed = [], []
        grace = self.in_force.effective.sessions.end_grace_s
        async with self._end_lock:
            for s in targets:
                # Marked before the kill, so a probe digested meanwhile does not report it as "exited".
                self._ended_by_us.add(s.id)
                result: EndResult = await asyncio.to_thread(self.ender.end_tree, s.pid, s.started, grace)
                if result.survivors:
                    self._ended_by_us.discard(s.id)
                    failed.append(s.id)
                    log.error("session_not_ended", session=s.id, survivors=result.survivors)
                    continue
                ended.append(s.id)
                if len(self._ended_by_us) > MAX_REMEMBERED_IDS:
                    self._ended_by_us = {s.id}
                self._sessions.pop(s.id, None)
                self._event(
                    "session.ended",
                    session=s.id,
                    client=s.client,
                    reason=reason if result.found else "exited",
                )
                self._launched.discard(s.id)
        self._posture_due.set()
        return ended, failed

    async def handle_command(self, command: Command) -> None:
        if self.resend_ack(command.id):
            return
        if command.action is not CommandAction.END_SESSION:
            ack = Ack(
                command_id=command.id, result=AckResult.REJECTED, detail=f"unknown action {command.action}"
            )
        else:
            await self.observe()  # a session started a moment ago must be found
            targets = [s for s in self._sessions.values() if command.session_id in (None, s.id)]
            if not targets:
                ack = Ack(command_id=command.id, result=AckResult.NOT_FOUND, detail="no such session running")
            elif self.mode is Mode.AUDIT:
                ack = Ack(
                    command_id=command.id,
                    result=AckResult.AUDIT_ONLY,
                    sessions=[s.id for s in targets],
                    detail="audit mode: nothing ended",
                )
            else:
                ended, failed = await self.end_sessions(targets, reason=f"end_session:{command.reason}"[:200])
                ack = Ack(
                    command_id=command.id,
                    result=AckResult.FAILED if failed else AckResult.ENDED,
                    sessions=ended + failed,
                    detail=f"not ended: {','.join(failed)}" if failed else "",
                )
        self.spool.remember_command(command.id, ack.model_dump(mode="json"))
        self.outbox.ack(ack)
        log.info("command_done", command=command.id, result=ack.result.value, sessions=ack.sessions)

    def resend_ack(self, command_id: str) -> bool:
        """A command already processed gets the same ack again (commands are idempotent by id)."""
        previous = self.spool.command_ack(command_id)
        if previous is None:
            return False
        self.outbox.ack(Ack.model_validate(previous))
        return True

    # --- policy ------------------------------------------------------------------------------------
    async def handle_policy(self, document: PolicyDocument, raw: bytes) -> None:
        policy = document.policy
        if document.hash != policy_hash(policy):
            self._on_reject("policy", f"hash mismatch: document says {document.hash}")
            return
        choice = choose_policy(self.in_force, policy)
        if choice is PolicyChoice.UNCHANGED:
            return
        if choice is PolicyChoice.OLDER:
            current = self.in_force.policy
            self._on_reject(
                "policy",
                f"older: {policy.id}@{policy.version} < {current.id}@{current.version}"
                if current
                else "older",
            )
            return
        self.in_force = PolicyInForce(policy, PolicySource.SIGNED)
        self.spool.set_state(POLICY_DOCUMENT, raw.decode("utf-8"))
        self._event("policy.applied", id=policy.id, version=policy.version)
        for enforcer in self.enforcers:
            try:
                await enforcer.apply(policy, self.mode)
            except Exception:
                log.exception("enforcer_apply_failed", enforcer=getattr(enforcer, "name", "?"))
        self._posture_due.set()

    # --- local socket ------------------------------------------------------------------------------
    def _client_args(self, client: str) -> list[str]:
        """Arguments that switch the VDI client's own clipboard redirection off (a second layer under the
        X11 guard), when the policy blocks the clipboard and the agent enforces."""
        clipboard = self.in_force.effective.clipboard
        if (
            self.mode is not Mode.ENFORCE
            or clipboard.mode == "allow"
            or not clipboard.disable_client_redirection
        ):
            return []
        return list(client_clipboard_off(client).args)

    async def handle_local(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        op = request["op"]
        if op == "launch_check":
            client = request.get("client")
            if not isinstance(client, str) or not client or len(client) > 255 or "/" in client:
                return {"ok": False, "error": "client must be an executable name"}
            obs = await self.observe()
            decision = launch_decision(
                posture=obs.posture,
                in_force=self.in_force,
                client=client,
                offline_since=self.link.offline_since,
                now=time.time(),
            )
            self._event(
                "launch.allowed" if decision.allowed else "launch.denied",
                Severity.INFO if decision.allowed and not decision.reasons else Severity.WARNING,
                blocked=not decision.allowed,
                client=client,
                reasons=",".join(decision.reasons)[:4000],
                uid=peer.uid,
                audit_only=decision.audit_only,
            )
            return {
                "ok": True,
                "allowed": decision.allowed,
                "reasons": decision.reasons,
                "audit_only": decision.audit_only,
                "client_args": self._client_args(client),
            }
        if op == "register":
            return await self._register(request.get("pid"), peer)
        if op == "posture":
            obs = await self.observe()
            return {"ok": True, "posture": obs.posture.model_dump(mode="json")}
        return {"ok": False, "error": f"unknown op {op[:64]!r}"}

    async def _register(self, pid: object, peer: Peer) -> dict[str, Any]:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return {"ok": False, "error": "pid must be a positive integer"}
        try:
            proc = psutil.Process(pid)
            owner = proc.uids().real
            created = proc.create_time()
        except psutil.NoSuchProcess:
            return {"ok": False, "error": f"no process {pid}"}
        if peer.uid != 0 and owner != peer.uid:
            return {"ok": False, "error": f"process {pid} does not belong to uid {peer.uid}"}
        sid = session_id(pid, created)
        self._launched.add(sid)
        if len(self._launched) > MAX_REMEMBERED_IDS:
            self._launched = {sid}
        obs = await self.observe()
        if not any(s.id == sid for s in obs.sessions):
            self._launched.discard(sid)
            return {"ok": False, "error": f"process {pid} is not a session client"}
        self._posture_due.set()
        return {"ok": True, "session": sid}
