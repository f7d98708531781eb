"""Clipboard enforcer (policy ``[clipboard]``): an X11 selection guard on CLIPBOARD and PRIMARY.

The guard thread (x11.SelectionGuard) sees every selection-owner change within about a millisecond,
asks :meth:`_decide` (pure policy + who owns it) and, when the change is forbidden and the mode is
``enforce``, takes ownership back and answers pastes with nothing. Audit mode judges and reports
(``clipboard.detected``) without touching the selection. No clipboard content ever enters an event or a
log: events name the selection, the direction, the owning process and the reason.

Status: ``unsupported`` without an X display or under Wayland; ``degraded`` while the display cannot be
reached (the guard keeps retrying); ``active`` while guarding.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping

from cleanroom_protocol import EnforcerState, Event, Mode, Policy, Severity

from .base import Enforcer, EventSink
from .clipboardrules import Direction, Handling, clipboard_handling
from .procinfo import ProcessIdentity, identify
from .ratelimit import EventBudget
from .x11 import OwnerChange, SelectionGuard, SelectionOutcome, display_problem

Lookup = Callable[[int | None, frozenset[str]], ProcessIdentity]


class ClipboardEnforcer(Enforcer):
    name = "clipboard"

    def __init__(
        self,
        emit: EventSink,
        *,
        display: str | None = None,
        env: Mapping[str, str] | None = None,
        lookup: Lookup = identify,
    ) -> None:
        super().__init__(emit)
        self._display = display
        self._env = env if env is not None else os.environ
        self._lookup = lookup
        self._guard: SelectionGuard | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._policy: Policy | None = None
        self._mode = Mode.ENFORCE
        self._budget = EventBudget()

    async def _start(self, policy: Policy, mode: Mode) -> None:
        self._loop = asyncio.get_running_loop()
        self._policy, self._mode = policy, mode
        problem = display_problem(dict(self._env), self._display)
        if problem:
            self._set_status(EnforcerState.UNSUPPORTED, problem)
            return
        display = self._display or self._env.get("DISPLAY")
        self._guard = SelectionGuard(
            display, self._decide, self._from_thread_outcome, self._from_thread_state, quick=self._quick
        )
        self._guard.start()
        ready = await asyncio.to_thread(self._guard.ready.wait, 5.0)
        if not ready:
            self._set_status(EnforcerState.DEGRADED, f"X display {display} did not answer within 5 s")
        elif self._guard.problem:
            self._set_status(EnforcerState.DEGRADED, self._guard.problem)
        else:
            self._set_status(EnforcerState.ACTIVE)

    async def _apply(self, policy: Policy, mode: Mode) -> None:
        # Read by the guard thread; a reference swap of immutable objects is atomic.
        self._policy, self._mode = policy, mode

    async def _stop(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            await asyncio.to_thread(guard.stop)
        self._set_status(EnforcerState.OFF)

    # called in the guard thread ------------------------------------------------------------------
    def _decide(self, change: OwnerChange) -> Handling:
        policy = self._policy
        assert policy is not None
        who = self._lookup(change.pid, frozenset(policy.sessions.clients))
        direction: Direction = "from_session" if who.in_session else "to_session"
        return clipboard_handling(
            policy.clipboard, direction, enforce=self._mode is Mode.ENFORCE, owner_name=who.name
        )

    def _quick(self, selection: str) -> Handling | None:
        """The handling when it does not depend on who owns the selection (modes block and allow):
        the guard then acts before looking the owner up."""
        policy = self._policy
        if policy is None or policy.clipboard.mode == "directional":
            return None
        return clipboard_handling(policy.clipboard, "to_session", enforce=self._mode is Mode.ENFORCE)

    def _from_thread_outcome(self, outcome: SelectionOutcome) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._report, outcome)

    def _from_thread_state(self, problem: str | None) -> None:
        if self._loop is not None and self._guard is not None:
            self._loop.call_soon_threadsafe(self._on_state, problem)

    # event loop thread ---------------------------------------------------------------------------
    def _on_state(self, problem: str | None) -> None:
        if self._guard is None:
            return
        if problem:
            self._set_status(EnforcerState.DEGRADED, problem)
        else:
            self._set_status(EnforcerState.ACTIVE)

    def _report(self, outcome: SelectionOutcome) -> None:
        if not outcome.blocked:
            return  # permitted changes are not events (a user selecting text all day)
        suppressed = self._budget.take()
        if suppressed is None:
            return
        policy = self._policy
        who = self._lookup(outcome.pid, frozenset(policy.sessions.clients if policy else ()))
        direction: Direction = "from_session" if who.in_session else "to_session"
        self._emit(
            Event(
                kind="clipboard.blocked" if outcome.enforced else "clipboard.detected",
                at=time.time(),
                severity=Severity.WARNING,
                blocked=outcome.enforced,
                details={
                    "selection": outcome.selection,
                    "direction": direction,
                    "pid": outcome.pid,
                    "process": outcome.handling.owner_name or who.name,
                    "reason": outcome.reason[:512],
                    "mode": self._mode.value,
                    "latency_ms": round(outcome.latency_s * 1000, 3),
                    "suppressed_before": suppressed,
                },
            )
        )
