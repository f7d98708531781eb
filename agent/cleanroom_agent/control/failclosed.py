"""Failing closed: an agent cut off from the controller, or whose spool is full (it cannot record what
happens), ends its sessions itself when the policy says so.

Checked every poll interval against the latest observation (:func:`decisions.fail_closed_reason` decides);
an attempt that left survivors is not repeated for ``RETRY_AFTER_SURVIVORS_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from cleanroom_protocol import Mode, SessionInfo, Severity, violations

from ..decisions import PolicyInForce, fail_closed_reason
from ..messaging.reporting import EventSink
from ..observing.observer import Observation
from ..sessions.ending import SessionEnder

log = structlog.get_logger("cleanroom_agent.control.failclosed")

RETRY_AFTER_SURVIVORS_S = 10.0


class FailClosed:
    def __init__(
        self,
        *,
        mode: Mode,
        poll_interval: float,
        in_force: Callable[[], PolicyInForce],
        offline_since: Callable[[], float | None],
        latest: Callable[[], Observation | None],
        running: Callable[[], list[SessionInfo]],
        ender: SessionEnder,
        events: EventSink,
        spool_full: Callable[[], bool] = lambda: False,
    ) -> None:
        self._mode = mode
        self._poll_interval = poll_interval
        self._in_force = in_force
        self._offline_since = offline_since
        self._latest = latest
        self._running = running
        self._ender = ender
        self._events = events
        self._spool_full = spool_full
        self._backoff_until = 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            await self.check()

    async def check(self) -> None:
        """One check: end every session now if the agent must fail closed."""
        obs = self._latest()
        if obs is None:
            return
        in_force = self._in_force()
        sessions = self._running()
        reason = fail_closed_reason(
            mode=self._mode,
            in_force=in_force,
            offline_since=self._offline_since(),
            now=time.time(),
            local_violations=violations(obs.posture, in_force.effective),
            session_count=len(sessions),
            spool_full=self._spool_full(),
        )
        if reason is None:
            self._backoff_until = 0.0
            return
        if self._backoff_until > time.monotonic():
            return  # the last attempt left survivors: do not spin (and spam events) every poll
        log.warning("failing_closed", reason=reason, sessions=[s.id for s in sessions])
        ended, failed = await self._ender.end(sessions, reason="fail_closed")
        if failed:
            self._backoff_until = time.monotonic() + RETRY_AFTER_SURVIVORS_S
        # With a full spool this event (and each session.ended) goes into the spool's reserve, kept for
        # this evidence; only if the reserve is used up too is it refused and counted (spool_refused). The
        # posture (spool_full, the sessions gone) goes out anyway: postures coalesce, never refused.
        self._events.event(
            "agent.fail_closed",
            Severity.CRITICAL,
            blocked=True,
            reason=reason,
            sessions=",".join(ended + failed),
        )
