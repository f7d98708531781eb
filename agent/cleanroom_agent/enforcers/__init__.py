"""Enforcers: one module per mechanism, all behind :class:`Enforcer`."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

from .base import DisabledEnforcer, Enforcer, EventSink
from .capture import CaptureEnforcer, ExecBackend
from .clipboard import ClipboardEnforcer
from .clipboardrules import ClientRedirection, client_clipboard_off, with_clipboard_off
from .media import MediaEnforcer
from .usb import UsbEnforcer

ENFORCER_NAMES = ("clipboard", "capture", "usb", "media")

__all__ = [
    "ENFORCER_NAMES",
    "CaptureEnforcer",
    "ClientRedirection",
    "ClipboardEnforcer",
    "DisabledEnforcer",
    "Enforcer",
    "EventSink",
    "ExecBackend",
    "MediaEnforcer",
    "UsbEnforcer",
    "build_configured_enforcers",
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
    names: Collection[str] | None = None,
) -> list[Enforcer]:
    """The enforcers this agent runs, in start order.

    ``display``: the X display to guard (default: ``$DISPLAY`` at start); ``sysfs_root``: where sysfs is
    mounted (tests point it at a temp tree); ``exec_backend``: ``fanotify`` (blocking, needs root) or
    ``procconn`` (kill after the fact; degraded); ``names``: build only these (``clipboard``,
    ``capture``, ``usb``, ``media``), e.g. a test that must not install a system-wide exec listener.
    """
    factories: dict[str, Callable[[], Enforcer]] = {
        "clipboard": lambda: ClipboardEnforcer(emit, display=display),
        "capture": lambda: CaptureEnforcer(emit, display=display, exec_backend=exec_backend),
        "usb": lambda: UsbEnforcer(emit, sysfs_root=sysfs_root),
        "media": lambda: MediaEnforcer(emit),
    }
    if names is not None and (unknown := set(names) - factories.keys()):
        raise ValueError(f"unknown enforcer(s): {', '.join(sorted(unknown))}")
    return [make() for name, make in factories.items() if names is None or name in names]


def build_configured_enforcers(
    emit: EventSink,
    enabled: Collection[str],
    *,
    sysfs_root: Path = Path("/sys"),
    exec_backend: ExecBackend = "fanotify",
) -> list[Enforcer]:
    """Every enforcer, in start order: the ``enabled`` ones for real, the rest as ``off`` stand-ins."""
    real = {
        e.name: e
        for e in build_enforcers(emit, sysfs_root=sysfs_root, exec_backend=exec_backend, names=enabled)
    }
    return [
        real.get(name) or DisabledEnforcer(emit, name, "disabled in agent settings")
        for name in ENFORCER_NAMES
    ]
