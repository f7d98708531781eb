"""USB devices in sysfs: read what a rule needs, write ``authorized``. The root is configurable so tests
can build a tree in a temp dir (this machine has no USB bus).

Layout used (kernel ABI, Documentation/ABI/testing/sysfs-bus-usb and usb/authorization.rst)::

    {root}/bus/usb/devices/usb1/authorized_default          root hub: 0 = new devices start deauthorized
    {root}/bus/usb/devices/1-1/{idVendor,idProduct,serial,product,authorized,remove,descriptors}
    {root}/bus/usb/devices/1-1:1.0/{bInterfaceClass,bInterfaceSubClass,bInterfaceProtocol}

A deauthorized device is not configured, so its interface directories do not exist yet: the interfaces
are then read from the raw ``descriptors`` file (as USBGuard does). Every read is bounded.
"""

from __future__ import annotations

import re
from pathlib import Path

from .usbrules import Interface, UsbDevice

_MAX_ATTR = 4096
_MAX_DESCRIPTORS = 64 * 1024
_DEVICE_NAME = re.compile(r"^\d+-\d+(?:\.\d+)*$")
_ROOT_HUB = re.compile(r"^usb\d+$")


class SysfsError(OSError):
    pass


def parse_descriptors(raw: bytes) -> tuple[Interface, ...]:
    """Interfaces from the raw descriptors (device descriptor then configuration descriptors).
    Each descriptor is ``bLength, bDescriptorType, …``; an interface descriptor is type 4 with class,
    subclass, protocol at offsets 5, 6, 7. Malformed data ends the walk (what was read so far counts)."""
    found: list[Interface] = []
    pos = 0
    while pos + 2 <= len(raw):
        length, kind = raw[pos], raw[pos + 1]
        if length < 2 or pos + length > len(raw):
            break
        if kind == 4 and length >= 9:
            iface = Interface(raw[pos + 5], raw[pos + 6], raw[pos + 7])
            if iface not in found:
                found.append(iface)
        pos += length
    return tuple(found)


class UsbSysfs:
    """The real sysfs (``root=/sys``) or a tree shaped like it."""

    def __init__(self, root: Path = Path("/sys")) -> None:
        self.root = root
        self.devices_dir = root / "bus" / "usb" / "devices"

    def available(self) -> bool:
        return self.devices_dir.is_dir()

    def root_hubs(self) -> list[str]:
        return sorted(p.name for p in self._entries() if _ROOT_HUB.match(p.name))

    def devices(self) -> list[str]:
        return sorted(p.name for p in self._entries() if _DEVICE_NAME.match(p.name))

    def _entries(self) -> list[Path]:
        try:
            return list(self.devices_dir.iterdir())
        except OSError:
            return []

    def exists(self, name: str) -> bool:
        return (self.devices_dir / name).exists()

    def _read(self, path: Path, limit: int = _MAX_ATTR) -> bytes:
        with path.open("rb") as f:
            return f.read(limit)

    def _attr(self, name: str, attr: str, default: str = "") -> str:
        try:
            return self._read(self.devices_dir / name / attr).decode("utf-8", "replace").strip()
        except OSError:
            return default

    def read_device(self, name: str) -> UsbDevice:
        if not _DEVICE_NAME.match(name):
            raise SysfsError(f"not a USB device name: {name!r}")
        base = self.devices_dir / name
        try:
            vendor = int(self._read(base / "idVendor").strip(), 16)
            product = int(self._read(base / "idProduct").strip(), 16)
        except (OSError, ValueError) as exc:
            raise SysfsError(f"{base}: cannot read idVendor/idProduct: {exc}") from exc
        return UsbDevice(
            vendor=vendor,
            product=product,
            serial=self._attr(name, "serial"),
            name=self._attr(name, "product"),
            interfaces=self._interfaces(name),
        )

    def _interfaces(self, name: str) -> tuple[Interface, ...]:
        try:
            from_descriptors = parse_descriptors(
                self._read(self.devices_dir / name / "descriptors", _MAX_DESCRIPTORS)
            )
        except OSError:
            from_descriptors = ()
        if from_descriptors:
            return from_descriptors
        found: list[Interface] = []
        for entry in sorted(self._entries()):
            if not entry.name.startswith(name + ":"):
                continue
            try:
                iface = Interface(
                    int(self._read(entry / "bInterfaceClass").strip(), 16),
                    int(self._read(entry / "bInterfaceSubClass").strip(), 16),
                    int(self._read(entry / "bInterfaceProtocol").strip(), 16),
                )
            except (OSError, ValueError):
                continue
            if iface not in found:
                found.append(iface)
        return tuple(found)

    def _write(self, path: Path, value: str) -> None:
        try:
            with path.open("w") as f:
                f.write(value)
        except OSError as exc:
            raise SysfsError(f"{path}: cannot write {value!r}: {exc.strerror}") from exc

    def set_authorized_default(self, hub: str, value: int) -> None:
        self._write(self.devices_dir / hub / "authorized_default", str(value))

    def authorized_default(self, hub: str) -> str:
        return self._attr(hub, "authorized_default")

    def authorized(self, name: str) -> str:
        return self._attr(name, "authorized")

    def set_authorized(self, name: str, value: int) -> None:
        self._write(self.devices_dir / name / "authorized", str(value))

    def remove(self, name: str) -> None:
        """Logical removal (``remove`` attribute): the device disappears until replugged."""
        self._write(self.devices_dir / name / "remove", "1")
