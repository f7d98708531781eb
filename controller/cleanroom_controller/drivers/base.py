"""The seam every session driver plugs into.

The agent driver (signed ``end_session`` over MQTT) is the first; desktop-side drivers (log off on the VDI
broker, wipe a libvirt desktop back to its snapshot) implement the same method and are chosen by policy
actions later. A driver does its own retries and returns one final :class:`Outcome`; it never raises for
an unreachable target (that is an outcome too).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Outcome:
    """``result``: ``ended`` / ``not_found`` / ``failed`` / ``audit_only`` / ``rejected`` (the target said so)
    or ``expired`` (no answer within the retries; the request may still be queued for the target)."""

    command_id: str
    result: str
    detail: str = ""
    attempts: int = 0


class SessionDriver(abc.ABC):
    name: str

    @abc.abstractmethod
    async def end_session(self, agent: str, session_id: str | None, reason: str) -> Outcome:
        """End ``session_id`` (``None``: every session) on ``agent`` and report what happened."""

    def cancel_pending(self, agent: str, reason: str) -> int:
        """Stop retrying unfinished requests for ``agent`` (it is compliant again); how many were stopped.
        Their ``end_session`` calls return an outcome ``cancelled``."""
        return 0
