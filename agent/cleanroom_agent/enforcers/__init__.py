"""Enforcers: one module per mechanism, all behind :class:`Enforcer`."""

from __future__ import annotations

from .base import Enforcer, EventSink

__all__ = ["Enforcer", "EventSink", "build_enforcers"]


def build_enforcers(emit: EventSink) -> list[Enforcer]:
    """The enforcers this agent runs. Filled in by the enforcement issue (clipboard, capture, usb, media)."""
    return []
