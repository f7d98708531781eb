"""The drivers a pool may name (``driver = "..."`` in the desktops file), by name."""

from __future__ import annotations

from .base import DesktopDriver
from .command import CommandDriver
from .libvirt import LibvirtDriver


def desktop_drivers(agent: DesktopDriver | None = None) -> dict[str, DesktopDriver]:
    """``libvirt`` and ``command`` (``container`` is not built yet); ``agent``: the endpoint-side driver."""
    drivers: dict[str, DesktopDriver] = {"libvirt": LibvirtDriver(), "command": CommandDriver()}
    if agent is not None:
        drivers["agent"] = agent
    return drivers
