"""USB devices in sysfs: read what a USBGuard rule needs, write ``authorized``. The root is configurable so
tests can build a tree in a temp dir (this machine has no USB bus).

Layout used (kernel ABI, Documentation/ABI/testing/sysfs-bus-usb and usb/authorization.rst)::

    {root}/bus/usb/devices/usb1 -> ../../../devices/pci0000:00/0000:00:14.0/usb1     root hub
    {root}/bus/usb/devices/1-1  -> ../../../devices/pci0000:00/0000:00:14.0/usb1/1-1
    …/usb1/authorized_default                      0 = new devices start deauthorized
    …/1-1/{idVendor,idProduct,serial,product,authorized,remove,descriptors,uevent}
    …/1-1/port/connect_type                        hotplug, hardwired, not used, unknown

What is read, as USBGuard reads it (``DeviceBase``, ``SysFSDevice::readAttribute``): attributes raw, one
read of at most 4096 bytes, trailing NUL/LF/CR/TAB/BS trimmed, ``serial``/``product`` empty when absent;
interfaces and the hash from the ``descriptors`` file (:mod:`usbdescriptors`; a deauthorized device has
no interface directories, and USBGuard reads nothing else); ``parent-hash`` from the parent directory of
the device's real sysfs path (the parent USB device's hash, or for a root hub the hash of its parent's
path); ``via-port`` is the sysfs name; ``connect_type`` is read once (USBGuard retries for 30 ms while
the kernel has not filled it in; a port without one reads as empty) and is empty for root hubs. A device
whose ids, descriptors or strings USBGuard would refuse (strings over 253 bytes) raises
:class:`SysfsError`, and the enforcer applies the implicit block. Every read is bounded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cleanroom_protocol.usbrules import Interface, UsbDevice

from .usbdescriptors import DescriptorError, device_hash, read_descriptors, string_hash
from .usbdescriptors import parse_descriptors as parse_descriptors

_MAX_ATTR = 4096
_MAX_DESCRIPTORS = 64 * 1024
_MAX_STRING = 253  # USBGuard's USB_GENERIC_STRING_MAX_LENGTH: longer name/serial/connect_type is refused
_TRIM = b"\0\n\r\t\b"
_DEVICE_NAME = re.compile(r"^\d+-\d+(?:\.\d+)*$")
_ROOT_HUB = re.compile(r"^usb\d+$")
_HEX4 = re.compile(rb"^[0-9a-fA-F]{4}$")


class SysfsError(OSError):
    pass


@dataclass(frozen=True)
class _Identity:
    """What USBGuard reads of a device directory and hashes."""

    vendor_id: bytes
    product_id: bytes
    serial: bytes
    name: bytes
    interfaces: tuple[Interface, ...]
    hash: bytes


def parent_path(devpath: str) -> str:
    """USBGuard's ``parentPath``: ``/a/b/c`` -> ``/a/b``; empty when there is no parent."""
    head = devpath.rstrip("/")
    cut = head.rfind("/")
    if cut <= 0:
        return ""
    return head[:cut].rstrip("/")


