"""What the agent tells the controller: events at once, posture on change, at least every heartbeat.

:class:`EventSink` queues events in the outbox (and is the sink handed to enforcers).
:class:`PostureAssembler` makes a posture from what an observation found and the state of the agent.
:class:`PostureReporter` decides when a posture leaves: on change (by fingerprint), forced on reconnect and
every ``report.heartbeat_s``, and never while enforcers start or apply a policy (:meth:`PostureReporter.held`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import structlog

from cleanroom_protocol import Event, Mode, Posture, ProcessInfo, SessionInfo, Severity

from ..decisions import PolicyInForce
from ..enforcers import Enforcer
from ..observing.posture import HostFacts, assemble_posture, fingerprint
from .outbox import Outbox

log = structlog.get_logger("cleanroom_agent.messaging.reporting")

HELD_RETRY_S = 0.1  # a heartbeat held or not sendable is tried again this soon (never a spin)
HEARTBEAT_TICK_S = 1.0  # the heartbeat wakes at least this often: the policy's heartbeat_s may change


# Events that change what posture reports: an enforcer's status, and a mount appearing or going (the media
# enforcer watches the mount table with POLLPRI), so posture follows them at once instead of at the next poll.
POSTURE_EVENTS = ("enforcer.status", "media.")


class EventSink:
    """Queues events for publishing at once; one that changes posture (``POSTURE_EVENTS``) also asks for a
    posture round."""

    def __init__(self, outbox: Outbox, *, on_enforcer_status: Callable[[], None]) -> None:
        self._outbox = outbox
        self._on_enforcer_status = on_enforcer_status

    def emit(self, event: Event) -> None:
        """Queue an event for publishing at once (also the sink handed to enforcers)."""
        try:
            self._outbox.event(event)
        except Exception:
            log.exception("event_not_queued", kind=event.kind)
            return
        log.info("event", kind=event.kind, **{k: v for k, v in event.details.items() if k != "reasons"})
        if event.kind.startswith(POSTURE_EVENTS):
            self._on_enforcer_status()

    def event(
        self, kind: str, severity: Severity = Severity.INFO, *, blocked: bool = False, **details: Any
    ) -> None:
        self.emit(Event(kind=kind, at=time.time(), severity=severity, blocked=blocked, details=details))

    def rejected(self, what: str, reason: str, /, **counts: float) -> None:
        """A command or policy refused (bad signature, older version, ...): ``{what}.rejected``. ``counts``:
        a flood's summary (``count``, ``window_s`` and how many per verdict), see ``refusals.py``."""
        details: dict[str, Any] = {"reason": reason, **counts}
        self.emit(Event(kind=f"{what}.rejected", at=time.time(), severity=Severity.WARNING, details=details))


class PostureAssembler:
    """A posture of this endpoint from an observation's facts, its denied processes and its sessions, with
    the state of the agent itself (policy, enforcers, offline, spool full and what it refused)."""

    def __init__(
        self,
        *,
        agent_id: str,
        mode: Mode,
        in_force: Callable[[], PolicyInForce],
        enforcers: Sequence[Enforcer],
        offline_since: Callable[[], float | None],
        spool_full: Callable[[], bool] = lambda: False,
        spool_refused: Callable[[], int] = lambda: 0,
    ) -> None:
        self._agent_id = agent_id
        self._mode = mode
        self._in_force = in_force
        self._enforcers = enforcers
        self._offline_since = offline_since
        self._spool_full = spool_full
        self._spool_refused = spool_refused

    def __call__(self, facts: HostFacts, denied: list[ProcessInfo], sessions: list[SessionInfo]) -> Posture:
        return assemble_posture(
            agent_id=self._agent_id,
            mode=self._mode,
            policy=self._in_force().ref,
            facts=facts,
            denied=denied,
            sessions=sessions,
            enforcers=[e.status() for e in self._enforcers],
            offline_since=self._offline_since(),
            spool_full=self._spool_full(),
            spool_refused=self._spool_refused(),
        )


class PostureReporter:
    """Sends postures: on change, forced when asked (reconnect, release of a hold, heartbeat), never held.

    ``current`` rebuilds the posture of the latest observation with the state of now (``None`` before the
    first observation); ``wake`` asks for a posture round (a fresh observe)."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        current: Callable[[], Posture | None],
        heartbeat_s: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        self._outbox = outbox
        self._current = current
        self._heartbeat_s = heartbeat_s
        self._wake = wake
        self._last_fingerprint: str | None = None
        self._last_sent = 0.0
        self._holds = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No posture leaves while enforcers start or apply a policy: it would report rules half in force,
        and the controller would act on that transient. On release the settled posture is sent at once;
        a failed start or apply shows in it (degraded, no policy hash), so holding hides nothing."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                self.resend()
            self._wake()

    def send(self, posture: Posture, *, force: bool = False) -> bool:
        """Queue ``posture`` (unless unchanged and not forced, or held); True when it was queued."""
        if self._holds:
            return False
        fp = fingerprint(posture)
        if not force and fp == self._last_fingerprint:
            return False
        try:
            self._outbox.posture(posture)
        except ValueError as exc:  # over the message size limit
            log.error("posture_not_sent", error=str(exc))
            return False
        self._last_fingerprint = fp
        self._last_sent = time.monotonic()
        return True

    def resend(self) -> bool:
        """Send the latest posture, rebuilt now, even if unchanged (reconnect, end of a hold, heartbeat)."""
        posture = self._current()
        return posture is not None and self.send(posture, force=True)

    async def heartbeat_loop(self) -> None:
        """A posture at least every ``report.heartbeat_s`` of the policy in force, changed or not."""
        while True:
            due = self._last_sent + self._heartbeat_s() - time.monotonic()
            if due <= 0:
                if self.resend():
                    continue
                due = HELD_RETRY_S  # held or not sendable: try again shortly, never spin
            await asyncio.sleep(max(HELD_RETRY_S, min(due, HEARTBEAT_TICK_S)))
