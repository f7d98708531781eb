"""Ending sessions: each session's process tree ended (SIGTERM, grace, SIGKILL, verified gone) and reported.

One end at a time (a lock): the session book marks a session ``ending`` before its kill, so an observe
running meanwhile neither reports it as exited nor offers it as a target again. Audit mode ends nothing,
whoever asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from cleanroom_protocol import Mode, SessionInfo

from ..messaging.reporting import EventSink
from .book import SessionBook
from .clients import EndResult, TreeEnder

log = structlog.get_logger("cleanroom_agent.sessions.ending")


class SessionEnder:
    """Ends sessions for a reason (a command, fail-closed); ``grace_s`` is the policy's ``end_grace_s``."""

    def __init__(
        self,
        *,
        mode: Mode,
        book: SessionBook,
        ender: TreeEnder,
        grace_s: Callable[[], float],
        events: EventSink,
        wake_posture: Callable[[], None],
    ) -> None:
        self._mode = mode
        self._book = book
        self._ender = ender
        self._grace_s = grace_s
        self._events = events
        self._wake_posture = wake_posture
        self._lock = asyncio.Lock()

    async def end(self, targets: list[SessionInfo], *, reason: str) -> tuple[list[str], list[str]]:
        """End each session's process tree; returns (ended ids, failed ids). Never in audit mode."""
        if self._mode is not Mode.ENFORCE:  # audit mode ends nothing, whoever asks
            return [], []
        ended, failed = [], []
        grace = self._grace_s()
        async with self._lock:
            for s in targets:
                # Marked before the kill, so a probe digested meanwhile does not report it as "exited".
                if not self._book.begin_end(s):
                    ended.append(s.id)  # over while it waited for the lock; reported when it ended
                    continue
                result: EndResult = await asyncio.to_thread(self._ender.end_tree, s.pid, s.started, grace)
                if result.survivors:
                    self._book.end_failed(s.id)
                    failed.append(s.id)
                    log.error("session_not_ended", session=s.id, survivors=result.survivors)
                    continue
                ended.append(s.id)
                self._book.end_done(s.id, found=result.found)
                self._events.event(
                    "session.ended",
                    session=s.id,
                    client=s.client,
                    reason=reason if result.found else "exited",
                )
        self._wake_posture()
        return ended, failed
