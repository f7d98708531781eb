"""Enforcers: one module per mechanism, all behind :class:`Enforcer`."""

from __future__ import annotations

from pathlib import Path

from .base import Enforcer, EventSink
from .capture import CaptureEnforcer, ExecBackend
from .clipboard import ClipboardEnforcer
from .clipboardrules import ClientRedirection, client_clipboard_off, with_clipboard_off
from .media import MediaEnforcer
from .usb import UsbEnforcer

__all__ = [
    "CaptureEnforcer",
    "ClientRedirection",
    "ClipboardEnforcer",
    "Enforcer",
    "EventSink",
    "ExecBackend",
    "MediaEnforcer",
    "UsbEnforcer",
    "build_enforcers",
    "client_clipboard_off",
    "with_clipboard_off",
]


def build_enforcers(
    emit: EventSink,
    *,
    display: str | None = None,
    sysfs_root: Path = Path("/sys"),
    exec_backend: ExecBackend = "fanotify",
) -> list[Enforcer]:
    """The enforcers this agent runs. ``display``: the X display to guard (default: ``$DISPLAY`` at
    start); ``sysfs_root``: where sysfs is mounted (tests point it at a temp tree); ``exec_backend``:
    ``fanotify`` (blocking, needs root) or ``procconn`` (kill after the fact; degraded)."""
    return [
        ClipboardEnforcer(emit, display=display),
        CaptureEnforcer(emit, display=display, exec_backend=exec_backend),
        UsbEnforcer(emit, sysfs_root=sysfs_root),
        MediaEnforcer(emit),
    ]
