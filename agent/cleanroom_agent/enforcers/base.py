"""The interface every enforcer implements (clipboard, capture, usb, media).

An enforcer decides with pure code and acts through an OS backend beside it (x11.py, fanotify.py, …).
It never reads clipboard content into an event or a log. The daemon owns its lifecycle:

    enforcer = SomeEnforcer(emit=sink)
    await enforcer.start(policy, mode)     # may raise nothing: problems become status degraded/unsupported
    await enforcer.apply(policy, mode)     # a newer policy or mode is in force
    enforcer.status()                      # for posture, any time
    await enforcer.stop()
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable

from cleanroom_protocol import EnforcerState, EnforcerStatus, Event, Mode, Policy

EventSink = Callable[[Event], None]
"""Called from the event loop thread; must not block. Enforcers running threads hand events over with
``loop.call_soon_threadsafe``. Any status change should also be reported as an ``enforcer.status``
event so posture is re-sent at once."""


class Enforcer(abc.ABC):
    name: str

    def __init__(self, emit: EventSink) -> None:
        self._emit = emit
        self._status = EnforcerStatus(name=self.name, state=EnforcerState.OFF)

    def status(self) -> EnforcerStatus:
        return self._status

    def _set_status(self, state: EnforcerState, reason: str | None = None) -> None:
        new = EnforcerStatus(name=self.name, state=state, reason=reason)
        if new != self._status:
            self._status = new
            self._emit(
                Event(
                    kind="enforcer.status",
                    at=time.time(),
                    details={"enforcer": self.name, "state": state.value, "reason": reason},
                )
            )

    @abc.abstractmethod
    async def start(self, policy: Policy, mode: Mode) -> None: ...

    @abc.abstractmethod
    async def apply(self, policy: Policy, mode: Mode) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...


class DisabledEnforcer(Enforcer):
    """Stands in for an enforcer the agent's settings switched off, so posture still names it (``off``,
    with the reason) instead of leaving it out: an auditor sees it was off, not that it was forgotten."""

    def __init__(self, emit: EventSink, name: str, reason: str) -> None:
        self.name = name
        super().__init__(emit)
        self._status = EnforcerStatus(name=name, state=EnforcerState.OFF, reason=reason)

    async def start(self, policy: Policy, mode: Mode) -> None:
        return None

    async def apply(self, policy: Policy, mode: Mode) -> None:
        return None

    async def stop(self) -> None:
        return None