def enumeration_order(name: str) -> tuple[bool, int, str]:
    """USBGuard's enumeration order (``ueventEnumerateComparePath``): root hubs first, then shorter names
    (nearer the root), then by name."""
    return (not name.startswith("usb"), len(name), name)


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
        """USB devices other than root hubs: what the enforcer authorizes."""
        return sorted(p.name for p in self._entries() if _DEVICE_NAME.match(p.name))

    def all_devices(self) -> list[str]:
        """Root hubs and devices, in USBGuard's enumeration order (``usbguard generate-policy``)."""
        return sorted((*self.root_hubs(), *self.devices()), key=enumeration_order)

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

    def _raw(self, base: Path, attr: str, *, optional: bool = True) -> bytes:
        """An attribute as USBGuard reads it: raw, trailing NUL/LF/CR/TAB/BS trimmed."""
        try:
            return self._read(base / attr).rstrip(_TRIM)
        except FileNotFoundError:
            if optional:
                return b""
            raise
        except OSError as exc:
            raise SysfsError(f"{base / attr}: cannot read: {exc.strerror or exc}") from exc

    def _attr(self, name: str, attr: str, default: str = "") -> str:
        try:
            return self._read(self.devices_dir / name / attr).decode("utf-8", "replace").strip()
        except OSError:
            return default

    def read_device(self, name: str) -> UsbDevice:
        if not (_DEVICE_NAME.match(name) or _ROOT_HUB.match(name)):
            raise SysfsError(f"not a USB device name: {name!r}")
        base = self.devices_dir / name
        ident = self._identity(base)
        connect_type = b""
        if not _ROOT_HUB.match(name):
            connect_type = self._raw(base, "port/connect_type")
            if len(connect_type) > _MAX_STRING:
                raise SysfsError(f"{base}: connect_type longer than {_MAX_STRING} bytes")
        return UsbDevice(
            vendor_id=ident.vendor_id.decode("ascii"),
            product_id=ident.product_id.decode("ascii"),
            serial=ident.serial,
            name=ident.name,
            interfaces=ident.interfaces,
            hash=ident.hash,
            parent_hash=self._parent_hash(name),
            port=name.encode("ascii"),
            connect_type=connect_type,
        )

    def _identity(self, base: Path) -> _Identity:
        try:
            vendor_id = self._raw(base, "idVendor", optional=False)
            product_id = self._raw(base, "idProduct", optional=False)
        except OSError as exc:
            raise SysfsError(f"{base}: cannot read idVendor/idProduct: {exc}") from exc
        if not (_HEX4.match(vendor_id) and _HEX4.match(product_id)):
            raise SysfsError(f"{base}: idVendor/idProduct not 4 hex digits: {vendor_id!r}:{product_id!r}")
        serial = self._raw(base, "serial")
        product = self._raw(base, "product")
        for what, value in (("serial", serial), ("product", product)):
            if len(value) > _MAX_STRING:
                raise SysfsError(f"{base}: {what} longer than {_MAX_STRING} bytes (USBGuard refuses it)")
        try:
            raw = self._read(base / "descriptors", _MAX_DESCRIPTORS + 1)
        except OSError as exc:
            raise SysfsError(f"{base}/descriptors: cannot read: {exc.strerror or exc}") from exc
        if len(raw) > _MAX_DESCRIPTORS:
            raise SysfsError(f"{base}/descriptors: larger than {_MAX_DESCRIPTORS} bytes")
        try:
            parsed = read_descriptors(raw)
        except DescriptorError as exc:
            raise SysfsError(f"{base}/descriptors: {exc}") from exc
        digest = device_hash(
            name=product, vendor_id=vendor_id, product_id=product_id, serial=serial, hashed=parsed.hashed
        )
        return _Identity(vendor_id, product_id, serial, product, parsed.interfaces, digest)

    def devpath(self, name: str) -> str:
        """The device's path below the sysfs root, as in a uevent's DEVPATH (``/devices/…/usb1/1-1``)."""
        real = os.path.realpath(self.devices_dir / name)
        root = os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            raise SysfsError(f"{self.devices_dir / name} resolves outside {root}")
        return "/" + os.path.relpath(real, root)

    def _parent_hash(self, name: str) -> bytes:
        parent = parent_path(self.devpath(name))
        if not parent:
            raise SysfsError(f"{name}: no parent in sysfs")
        parent_dir = Path(os.path.realpath(self.root)) / parent.lstrip("/")
        if self._is_usb_device(parent_dir):
            return self._identity(parent_dir).hash
        return string_hash(parent.encode())

    def _is_usb_device(self, directory: Path) -> bool:
        try:
            uevent = self._read(directory / "uevent")
        except OSError:
            return False
        return b"DEVTYPE=usb_device" in uevent.splitlines()

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
