"""The seam every driver plugs into: log a session off, wipe a desktop, report a desktop's state.

:class:`DesktopDriver` is the one interface. The agent driver (a signed ``end_session`` over MQTT, ending
the client's process tree on the endpoint) is a :class:`SessionDriver`: it logs sessions off and has no
desktop to wipe. The desktop-side drivers (``libvirt``, ``command``) log the session off on the desktop,
wipe it back to its golden image and verify it. A driver does its own waiting and returns one final
:class:`Outcome`; it never raises for an unreachable target (that is an outcome too).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...desktops.config import DesktopSpec


@dataclass(frozen=True, slots=True)
class Outcome:
    """``result``: ``ended`` / ``not_found`` / ``failed`` / ``audit_only`` / ``rejected`` (the target said so)
    or ``expired`` (no answer within the retries; the request may still be queued for the target). Desktop
    steps: ``ended`` (log-off confirmed), ``clean`` (wipe verified), ``retry`` (not yet: try again later),
    ``failed``, ``unsupported`` (this driver cannot do that step)."""

    command_id: str
    result: str
    detail: str = ""
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class SessionRef:
    """The session a log-off is for (``None`` fields: not known, e.g. an operator's wipe)."""

    agent: str | None
    session_id: str | None
    user: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class DesktopReport:
    """A desktop as its driver sees it: ``running``, ``shut_off``, ``missing``, ``unknown``, or the site
    script's own word; ``detail`` says more (never secrets)."""

    state: str
    detail: str = ""


class DesktopDriver(abc.ABC):
    name: str

    @abc.abstractmethod
    async def log_off(self, desktop: DesktopSpec | None, session: SessionRef) -> Outcome:
        """End ``session`` (on ``desktop`` for the desktop drivers) and confirm it ended."""

    @abc.abstractmethod
    async def wipe(self, desktop: DesktopSpec) -> Outcome:
        """Return ``desktop`` to its golden image and verify it (``clean``), or say why not."""

    @abc.abstractmethod
    async def report(self, desktop: DesktopSpec) -> DesktopReport:
        """The desktop's state as the driver sees it now."""


class SessionDriver(DesktopDriver):
    """A driver that ends sessions on the endpoint (the agent): it has no desktop to wipe."""

    @abc.abstractmethod
    async def end_session(self, agent: str, session_id: str | None, reason: str) -> Outcome:
        """End ``session_id`` (``None``: every session) on ``agent`` and report what happened."""

    def cancel_pending(self, agent: str, reason: str) -> int:
        """Stop retrying unfinished requests for ``agent`` (it is compliant again); how many were stopped.
        Their ``end_session`` calls return an outcome ``cancelled``."""
        return 0

    async def log_off(self, desktop: DesktopSpec | None, session: SessionRef) -> Outcome:
        if session.agent is None:
            return Outcome("", "unsupported", "no endpoint known for this session")
        return await self.end_session(session.agent, session.session_id, session.reason)

    async def wipe(self, desktop: DesktopSpec) -> Outcome:
        return Outcome("", "unsupported", f"the {self.name} driver ends sessions on the endpoint only")

    async def report(self, desktop: DesktopSpec) -> DesktopReport:
        return DesktopReport("unknown", f"the {self.name} driver does not see desktops")
