"""Composition root of ``cleanroom-agent run``: builds the agent's parts, wires them, runs one TaskGroup.

Parts, one concern each: ``policykeeper`` (the policy in force, the enforcers carrying it), ``observing``
(probe, digest, posture rounds, process events), ``sessionbook`` (the session lifecycle, pure),
``reporting`` (events, posture on change, holds, heartbeat), ``ending`` (ending session trees),
``commands`` (the controller's commands), ``failclosed`` (ending sessions while cut off), ``gate`` (the
launch socket's requests), ``link`` (MQTT). Nothing here decides or acts: it only connects them. The
spool's fill level (full until drained to its low-water mark) reaches the posture, the launch gate (through
the posture's ``spool_full`` violation) and the fail-closed check.

Tasks: ``link`` (MQTT), ``posture`` (probe every poll interval, report on change), ``procevents`` (exec
and exit events that matter → a coalesced observe at once; see procevents.py), ``heartbeat`` (posture
at least every ``report.heartbeat_s``), ``failclosed`` (end sessions itself while cut off), ``localsock``
(the launch gate), ``enforcers`` (their lifecycle), ``renewal`` (an enrolled agent's certificate, at two
thirds of its lifetime) and ``shutdown`` (SIGTERM/SIGINT → offline status,
drain, stop).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cleanroom_protocol import AgentState, Status

from . import __version__
from .control.commands import CommandHandler
from .control.failclosed import FailClosed
from .control.policykeeper import PolicyKeeper, StartupError, initial_policy, load_signed_policy
from .decisions import PolicyInForce
from .enforcers import Enforcer, build_configured_enforcers
from .messaging.link import Link, LinkCallbacks
from .messaging.outbox import Outbox
from .messaging.reporting import EventSink, PostureAssembler, PostureReporter
from .messaging.spool import Spool
from .observing.observer import Observer, snapshot_posture
from .observing.posture import HostProbe, LinuxHostProbe
from .observing.procevents import ProcConnectorEvents, ProcessEventsOff, ProcessEventSource
from .sessions.book import SessionBook
from .sessions.clients import ProcessTable, PsutilProcessTable, PsutilTreeEnder, TreeEnder
from .sessions.ending import SessionEnder
from .sessions.gate import LaunchGate
from .sessions.localsock import LocalSocketServer, resolve_group
from .settings import AgentSettings
from .trust.renewal import CertificateRenewer

# The CLI and the tests import these from here.
__all__ = ["Agent", "StartupError", "initial_policy", "load_signed_policy", "snapshot_posture"]

log = structlog.get_logger("cleanroom_agent.daemon")

SHUTDOWN_DRAIN_S = 3.0


class _Shutdown(Exception):
    """Raised by the shutdown task to end the TaskGroup."""


class Agent:
    """The agent's parts, built and wired; :meth:`run` runs them until SIGTERM or SIGINT.

    ``probe``, ``processes``, ``ender``, ``enforcers`` and ``process_events`` replace the real ones."""

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
        mode = settings.mode
        self.spool = spool
        self.outbox = Outbox(spool, agent_id=settings.id, key=key)
        # Set by whoever wants a posture round now (an enforcer's status, a process event, a policy, an end,
        # the release of a posture hold); the posture task waits on it between polls.
        posture_due = asyncio.Event()
        self.events = EventSink(self.outbox, on_enforcer_status=posture_due.set)

        def spool_level(full: bool) -> None:
            # Full: the posture says so at once (the controller judges it, the gate refuses launches) and
            # the fail-closed check ends the sessions; drained to the low-water mark: all of it lifts.
            log.warning(
                "spool_full" if full else "spool_drained",
                rows=spool.count(),
                max_rows=spool.max_rows,
                low_rows=spool.low_rows,
                refused=self.outbox.refused,
            )
            posture_due.set()

        spool.on_level_change(spool_level)
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
        self.book = SessionBook()
        self.observer = Observer(
            poll_interval=settings.poll_interval,
            probe=probe or LinuxHostProbe(),
            processes=processes or PsutilProcessTable(),
            process_events=process_events
            or (ProcConnectorEvents() if settings.process_events else ProcessEventsOff()),
            book=self.book,
            in_force=self._in_force,
            assemble=PostureAssembler(
                agent_id=settings.id,
                mode=mode,
                in_force=self._in_force,
                enforcers=self.enforcers,
                offline_since=self._offline_since,
                spool_full=lambda: spool.full,
                spool_refused=lambda: self.outbox.refused,
            ),
            events=self.events,
            posture_due=posture_due,
        )
        self.reporter = PostureReporter(
            self.outbox,
            current=self.observer.rebuild_posture,
            heartbeat_s=lambda: self._in_force().effective.report.heartbeat_s,
            wake=posture_due.set,
        )
        self.keeper = PolicyKeeper(
            initial_policy(settings, spool, controller_key),
            mode=mode,
            spool=spool,
            enforcers=self.enforcers,
            events=self.events,
            held=self.reporter.held,
        )
        session_ender = SessionEnder(
            mode=mode,
            book=self.book,
            ender=ender or PsutilTreeEnder(),
            grace_s=lambda: self._in_force().effective.sessions.end_grace_s,
            events=self.events,
            wake_posture=posture_due.set,
        )
        self.commands = CommandHandler(
            mode=mode,
            spool=spool,
            outbox=self.outbox,
            observe=self.observer.observe,
            running=self.book.running,
            ender=session_ender,
        )
        self.link = Link(
            broker=settings.broker_address,
            agent_id=settings.id,
            controller_id=settings.controller_id,
            controller_key=controller_key,
            outbox=self.outbox,
            keepalive=settings.keepalive,
            callbacks=LinkCallbacks(
                on_command=self.commands.handle,
                on_command_replayed=self.commands.resend_ack,
                on_policy=self.keeper.handle_policy,
                on_reject=self.events.rejected,
                on_connected=self._on_connected,
            ),
        )
        try:
            admin_gid = resolve_group(settings.admin_group) if settings.admin_group else None
        except ValueError as exc:
            raise StartupError(f"agent settings: {exc}") from exc
        self.fail_closed = FailClosed(
            mode=mode,
            # Checked every second at most: cheap (no I/O), and cut-off time is what it measures.
            poll_interval=min(settings.poll_interval, 1.0),
            in_force=self._in_force,
            offline_since=self._offline_since,
            latest=lambda: self.observer.latest,
            running=self.book.running,
            ender=session_ender,
            events=self.events,
            spool_full=lambda: spool.full,
        )
        self.gate = LaunchGate(
            mode=mode,
            admin_gid=admin_gid,
            in_force=self._in_force,
            offline_since=self._offline_since,
            observe=self.observer.observe,
            book=self.book,
            events=self.events,
        )
        self.server = LocalSocketServer(settings.socket, self.gate.handle_local)
        # An enrolled agent renews its own certificate (renewal.py); one configured by hand does not.
        self.renewer = (
            CertificateRenewer(
                agent_id=settings.id,
                data_dir=settings.data_dir,
                cert_path=settings.tls_cert,
                controller_url=settings.enrol_url,
                key=key,
                events=self.events,
            )
            if settings.enrol_url and settings.tls_cert is not None
            else None
        )
        self._stop = asyncio.Event()

    # The policy keeper and the link are built after the parts that read these: read them at call time.
    def _in_force(self) -> PolicyInForce:
        return self.keeper.in_force

    def _offline_since(self) -> float | None:
        return self.link.offline_since

    def _on_connected(self) -> None:
        self.reporter.resend()  # the controller gets the posture of now, changed or not

    # --- lifecycle ---------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        in_force = self._in_force()
        log.info(
            "agent_starting",
            id=self.settings.id,
            mode=self.settings.mode.value,
            policy=in_force.ref.model_dump() if in_force.ref else None,
            policy_source=in_force.source.value,
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
                if self.renewer is not None:
                    tg.create_task(self.renewer.run(), name="renewal")
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
