"""Clipboard enforcer (policy ``[clipboard]``): an X11 guard on every selection clients copy and paste
through (CLIPBOARD, PRIMARY, SECONDARY, XdndSelection and the policy's ``extra_selections``) and on the
root window's cut buffers (CUT_BUFFER0–7).

The guard thread (x11clipboard.SelectionGuard) sees every owner change within about a millisecond,
asks :meth:`_decide` (pure policy + who owns it) when the owner matters and, when the change is forbidden
and the mode is ``enforce``, takes ownership back and answers pastes with nothing; a forbidden cut buffer
is deleted unread. Audit mode judges and reports (``clipboard.detected``) without touching anything. No
clipboard content ever enters an event or a log: events name the selection, the direction, the owning
process and the reason.

Storms: an X client changing guarded selections faster than ``storm_changes_per_s`` is disconnected
from the X server (enforce mode), reported as ``clipboard.storm``, and the enforcer is ``degraded`` (with
the reason) until ``storm_calm_s`` pass without one; a policy requiring the enforcer then ends the session.

Status: ``unsupported`` without an X display or under Wayland; ``degraded`` while the display cannot be
reached (the guard keeps retrying) or during a storm; ``active`` while guarding.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from cleanroom_protocol import EnforcerState, Event, Mode, Policy, Severity

from .base import Enforcer, EventSink
from .clipboardrules import Direction, GuardRules, Handling, clipboard_handling, guard_rules
from .procinfo import ProcessIdentity, identify
from .ratelimit import EventBudget
from .x11 import display_problem
from .x11clipboard import OwnerChange, SelectionGuard, SelectionOutcome, StormOutcome

Lookup = Callable[[int | None, frozenset[str]], ProcessIdentity]
T = TypeVar("T")

_READY_TIMEOUT_S = 5.0


def rules_for(policy: Policy, mode: Mode) -> GuardRules:
    return guard_rules(policy.clipboard, enforce=mode is Mode.ENFORCE)


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
        self._storm_budget = EventBudget(rate_per_s=2.0, burst=10)
        self._display_problem: str | None = None
        self._storm_reason: str | None = None

    @property
    def guard(self) -> SelectionGuard | None:
        """The running guard (its ``stats`` are read by tests and the bench)."""
        return self._guard

    async def _start(self, policy: Policy, mode: Mode) -> None:
        self._loop = asyncio.get_running_loop()
        self._policy, self._mode = policy, mode
        self._display_problem = self._storm_reason = None
        problem = display_problem(dict(self._env), self._display)
        if problem:
            self._set_status(EnforcerState.UNSUPPORTED, problem)
            return
        display = self._display or self._env.get("DISPLAY")
        self._guard = SelectionGuard(
            display,
            rules_for(policy, mode),
            decide=self._decide,
            report=self._from_thread(self._report),
            storm=self._from_thread(self._on_storm),
            calm=lambda: self._from_thread(self._on_calm)(None),
            state=self._from_thread(self._on_state),
            describe=lambda pid: self._lookup(pid, frozenset()).name,
            budget=EventBudget(),
        )
        self._guard.start()
        ready = await asyncio.to_thread(self._guard.ready.wait, _READY_TIMEOUT_S)
        if not ready:
            self._display_problem = f"X display {display} did not answer within {_READY_TIMEOUT_S:g} s"
        elif self._guard.problem:
            self._display_problem = self._guard.problem
        self._show_status()

    async def _apply(self, policy: Policy, mode: Mode) -> None:
        # The decision callback reads these in the guard thread; a reference swap of immutable objects
        # is atomic. The guard then re-judges every current owner and cut buffer under the new rules
        # before configure() returns (False: not connected now; the rules apply at the next connection,
        # and the status says degraded meanwhile).
        self._policy, self._mode = policy, mode
        guard = self._guard
        if guard is not None:
            await asyncio.to_thread(guard.configure, rules_for(policy, mode))

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

    def _from_thread(self, handler: Callable[[T], None]) -> Callable[[T], None]:
        """The guard thread's report, handed to the event loop (handlers must not block the guard)."""

        def hand_over(item: T) -> None:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(handler, item)

        return hand_over

    # event loop thread ---------------------------------------------------------------------------
    def _show_status(self) -> None:
        if self._guard is None:
            return
        if self._display_problem:
            self._set_status(EnforcerState.DEGRADED, self._display_problem)
        elif self._storm_reason:
            self._set_status(EnforcerState.DEGRADED, self._storm_reason)
        else:
            self._set_status(EnforcerState.ACTIVE)

    def _on_state(self, problem: str | None) -> None:
        self._display_problem = problem
        if problem is not None:
            self._storm_reason = None  # a new connection starts with no storm
        self._show_status()

    def _on_calm(self, _: None) -> None:
        self._storm_reason = None
        self._show_status()

    def _on_storm(self, storm: StormOutcome) -> None:
        policy = self._policy
        calm_s = policy.clipboard.storm_calm_s if policy else 0
        client = "an unknown X client" if storm.client is None else f"X client {storm.client:#x}"
        if storm.pid is not None:
            client += f" (pid {storm.pid}{', ' + storm.process if storm.process else ''})"
        what = {
            "owner_changes": "took guarded selections",
            "pastes": "asked the guard for selections",
            "unattributed_owner": "cleared guarded selections",
            "cut_buffers": "wrote cut buffers",
        }[storm.what]
        together = " (with other clients)" if storm.together else ""
        reason = (
            f"selection storm: {client} {what} more than {storm.limit_per_s:.0f} times within a second"
            f"{together}: {storm.action.replace('_', ' ')}"
            + (f" ({storm.detail})" if storm.action != "disconnected" else "")
        )[:400]
        if storm.action != "reported":
            self._storm_reason = f"{reason}; active again after {calm_s:g} s without a storm"
            self._show_status()
        suppressed = self._storm_budget.take()
        if suppressed is None:
            return
        self._emit(
            Event(
                kind="clipboard.storm",
                at=time.time(),
                severity=Severity.WARNING if storm.action == "reported" else Severity.CRITICAL,
                blocked=storm.action == "disconnected",
                details={
                    "what": storm.what,
                    "client": None if storm.client is None else f"{storm.client:#x}",
                    "pid": storm.pid,
                    "process": storm.process,
                    "selections": ",".join(storm.selections),
                    "rate_per_s": storm.rate_per_s,
                    "limit_per_s": storm.limit_per_s,
                    "together": storm.together,
                    "action": storm.action,
                    "detail": storm.detail[:300],
                    "disconnect_ms": round(storm.latency_s * 1000, 3),
                    "mode": self._mode.value,
                    "suppressed_before": suppressed,
                },
            )
        )

    def _report(self, outcome: SelectionOutcome) -> None:
        if not outcome.blocked:
            return  # permitted changes are not events (a user selecting text all day)
        policy = self._policy
        if outcome.channel == "cut_buffer":
            direction, process = "unknown", None
        else:
            who = self._lookup(outcome.pid, frozenset(policy.sessions.clients if policy else ()))
            direction = "from_session" if who.in_session else "to_session"
            process = outcome.handling.owner_name or who.name
        self._emit(
            Event(
                kind="clipboard.blocked" if outcome.enforced else "clipboard.detected",
                at=time.time(),
                severity=Severity.WARNING,
                blocked=outcome.enforced,
                details={
                    "selection": outcome.selection,
                    "channel": outcome.channel,
                    "direction": direction,
                    "pid": outcome.pid,
                    "process": process,
                    "reason": outcome.reason[:512],
                    "mode": self._mode.value,
                    "latency_ms": round(outcome.latency_s * 1000, 3),
                    "changes": outcome.changes,
                    "suppressed_before": outcome.suppressed_before,
                },
            )
        )
