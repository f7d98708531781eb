"""The drivers a pool may name (``driver = "..."`` in the desktops file), by name.

libvirt-python is an optional extra (``cleanroom-controller[libvirt]``): it builds from source against
libvirt's headers, and a controller that drives no libvirt pool must install and start without them. When it
is missing, a ``libvirt`` pool gets a driver that fails every step with the reason, so its desktops end in
``quarantined`` (never handed out dirty) and the reason is in the audit trail. The Docker SDK (the
``container`` driver) is an optional extra the same way (``cleanroom-controller[container]``).
"""

from __future__ import annotations

from ...desktops.config import DesktopSpec
from .base import DesktopDriver, DesktopReport, Outcome, SessionRef
from .command import CommandDriver


class UnavailableDriver(DesktopDriver):
    """A driver whose library is not installed: every step fails with ``reason``."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    async def log_off(self, desktop: DesktopSpec | None, session: SessionRef) -> Outcome:
        return Outcome("", "failed", self.reason)

    async def wipe(self, desktop: DesktopSpec) -> Outcome:
        return Outcome("", "failed", self.reason)

    async def report(self, desktop: DesktopSpec) -> DesktopReport:
        return DesktopReport("unknown", self.reason)


def libvirt_driver() -> DesktopDriver:
    try:
        from .libvirt import LibvirtDriver
    except ImportError as exc:
        return UnavailableDriver(
            "libvirt",
            f"the libvirt driver needs libvirt-python ({exc}): install cleanroom-controller[libvirt] "
            "(it builds against Debian's libvirt-dev with pkg-config and a C compiler)",
        )
    return LibvirtDriver()


def container_driver() -> DesktopDriver:
    try:
        from .container import ContainerDriver
    except ImportError as exc:
        return UnavailableDriver(
            "container",
            f"the container driver needs the Docker SDK ({exc}): install cleanroom-controller[container]",
        )
    return ContainerDriver()


def desktop_drivers(agent: DesktopDriver | None = None) -> dict[str, DesktopDriver]:
    """``libvirt``, ``command`` and ``container``; ``agent``: the endpoint-side driver."""
    drivers: dict[str, DesktopDriver] = {
        "libvirt": libvirt_driver(),
        "command": CommandDriver(),
        "container": container_driver(),
    }
    if agent is not None:
        drivers["agent"] = agent
    return drivers
