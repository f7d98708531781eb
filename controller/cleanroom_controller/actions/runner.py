"""Runs decided actions through a session driver, each as its own named task, and records the outcome."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, Protocol

import structlog

from ..audit.recorder import Recorder
from ..decisions import decide
from ..decisions.decide import EndSession
from ..models import SessionState
from ..store import Store
from .drivers.base import Outcome, SessionDriver

log = structlog.get_logger("cleanroom.controller.actions")

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class DesktopSide(Protocol):
    def end_session(
        self, agent: str, session_id: str, *, reason: str, now: float | None = None
    ) -> object: ...

    def poll(self) -> int: ...


class ActionRunner:
    def __init__(
        self,
        *,
        driver: SessionDriver,
        store: Store,
        recorder: Recorder,
        spawn: Spawn,
        desktops: DesktopSide | None = None,
    ) -> None:
        self._driver = driver
        self._store = store
        self._recorder = recorder
        self._spawn = spawn
        self._desktops = desktops

    def submit(self, action: EndSession) -> None:
        # Both sides at once: the desktop side never waits for the endpoint's ack (a frozen, stolen or
        # tampered endpoint does not answer).
        if action.desktop and self._desktops is not None:
            with self._store.transaction():
                self._desktops.end_session(action.agent, action.session_id, reason=action.reason)
            self._desktops.poll()
        if action.endpoint:
            self._spawn(self.run(action), f"end_session:{action.agent}:{action.session_id}")

    async def run(self, action: EndSession) -> None:
        try:
            outcome = await self._driver.end_session(action.agent, action.session_id, action.reason)
        except Exception as exc:  # a driver bug must not take the daemon down; it is recorded instead
            log.exception("driver_failed", agent=action.agent, session=action.session_id)
            outcome = Outcome("", "failed", f"driver error: {exc}")
        self.apply(action.agent, action.session_id, outcome)

    def apply(self, agent: str, session_id: str | None, outcome: Outcome) -> None:
        self._recorder.record(
            "action.outcome",
            agent,
            {
                "driver": self._driver.name,
                "command_id": outcome.command_id,
                "session_id": session_id,
                "result": outcome.result,
                "detail": outcome.detail,
                "attempts": outcome.attempts,
            },
        )
        if session_id is None:
            return
        session = self._store.session(agent, session_id)
        if session is None or session.state is SessionState.ENDED:
            return
        self._store.save_session(
            replace(
                decide.after_ack(session, outcome.result), command_id=outcome.command_id or session.command_id
            )
        )
