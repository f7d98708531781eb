"""Composition root of ``cleanroom-agent run``: one TaskGroup with named tasks.

Tasks: ``link`` (MQTT), ``posture`` (probe every poll interval, report on change), ``procevents`` (exec
and exit events that matter → a coalesced observe at once; see procevents.py), ``heartbeat`` (posture
at least every ``report.heartbeat_s``), ``failclosed`` (end sessions itself while cut off), ``localsock``
(the launch gate), ``enforcers`` (their lifecycle) and ``shutdown`` (SIGTERM/SIGINT → offline status,
drain, stop).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import psutil
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cleanroom_protocol import (
    AgentState,
    Mode,
    Severity,
    Status,
)

from . import __version__
from .commands import CommandHandler
from .decisions import (
    LaunchDecision,
    PolicyInForce,
    launch_decision,
)
from .ending import SessionEnder
from .enforcers import Enforcer, build_configured_enforcers, client_clipboard_off
from .failclosed import FailClosed
from .link import Link, LinkCallbacks
from .localsock import PENDING_EXEC_S, LocalSocketServer, Peer, may_read_posture, resolve_group
from .observing import Observer, snapshot_posture
from .outbox import Outbox
from .policykeeper import PolicyKeeper, StartupError, initial_policy, load_signed_policy
from .posture import HostProbe, LinuxHostProbe
from .procevents import (
    ProcConnectorEvents,
    ProcessEventsOff,
    ProcessEventSource,
)
from .reporting import EventSink, PostureAssembler, PostureReporter
from .sessionbook import SessionBook
from .sessions import (
    ProcessSnapshot,
    ProcessTable,
    PsutilProcessTable,
    PsutilTreeEnder,
    TreeEnder,
    client_name,
    session_id,
)
from .settings import AgentSettings
from .spool import Spool

# The CLI and the tests import these from here.
__all__ = ["Agent", "StartupError", "initial_policy", "load_signed_policy", "snapshot_posture"]

log = structlog.get_logger("cleanroom_agent.daemon")

SHUTDOWN_DRAIN_S = 3.0
MAX_PENDING_LAUNCHES = 1024


class _Shutdown(Exception):
    """Raised by the shutdown task to end the TaskGroup."""


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
        process_events: ProcessEventSource | None = None,
    ) -> None:
        self.settings = settings
        self.mode = settings.mode
        self.spool = spool
        self.outbox = Outbox(spool, agent_id=settings.id, key=key)
        self._posture_due = asyncio.Event()
        self.events = EventSink(self.outbox, on_enforcer_status=self._posture_due.set)
        self.probe = probe or LinuxHostProbe()
        self.processes = processes or PsutilProcessTable()
        self.ender = ender or PsutilTreeEnder()
        self.enforcers = (
            list(enforcers)
            if enforcers is not None
            else build_configured_enforcers(
                self.events.emit,
                settings.enforcers,
                sysfs_root=settings.sysfs_root,
                exec_backend=settings.exec_backend,
            )
        )
        self.keeper = PolicyKeeper(
            initial_policy(settings, spool, controller_key),
            mode=self.mode,
            spool=spool,
            enforcers=self.enforcers,
            events=self.events,
            held=lambda: self.reporter.held(),
        )
        self.link = Link(
            broker=settings.broker_address,
            agent_id=settings.id,
            controller_id=settings.controller_id,
            controller_key=controller_key,
            outbox=self.outbox,
            keepalive=settings.keepalive,
            callbacks=LinkCallbacks(
                on_command=lambda command: self.commands.handle(command),
                on_command_replayed=lambda command_id: self.commands.resend_ack(command_id),
                on_policy=self.keeper.handle_policy,
                on_reject=self.events.rejected,
                on_connected=self._on_connected,
            ),
        )
        try:
            self._admin_gid = resolve_group(settings.admin_group) if settings.admin_group else None
        except ValueError as exc:
            raise StartupError(f"agent settings: {exc}") from exc
        self.server = LocalSocketServer(settings.socket, self.handle_local)
        # Launches answered but not yet seen running their client: session id -> the check that drops it.
        self._pending_launches: dict[str, asyncio.TimerHandle] = {}
        self.assemble = PostureAssembler(
            agent_id=settings.id,
            mode=self.mode,
            in_force=lambda: self.in_force,
            enforcers=self.enforcers,
            offline_since=lambda: self.link.offline_since,
        )
        self.book = SessionBook()
        self.process_events: ProcessEventSource = process_events or (
            ProcConnectorEvents() if settings.process_events else ProcessEventsOff()
        )
        self.observer = Observer(
            poll_interval=settings.poll_interval,
            probe=self.probe,
            processes=self.processes,
            process_events=self.process_events,
            book=self.book,
            in_force=lambda: self.in_force,
            assemble=self.assemble,
            events=self.events,
            posture_due=self._posture_due,
        )
        self.reporter = PostureReporter(
            self.outbox,
            current=self.observer.rebuild_posture,
            heartbeat_s=lambda: self.in_force.effective.report.heartbeat_s,
            wake=self._posture_due.set,
        )
        self.session_ender = SessionEnder(
            mode=self.mode,
            book=self.book,
            ender=self.ender,
            grace_s=lambda: self.in_force.effective.sessions.end_grace_s,
            events=self.events,
            wake_posture=self._posture_due.set,
        )
        self.commands = CommandHandler(
            mode=self.mode,
            spool=spool,
            outbox=self.outbox,
            observe=self.observer.observe,
            running=self.book.running,
            ender=self.session_ender,
        )
        self.fail_closed = FailClosed(
            mode=self.mode,
            poll_interval=settings.poll_interval,
            in_force=lambda: self.in_force,
            offline_since=lambda: self.link.offline_since,
            latest=lambda: self.observer.latest,
            running=self.book.running,
            ender=self.session_ender,
            events=self.events,
        )
        self._stop = asyncio.Event()

    @property
    def in_force(self) -> PolicyInForce:
        return self.keeper.in_force

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
                tg.create_task(self.keeper.run_enforcers(), name="enforcers")
                tg.create_task(self.link.run(), name="link")
                tg.create_task(self.observer.posture_loop(self.reporter.send), name="posture")
                tg.create_task(self.observer.run_process_events(), name="procevents")
                tg.create_task(self.reporter.heartbeat_loop(), name="heartbeat")
                tg.create_task(self.fail_closed.run(), name="failclosed")
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

    # --- wiring ------------------------------------------------------------------------------------
    def _on_connected(self) -> None:
        self.reporter.resend()

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
        if op in ("launch", "launch_check"):
            client = request.get("client")
            if not isinstance(client, str) or not client or len(client) > 255 or "/" in client:
                return {"ok": False, "error": "client must be an executable name"}
            if op == "launch_check":  # read-only: nothing registered, no event
                decision = await self._launch_decision(client)
                return self._launch_answer(client, decision)
            return await self._launch(client, peer)
        if op == "register":
            return {
                "ok": False,
                "error": "register is refused: a client started before it is registered never passed the "
                'gate; use {"op": "launch"} (cleanroom-agent launch), which registers the asking process',
            }
        if op == "posture":
            if not may_read_posture(peer, self._admin_gid):
                return {"ok": False, "error": "posture is for root and the agent's admin_group only"}
            obs = await self.observer.observe()
            return {"ok": True, "posture": obs.posture.model_dump(mode="json")}
        return {"ok": False, "error": f"unknown op {op[:64]!r}"}

    async def _launch_decision(self, client: str) -> LaunchDecision:
        obs = await self.observer.observe()
        return launch_decision(
            posture=obs.posture,
            in_force=self.in_force,
            client=client,
            offline_since=self.link.offline_since,
            now=time.time(),
        )

    def _launch_answer(self, client: str, decision: LaunchDecision) -> dict[str, Any]:
        return {
            "ok": True,
            "allowed": decision.allowed,
            "reasons": decision.reasons,
            "audit_only": decision.audit_only,
            "client_args": self._client_args(client),
        }

    async def _launch(self, client: str, peer: Peer) -> dict[str, Any]:
        """The gate in one step: judge, and if allowed register the asking process itself (the kernel's
        peer pid, never a pid from the request) as the session of ``client`` before it execs the client."""
        if peer.start_time is None:
            return {"ok": False, "error": f"the asking process {peer.pid} cannot be identified (gone?)"}
        if len(self._pending_launches) >= MAX_PENDING_LAUNCHES:
            return {"ok": False, "error": "too many launches pending; try again in a few seconds"}
        decision = await self._launch_decision(client)
        sid = session_id(peer.pid, peer.start_time) if decision.allowed else None
        self.events.event(
            "launch.allowed" if decision.allowed else "launch.denied",
            Severity.INFO if decision.allowed and not decision.reasons else Severity.WARNING,
            blocked=not decision.allowed,
            client=client,
            reasons=",".join(decision.reasons)[:4000],
            uid=peer.uid,
            pid=peer.pid,
            audit_only=decision.audit_only,
            **({"session": sid} if sid else {}),
        )
        answer = self._launch_answer(client, decision)
        if sid is not None:
            self.book.register_launch(sid)
            previous = self._pending_launches.pop(sid, None)
            if previous is not None:
                previous.cancel()
            self._pending_launches[sid] = asyncio.get_running_loop().call_later(
                PENDING_EXEC_S, self._settle_launch, sid, peer.pid, peer.start_time, client
            )
        answer["session"] = sid
        return answer

    def _settle_launch(self, sid: str, pid: int, start_time: float, client: str) -> None:
        """``PENDING_EXEC_S`` after an allowed launch: the process must be running the client by now, or
        its registration is dropped (a later exec of the client is a session that never passed the gate)."""
        self._pending_launches.pop(sid, None)
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                exe = proc.exe()
                snapshot = ProcessSnapshot(
                    pid=pid,
                    ppid=proc.ppid(),
                    name=proc.name(),
                    exe_name=os.path.basename(exe) if exe else None,
                    create_time=proc.create_time(),
                )
            running_client = (
                snapshot.create_time == start_time and client_name(snapshot, [client]) is not None
            )
        except psutil.Error:
            running_client = False
        self.book.settle_launch(sid, running_client=running_client)
        if not running_client:
            log.info("launch_not_executed", session=sid, client=client)
