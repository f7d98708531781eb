"""Drives desktops through their states with their drivers: each transition persisted (with its audit entry,
in one transaction) before the step it leads to runs, so a controller killed in ``ending`` or ``wiping``
carries on with that step when it starts again (:meth:`DesktopRunner.poll` finds it).

N controllers on one store (a share group): a process drives a desktop only while it holds its claim in the
store (``Store.claim_desktop``: one conditional upsert, so two processes racing for it cannot both win), renewed
every :meth:`DesktopRunner.poll` (each second) for ``lease_s``; a killed holder's claim lapses after at most
``lease_s`` and another process (or the restarted one) takes the step over. After a step the holder checks it
still holds the claim before it persists the outcome: a process that stalled past its lease and lost the claim
to another drops its result instead of overwriting the new holder's.

Who calls what: the tracker tells it about sessions (started with a desktop address, ended), the action
runner asks it to end a session's desktop for a policy action, the operator's commands change a desktop's
state in the store (``operations.py``) and the daemon's :meth:`poll` picks the change up within a second.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

import structlog

from ..actions.drivers.base import DesktopDriver, Outcome, SessionRef
from ..audit.recorder import Recorder
from ..store import Store
from . import machine
from .config import Desktops, DesktopSpec
from .machine import ACTIVE_STATES, Desktop, DesktopState, Step, TransitionRefused

log = structlog.get_logger("cleanroom.controller.desktops")

Spawn = Callable[[Coroutine[Any, Any, None], str], None]
DONE = {Step.LOG_OFF: frozenset({"ended", "not_found"}), Step.WIPE: frozenset({"clean"})}
# How long a claim on a desktop lasts unless renewed (poll renews every second): the longest a killed
# controller's step waits before another process resumes it.
CLAIM_LEASE_S = 5.0


def process_owner() -> str:
    """A name for this controller process, unique among the processes of a share group (which share one
    controller id): host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(4)}"


def audit_data(d: Desktop, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "state": d.state.value,
        "pool": d.pool,
        "agent": d.agent,
        "session_id": d.session_id,
        "user": d.user,
        "reason": d.reason,
        "attempts": d.attempts,
        "detail": d.detail,
    }
    data.update(extra)
    return data


