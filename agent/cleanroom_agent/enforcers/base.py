"""The interface every enforcer implements (clipboard, capture, usb, media).

An enforcer decides with pure code and acts through an OS backend beside it (x11.py, fanotify.py, …).
It never reads clipboard content into an event or a log. The daemon owns its lifecycle:

    enforcer = SomeEnforcer(emit=sink)
    await enforcer.start(policy, mode)     # may raise nothing: problems become status degraded/unsupported
    await enforcer.apply(policy, mode)     # a newer policy or mode is in force
    enforcer.status()                      # for posture, any time
    await enforcer.stop()

``start``, ``apply`` and ``stop`` are serialised by one lock per enforcer: a policy that arrives while the
enforcer is still starting (its backend process not yet up) is applied once the start has finished, never
to a half-started backend that would drop it. ``apply`` before ``start`` does nothing: the daemon starts
each enforcer with the policy in force at that moment. Subclasses implement ``_start``, ``_apply`` and
``_stop``; when one of those returns, the rules of that policy must be in force (confirmed by the backend),
and the status then carries the policy's hash, which compliance compares with the policy judged.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable

from cleanroom_protocol import EnforcerState, EnforcerStatus, Event, Mode, Policy, policy_hash

EventSink = Callable[[Event], None]
"""Called from the event loop thread; must not block. Enforcers running threads hand events over with
``loop.call_soon_threadsafe``. Any status change should also be reported as an ``enforcer.status``
event so posture is re-sent at once."""


class Enforcer(abc.ABC):
    name: str

    def __init__(self, emit: EventSink) -> None:
        self._emit = emit
        self._status = EnforcerStatus(name=self.name, state=EnforcerState.OFF)
        self._lifecycle = asyncio.Lock()
        self._started = False
        self._enforced: str | None = None  # hash of the policy whose rules are in force

    def status(self) -> EnforcerStatus:
        return self._status

    def _set_status(self, state: EnforcerState, reason: str | None = None) -> None:
        enforced = self._enforced if state in (EnforcerState.ACTIVE, EnforcerState.DEGRADED) else None
        new = EnforcerStatus(name=self.name, state=state, reason=reason, policy=enforced)
        if new != self._status:
            self._status = new
            self._emit(
                Event(
                    kind="enforcer.status",
                    at=time.time(),
                    details={
                        "enforcer": self.name,
                        "state": state.value,
                        "reason": reason,
                        "policy": enforced,
                    },
                )
            )

    # lifecycle, serialised ------------------------------------------------------------------------------
    async def start(self, policy: Policy, mode: Mode) -> None:
        async with self._lifecycle:
            self._started = True
            self._enforced = None
            await self._enforcing(policy, self._start(policy, mode), "start")

    async def apply(self, policy: Policy, mode: Mode) -> None:
        async with self._lifecycle:
            if not self._started:
                return  # the start that follows carries the policy in force then
            await self._enforcing(policy, self._apply(policy, mode), "apply")

    async def stop(self) -> None:
        async with self._lifecycle:
            self._started = False
            self._enforced = None
            await self._stop()

    async def _enforcing(self, policy: Policy, step: Awaitable[None], what: str) -> None:
        """Run ``step``; on return the policy's rules are in force, so the status names its hash (until
        then it names the policy before, still in force). A step that raises leaves the enforcer degraded
        with no policy claimed: what is in force is then unknown (fail closed in posture)."""
        try:
            await step
        except Exception as exc:
            self._enforced = None
            self._set_status(EnforcerState.DEGRADED, f"{what} failed: {type(exc).__name__}: {exc}"[:500])
            raise
        self._enforced = policy_hash(policy)
        self._set_status(self._status.state, self._status.reason)

    @abc.abstractmethod
    async def _start(self, policy: Policy, mode: Mode) -> None: ...

    @abc.abstractmethod
    async def _apply(self, policy: Policy, mode: Mode) -> None: ...

    @abc.abstractmethod
    async def _stop(self) -> None: ...


class DisabledEnforcer(Enforcer):
    """Stands in for an enforcer the agent's settings switched off, so posture still names it (``off``,
    with the reason) instead of leaving it out: an auditor sees it was off, not that it was forgotten."""

    def __init__(self, emit: EventSink, name: str, reason: str) -> None:
        self.name = name
        super().__init__(emit)
        self._status = EnforcerStatus(name=name, state=EnforcerState.OFF, reason=reason)

    async def _start(self, policy: Policy, mode: Mode) -> None:
        return None

    async def _apply(self, policy: Policy, mode: Mode) -> None:
        return None

    async def _stop(self) -> None:
        return None
