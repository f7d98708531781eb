"""Observing the host: probe facts and the process table, digest them into sessions and denied processes.

:class:`Observer` runs the posture rounds (every poll interval, or at once when asked) and the process-event
source: an exec or exit that matters asks for an observe through the coalescer (see procevents.py), and
while events are live the poll re-reads only host facts, the process table at least every
``PROCESS_RESCAN_S``. What a snapshot changed goes through the :class:`sessionbook.SessionBook` and is
reported as events; the latest :class:`Observation` is what the rest of the agent judges.

:func:`snapshot_posture` is one posture outside the daemon (``cleanroom-agent check``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from cleanroom_protocol import Posture, ProcessInfo, SessionInfo, Severity, violations

from ..decisions import PolicyInForce
from ..enforcers import Enforcer
from ..messaging.reporting import EventSink
from ..sessions.book import SessionBook
from ..sessions.clients import ProcessSnapshot, ProcessTable, PsutilProcessTable, find_sessions
from ..settings import AgentSettings
from .posture import HostFacts, HostProbe, LinuxHostProbe, assemble_posture, find_denied
from .procevents import ObserveCoalescer, ProcessEventSource, ProcessEventsUnavailable, interest_for

log = structlog.get_logger("cleanroom_agent.observing.observer")

# While process events are live the poll re-reads only host facts; the process table is re-read on events
# and at least this often (a safety net for what events do not show: comm renames, forks in a tree).
PROCESS_RESCAN_S = 10.0

Assemble = Callable[[HostFacts, list[ProcessInfo], list[SessionInfo]], Posture]


@dataclass
class Observation:
    """The latest probe results and what was derived from them."""

    facts: HostFacts
    processes: list[ProcessSnapshot]
    sessions: list[SessionInfo]
    denied: list[ProcessInfo]
    posture: Posture
    at: float = field(default_factory=time.time)


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


def process_scan_due(
    *, asked: bool, events_live: bool, events_owed: bool, since_scan_s: float, rescan_s: float
) -> bool:
    """Read the process table in this posture round? Always when asked (an event, a policy, an end),
    without live events, or while process events still owe an observe (whatever became of the request
    that carried them); on a plain poll tick otherwise only once the safety-net interval has passed."""
    if asked or not events_live or events_owed:
        return True
    return since_scan_s >= rescan_s


class Observer:
    """Probes, digests and remembers the latest :class:`Observation`; owns the posture round's wake-up.

    ``posture_due`` is set by whoever wants a posture round now (an event, a policy, an end, a hold's
    release); ``assemble`` makes the posture of an observation."""

    def __init__(
        self,
        *,
        poll_interval: float,
        probe: HostProbe,
        processes: ProcessTable,
        process_events: ProcessEventSource,
        book: SessionBook,
        in_force: Callable[[], PolicyInForce],
        assemble: Assemble,
        events: EventSink,
        posture_due: asyncio.Event,
    ) -> None:
        self._poll_interval = poll_interval
        self._probe = probe
        self._processes = processes
        self._process_events = process_events
        self._book = book
        self._in_force = in_force
        self._assemble = assemble
        self._events = events
        self._posture_due = posture_due
        self.latest: Observation | None = None
        # Snapshots are digested in the order they were taken: an older snapshot digested after a newer one
        # would report a session as ended and started again.
        self._observe_lock = asyncio.Lock()
        self._events_live = False  # the source runs: process-table changes arrive as events
        self._coalescer = ObserveCoalescer()
        self._last_process_scan = float("-inf")

    # --- observing ---------------------------------------------------------------------------------
    async def observe(self, *, processes: bool = True) -> Observation:
        """Probe the host and process table now, report what started and ended, remember the result.

        ``processes=False`` reuses the last process table (the poll, while process events say when the
        table changes); every other caller wants it read now."""
        async with self._observe_lock:
            started = time.monotonic()
            if not processes and self.latest is not None:
                return self._digest(self.latest.processes, await asyncio.to_thread(self._probe.host_facts))
            procs, facts = await asyncio.gather(
                asyncio.to_thread(self._processes.snapshot), asyncio.to_thread(self._probe.host_facts)
            )
            obs = self._digest(procs, facts)
            self._last_process_scan = started
            # This table covers the process events before `started`; later ones still owe an observe.
            self._arm_observe(self._coalescer.observed(started, time.monotonic()))
            policy = self._in_force().effective
            self._process_events.set_interest(
                interest_for(policy.processes.deny, policy.sessions.clients, obs.sessions, obs.denied)
            )
            return obs

    def _digest(self, procs: list[ProcessSnapshot], facts: HostFacts) -> Observation:
        policy = self._in_force().effective
        found = find_sessions(procs, policy.sessions.clients, self._book.launched_ids())
        denied = find_denied(procs, policy.processes.deny)
        by_pid = {p.pid: p for p in procs}
        changes = self._book.digest(found, [(info, by_pid[info.pid].create_time) for info in denied])
        for s in changes.started:
            self._events.event(
                "session.started",
                session=s.id,
                client=s.client,
                pid=s.pid,
                user=s.user,
                desktop_address=s.desktop_address,
                desktop_user=s.desktop_user,
                desktop_name=s.desktop_name,
            )
        for s in changes.exited:
            self._events.event("session.ended", session=s.id, client=s.client, reason="exited")
        for info in changes.denied_new:
            self._events.event(
                "process.denied_running", Severity.WARNING, name=info.name, pid=info.pid, user=info.user
            )
        obs = Observation(
            facts, procs, changes.running, denied, self._assemble(facts, denied, changes.running)
        )
        self.latest = obs
        return obs

    def rebuild_posture(self) -> Posture | None:
        """The latest observation's posture made again with the sessions, policy and enforcers of now."""
        obs = self.latest
        if obs is None:
            return None
        obs.posture = self._assemble(obs.facts, obs.denied, self._book.running())
        return obs.posture

    # --- posture rounds ----------------------------------------------------------------------------
    async def posture_loop(self, send: Callable[[Posture], bool]) -> None:
        """Observe and ``send`` the posture every poll interval, or at once when ``posture_due`` is set."""
        first = True
        while True:
            # Whether a round was asked for is read from the flag itself, just before it is cleared: a
            # request made while the poll's timeout fired (both due in one turn of a busy loop) is then
            # neither lost nor mistaken for a plain tick. A request made while this observe runs gets an
            # observe of its own.
            asked = first or self._posture_due.is_set()
            self._posture_due.clear()
            first = False
            try:
                obs = await self.observe(processes=self._process_scan_due(asked))
                send(obs.posture)
            except Exception:
                log.exception("posture_probe_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._posture_due.wait(), self._poll_interval)

    def _process_scan_due(self, asked: bool) -> bool:
        return process_scan_due(
            asked=asked,
            events_live=self._events_live,
            events_owed=self._coalescer.owed,
            since_scan_s=time.monotonic() - self._last_process_scan,
            rescan_s=max(PROCESS_RESCAN_S, self._poll_interval),
        )

    # --- process events ----------------------------------------------------------------------------
    async def run_process_events(self) -> None:
        """Run the process-event source; without it the poll re-reads the process table every time."""
        loop = asyncio.get_running_loop()

        def wake() -> None:  # in the source's thread
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._on_process_event)

        policy = self._in_force().effective
        self._process_events.set_interest(
            interest_for(policy.processes.deny, policy.sessions.clients, self._book.running(), [])
        )
        try:
            self._process_events.start(wake)
        except ProcessEventsUnavailable as exc:
            log.warning("process_events_off", reason=str(exc), poll_s=self._poll_interval)
            self._events.event("agent.process_events_off", Severity.WARNING, reason=str(exc)[:500])
            return
        self._events_live = True
        log.info("process_events_on")
        self._posture_due.set()  # a process started before the source did is seen by this full observe
        try:
            await asyncio.Event().wait()
        finally:
            self._events_live = False
            self._process_events.stop()

    def _on_process_event(self) -> None:
        """The source woke us (in the loop): owe an observe, coalesced; or, if it failed, back to the poll."""
        self._process_events.rearm()
        failure = self._process_events.failure
        if failure is not None:
            if self._events_live:
                self._events_live = False
                log.error("process_events_off", reason=failure, poll_s=self._poll_interval)
                self._events.event("agent.process_events_off", Severity.WARNING, reason=failure)
            self._posture_due.set()
            return
        self._arm_observe(self._coalescer.event(time.monotonic()))

    def _arm_observe(self, delay: float | None) -> None:
        if delay is not None:
            asyncio.get_running_loop().call_later(delay, self._process_observe_due)

    def _process_observe_due(self) -> None:
        if self._coalescer.fired():  # still owed: no other observe covered the events meanwhile
            self._posture_due.set()