class DesktopRunner:
    def __init__(
        self,
        *,
        store: Store,
        recorder: Recorder,
        desktops: Callable[[], Desktops],
        drivers: Mapping[str, DesktopDriver],
        spawn: Spawn,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        lease_s: float = CLAIM_LEASE_S,
    ) -> None:
        self._store = store
        self.owner = owner or process_owner()
        self._lease_s = lease_s
        self._recorder = recorder
        self._desktops = desktops
        self._drivers = drivers
        self._spawn = spawn
        self._clock = clock
        self._driving: set[str] = set()

    # -- configuration -----------------------------------------------------------------------------------
    def sync(self) -> int:
        """Desktops newly in the file are stored ``clean`` (made from their golden image when they were set
        up; `desktops wipe ID` if not). Desktops no longer in the file keep their rows; none is driven."""
        added = 0
        now = self._clock()
        for spec in self._desktops():
            with self._store.transaction():
                d = Desktop(spec.id, spec.pool.id, detail="configured", updated=now)
                if self._store.add_desktop(d):
                    self._recorder.record("desktop.added", spec.id, audit_data(d, driver=spec.pool.driver))
                    added += 1
        return added

    # -- sessions (called by the tracker, inside its transaction) ---------------------------------------
    def session_started(
        self,
        agent: str,
        session_id: str,
        *,
        address: str | None,
        name: str | None,
        user: str | None,
        now: float,
    ) -> Desktop | None:
        """A session connected to ``address``: its desktop becomes ``in_use`` (only a clean one; any other
        is refused, audited, and the session is ended on both sides)."""
        spec = self._desktops().match(address, name)
        if spec is None:
            return None
        d = self._store.desktop(spec.id) or Desktop(spec.id, spec.pool.id, updated=now)
        if d.state is DesktopState.IN_USE and (d.agent, d.session_id) == (agent, session_id):
            return d
        try:
            after = machine.assign(d, agent=agent, session_id=session_id, user=user, now=now)
        except TransitionRefused as exc:
            self._recorder.record(
                "desktop.refused",
                spec.id,
                audit_data(d, refused_agent=agent, refused_session=session_id, why=str(exc)),
            )
            log.warning("desktop_refused", desktop=spec.id, state=d.state.value, agent=agent)
            return None
        self._store.save_desktop(after)
        self._store.open_desktop_session(spec.id, agent, session_id, user, address, now)
        self._recorder.record("desktop.in_use", spec.id, audit_data(after, address=address))
        return after

    def session_ended(self, agent: str, session_id: str, *, reason: str, now: float) -> Desktop | None:
        """The session is over at the endpoint: the desktop is logged off on its side too (it may still hold a
        logged-in user) and wiped. Its end is confirmed by the driver, never assumed."""
        return self.end_session(agent, session_id, reason=f"session_ended:{reason}", now=now)

    def end_session(
        self, agent: str, session_id: str, *, reason: str, now: float | None = None
    ) -> Desktop | None:
        """End the desktop side of ``session_id`` (a policy action, an operator, the session's end)."""
        d = self._store.desktop_of_session(agent, session_id)
        if d is None or d.state is not DesktopState.IN_USE:
            return None
        return self._move(
            d, machine.request_end(d, reason=reason, now=now or self._clock()), "desktop.ending"
        )

    # -- the work --------------------------------------------------------------------------------------------
    def poll(self) -> int:
        """Renew this process's claims, then start driving every desktop with a step to do that nobody here
        drives yet (at start: resume; another process's lapsed claim: take over)."""
        now = self._clock()
        if self._driving:
            self._store.renew_desktop_claims(self.owner, now=now, lease_s=self._lease_s)
        held = self._store.desktop_claims()
        started = 0
        for d in self._store.desktops(tuple(s.value for s in ACTIVE_STATES)):
            owner, lease_until = held.get(d.id, (self.owner, 0.0))
            if owner != self.owner and lease_until >= now:
                continue  # another controller drives it
            if d.id not in self._driving:
                self._spawn(self.drive(d.id), f"desktop:{d.id}")
                started += 1
        return started

    async def drive(self, desktop_id: str) -> None:
        """Take one desktop through its steps until it is clean, quarantined or waiting for a session."""
        if desktop_id in self._driving:
            return
        self._driving.add(desktop_id)
        claimed = False
        try:
            claimed = self._claim(desktop_id)
            if not claimed:
                return  # another controller drives it; poll() tries again when its lease lapses
            while await self._advance(desktop_id):
                pass
        except Exception:  # a bug here must not take the daemon down; poll() tries again
            log.exception("desktop_drive_failed", desktop=desktop_id)
        finally:
            self._driving.discard(desktop_id)
            if claimed:
                try:
                    self._store.release_desktop_claim(desktop_id, self.owner)
                except Exception as exc:  # database unreachable: the lease lapses by itself
                    log.warning("desktop_claim_not_released", desktop=desktop_id, error=str(exc))

    def _claim(self, desktop_id: str) -> bool:
        return self._store.claim_desktop(desktop_id, self.owner, now=self._clock(), lease_s=self._lease_s)

    async def _advance(self, desktop_id: str) -> bool:
        d = self._store.desktop(desktop_id)
        if d is None:
            return False
        step = machine.step_of(d)
        if step is None:
            return False
        spec = self._desktops().get(desktop_id)
        if spec is None:
            self._fail(d, None, "the desktop is no longer in the desktops file", retries=1)
            return False
        if d.state is DesktopState.ENDED:
            self._move(d, machine.start_wipe(d, now=self._clock()), "desktop.wiping")
            return True
        if d.next_attempt_at is not None and d.next_attempt_at > self._clock():
            await asyncio.sleep(d.next_attempt_at - self._clock())
        driver = self._drivers.get(spec.pool.driver)
        if driver is None:
            self._fail(d, spec, f"no {spec.pool.driver} driver in this controller", retries=1)
            return False
        started = time.monotonic()
        outcome = await self._run(driver, step, spec, d)
        took = round(time.monotonic() - started, 3)
        if not self._claim(desktop_id):  # stalled past the lease: another process has the step now
            log.warning("desktop_claim_lost", desktop=desktop_id, step=step.value, result=outcome.result)
            return False
        current = self._store.desktop(desktop_id)
        if current is None or current.state is not d.state:
            return True  # an operator moved it meanwhile: follow the new state
        if outcome.result in DONE[step]:
            now = self._clock()
            if step is Step.LOG_OFF:
                after = machine.logged_off(current, detail=outcome.detail, now=now)
                with self._store.transaction():
                    if current.agent and current.session_id:
                        self._store.close_desktop_session(desktop_id, current.agent, current.session_id, now)
                    self._move(current, after, "desktop.ended", took_s=took)
            else:
                self._move(
                    current,
                    machine.wiped(current, detail=outcome.detail, now=now),
                    "desktop.clean",
                    took_s=took,
                )
            return True
        self._fail(current, spec, f"{outcome.result}: {outcome.detail}", took_s=took)
        return True

    async def _run(self, driver: DesktopDriver, step: Step, spec: DesktopSpec, d: Desktop) -> Outcome:
        try:
            if step is Step.LOG_OFF:
                return await driver.log_off(spec, SessionRef(d.agent, d.session_id, d.user, d.reason))
            return await driver.wipe(spec)
        except Exception as exc:  # a driver bug is a failed step, retried and then quarantined
            log.exception("desktop_driver_error", desktop=d.id, step=step.value)
            return Outcome("", "failed", f"driver error: {type(exc).__name__}: {exc}"[:300])

    def _fail(
        self, d: Desktop, spec: DesktopSpec | None, detail: str, *, retries: int | None = None, **extra: Any
    ) -> None:
        after = machine.failed(
            d,
            detail=detail[:500],
            retries=retries if retries is not None else (spec.pool.retries if spec else 1),
            backoff_s=spec.pool.backoff_s if spec else 0.0,
            now=self._clock(),
        )
        kind = "desktop.quarantined" if after.state is DesktopState.QUARANTINED else "desktop.retry"
        self._move(d, after, kind, next_attempt_at=after.next_attempt_at, **extra)
        (log.error if after.state is DesktopState.QUARANTINED else log.warning)(
            kind.replace(".", "_"), desktop=d.id, attempts=after.attempts, detail=detail[:200]
        )

    def _move(self, before: Desktop, after: Desktop, kind: str, **extra: Any) -> Desktop:
        """Persist ``after`` and its audit entry in one transaction (before anything acts on it)."""
        if after == before and kind not in ("desktop.retry",):
            return after
        after = replace(after, updated=self._clock())
        with self._store.transaction():
            self._store.save_desktop(after)
            self._recorder.record(kind, after.id, audit_data(after, previous=before.state.value, **extra))
        log.info(kind.replace(".", "_"), desktop=after.id, state=after.state.value)
        return after
