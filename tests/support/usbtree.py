"""A fake USB sysfs tree in a temp dir, shaped like the kernel's (this machine has no USB bus, and no
dummy_hcd/usbip/raw-gadget modules to make one), plus real-format uevents for it.

Layout as on a real machine: devices live below ``devices/pci0000:00/0000:00:14.0/usbN/…`` and
``bus/usb/devices/<name>`` are relative symlinks to them (so the tree can also be bind-mounted over
``/sys``); every device has ``descriptors`` (device descriptor, one configuration, per interface an
interface descriptor, a HID class descriptor for HID interfaces and one endpoint), a ``uevent`` with
``DEVTYPE=usb_device`` and, below a root hub, ``port/connect_type``."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cleanroom_agent.enforcers.uevent import format_uevent

KEYBOARD = (3, 1, 1)
MOUSE = (3, 1, 2)
STORAGE = (8, 6, 0x50)
CCID = (0x0B, 0, 0)
WIRELESS = (0xE0, 1, 1)
HUB = (9, 0, 0)

CONTROLLER = "devices/pci0000:00/0000:00:14.0"
ROOT_HUB_PRODUCT = "xHCI Host Controller"
ROOT_HUB_SERIAL = "0000:00:14.0"


def descriptors(
    interfaces: list[tuple[int, int, int]], vid: int = 0, pid: int = 0, *, bcd_device: int = 0x0100
) -> bytes:
    """Device descriptor (18 bytes) + one configuration descriptor with the given interfaces, each with
    a HID class descriptor (HID interfaces) and one interrupt-IN endpoint."""
    device = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0, 0, 0, 64, vid, pid, bcd_device, 1, 2, 3, 1)
    body = b""
    for n, (c, s, p) in enumerate(interfaces):
        body += bytes([9, 4, n, 0, 1, c, s, p, 0])
        if c == 3:
            body += bytes([9, 0x21, 0x11, 0x01, 0, 1, 0x22, 63, 0])
        body += bytes([7, 5, 0x81 + n, 3, 8, 0, 10])
    total = 9 + len(body)
    config = bytes([9, 2, total & 0xFF, total >> 8, len(interfaces), 1, 0, 0xA0, 50])
    return device + config + body


def _uevent(name: str, vid: int, pid: int) -> str:
    return (
        f"DEVTYPE=usb_device\nDRIVER=usb\nPRODUCT={vid:x}/{pid:x}/100\nTYPE=0/0/0\nDEVNAME=bus/usb/{name}\n"
    )


@dataclass
class FakeUsb:
    root: Path

    @property
    def devices(self) -> Path:
        return self.root / "bus" / "usb" / "devices"

    def _link(self, name: str, real: Path) -> None:
        self.devices.mkdir(parents=True, exist_ok=True)
        link = self.devices / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(real, self.devices))

    def add_hub(self, bus: int = 1, *, bcd_device: int = 0x0612) -> None:
        """A root hub ``usbN`` (Linux Foundation 1d6b:0002; ``bcd_device`` is the kernel version)."""
        hub = self.root / CONTROLLER / f"usb{bus}"
        if hub.exists():
            return
        hub.mkdir(parents=True)
        controller = hub.parent / "uevent"
        if not controller.exists():
            controller.write_text("DRIVER=xhci_hcd\nPCI_CLASS=C0330\nPCI_SLOT_NAME=0000:00:14.0\n")
        (hub / "authorized_default").write_text("1\n")
        (hub / "authorized").write_text("1\n")
        (hub / "idVendor").write_text("1d6b\n")
        (hub / "idProduct").write_text("0002\n")
        (hub / "product").write_text(ROOT_HUB_PRODUCT + "\n")
        (hub / "serial").write_text(ROOT_HUB_SERIAL + "\n")
        (hub / "descriptors").write_bytes(descriptors([HUB], 0x1D6B, 0x0002, bcd_device=bcd_device))
        (hub / "uevent").write_text(_uevent(f"{bus:03d}/001", 0x1D6B, 2))
        self._link(f"usb{bus}", hub)

    def add_device(
        self,
        name: str,
        vid: int,
        pid: int,
        interfaces: list[tuple[int, int, int]],
        *,
        serial: str | bytes = "",
        product: str | bytes = "",
        authorized: int = 0,
        interface_dirs: bool = False,
        connect_type: str = "hotplug",
        raw_descriptors: bytes | None = None,
    ) -> None:
        """``authorized=0``: how a new device looks after authorized_default=0 (no interface dirs).
        ``interface_dirs=True``: a configured (authorized) device, interfaces also as directories.
        The parent (root hub ``usbN`` or hub ``1-2`` for ``1-2.3``) must exist already."""
        bus, _, ports = name.partition("-")
        parent = f"{bus}-{ports.rsplit('.', 1)[0]}" if "." in ports else f"usb{bus}"
        dev = Path(os.path.realpath(self.devices / parent)) / name
        dev.mkdir()
        (dev / "idVendor").write_text(f"{vid:04x}\n")
        (dev / "idProduct").write_text(f"{pid:04x}\n")
        (dev / "bDeviceClass").write_text("00\n")
        for attr, value in (("serial", serial), ("product", product)):
            if value:
                raw = value if isinstance(value, bytes) else value.encode()
                (dev / attr).write_bytes(raw + b"\n")
        (dev / "authorized").write_text(f"{authorized}\n")
        (dev / "remove").write_text("")
        (dev / "uevent").write_text(_uevent(name, vid, pid))
        (dev / "port").mkdir()
        (dev / "port" / "connect_type").write_text(connect_type + "\n")
        blob = raw_descriptors if raw_descriptors is not None else descriptors(interfaces, vid, pid)
        (dev / "descriptors").write_bytes(blob)
        if interface_dirs:
            for n, (c, s, p) in enumerate(interfaces):
                iface = dev / f"{name}:1.{n}"
                iface.mkdir()
                (iface / "bInterfaceClass").write_text(f"{c:02x}\n")
                (iface / "bInterfaceSubClass").write_text(f"{s:02x}\n")
                (iface / "bInterfaceProtocol").write_text(f"{p:02x}\n")
                (iface / "uevent").write_text(f"DEVTYPE=usb_interface\nINTERFACE={c}/{s}/{p}\n")
                self._link(iface.name, iface)
        self._link(name, dev)

    def authorized(self, name: str) -> str:
        return (self.devices / name / "authorized").read_text().strip()

    def removed(self, name: str) -> bool:
        return (self.devices / name / "remove").read_text().strip() == "1"

    def authorized_default(self, bus: int = 1) -> str:
        return (self.devices / f"usb{bus}" / "authorized_default").read_text().strip()

    def uevent(self, name: str, vid: int, pid: int, action: str = "add", seqnum: int = 1) -> bytes:
        """The kernel's message for a USB device (lib/kobject_uevent.c format)."""
        bus, _, _ = name.partition("-")
        link = self.devices / name
        if link.is_symlink():
            devpath = "/" + os.path.relpath(os.path.realpath(link), os.path.realpath(self.root))
        else:  # already gone (a "remove" uevent)
            devpath = f"/{CONTROLLER}/usb{bus}/{name}"
        return format_uevent(
            action,
            devpath,
            {
                "SUBSYSTEM": "usb",
                "DEVNAME": f"bus/usb/{int(bus):03d}/{seqnum + 1:03d}",
                "DEVTYPE": "usb_device",
                "PRODUCT": f"{vid:x}/{pid:x}/100",
                "TYPE": "0/0/0",
                "BUSNUM": f"{int(bus):03d}",
                "DEVNUM": f"{seqnum + 1:03d}",
                "SEQNUM": str(seqnum),
            },
        )


# What the real ``usbguard generate-policy`` (Debian usbguard 1.1.2) prints for the tree reference_tree()
# builds, bind-mounted over /sys in a private mount namespace:
#     unshare -m sh -c 'mount --bind TREE /sys && usbguard generate-policy'
# If this module changes what it writes (descriptors, attributes), regenerate it that way.
GENERATE_POLICY_GOLDEN = r"""
allow id 1d6b:0002 serial "0000:00:14.0" name "xHCI Host Controller" hash "vROwoHDKCWx6bn3/iE8Qz5Y4JRbY5ge3VZChlbWrmLU=" parent-hash "rV9bfLq7c2eA4tYjVjwO4bxhm+y6GgZpl9J60L0fBkY=" with-interface 09:00:00 with-connect-type ""
allow id 1d6b:0002 serial "0000:00:14.0" name "xHCI Host Controller" hash "vROwoHDKCWx6bn3/iE8Qz5Y4JRbY5ge3VZChlbWrmLU=" parent-hash "rV9bfLq7c2eA4tYjVjwO4bxhm+y6GgZpl9J60L0fBkY=" with-interface 09:00:00 with-connect-type ""
allow id 046d:c31c serial "" name "USB Keyboard" hash "eF+/iBsOCSToBIuHtjgNpzzvCz/6LnyOaVBkssFugPk=" parent-hash "vROwoHDKCWx6bn3/iE8Qz5Y4JRbY5ge3VZChlbWrmLU=" via-port "1-1" with-interface { 03:01:01 03:00:00 } with-connect-type "hotplug"
allow id 0781:5581 serial "4C530001234" name "Cruzer Blade" hash "nIdqMjZZ9NyUFv+x3H5he7mh/S7hbnZSdhfPfQTZ1w4=" parent-hash "vROwoHDKCWx6bn3/iE8Qz5Y4JRbY5ge3VZChlbWrmLU=" with-interface 08:06:50 with-connect-type "hardwired"
allow id 05e3:0608 serial "" name "USB2.0 Hub" hash "ZfoH3XL/cPaBwQhKHXX7GYUZVqPLjxuwkbsgdq2ftAc=" parent-hash "vROwoHDKCWx6bn3/iE8Qz5Y4JRbY5ge3VZChlbWrmLU=" via-port "1-3" with-interface 09:00:00 with-connect-type "hotplug"
allow id 8087:0aaa serial "" name "" hash "NhNirAguopJHtE5Q17uuakPyoKNOW2hTJ4ETGhh2S1E=" parent-hash "vROwoHDKCWx6bn3/iE8Qz5Y4JRbY5ge3VZChlbWrmLU=" via-port "2-1" with-interface { e0:01:01 e0:01:01 } with-connect-type "not used"
allow id 1050:0407 serial "" name "YubiKey OTP+CCID" hash "PfPASSF09ckIGK8XYQWwaTw7EgGjpNjcpjbvILYluOU=" parent-hash "ZfoH3XL/cPaBwQhKHXX7GYUZVqPLjxuwkbsgdq2ftAc=" via-port "1-3.1" with-interface { 03:01:01 0b:00:00 } with-connect-type "hotplug"
allow id 0bda:8153 serial "\xff\xfeSN\x091" name "Caf\xc3\xa9 \"NIC\" \\ \x01" hash "ouJ5+Zj1sLdgxWyd8SG/yr69g0HlfgCSdcqcf5yxNaY=" parent-hash "ZfoH3XL/cPaBwQhKHXX7GYUZVqPLjxuwkbsgdq2ftAc=" with-interface { ff:ff:00 02:06:00 0a:00:00 0a:00:00 } with-connect-type "hotplug"
""".strip().splitlines()


def reference_tree(root: Path) -> FakeUsb:
    """Root hubs, a hub, devices with and without serial numbers, non-printable and non-ASCII strings,
    duplicate interfaces, three connect types: what :data:`GENERATE_POLICY_GOLDEN` was made from."""
    usb = FakeUsb(root)
    usb.add_hub(1)
    usb.add_hub(2, bcd_device=0x0515)  # another kernel version: zeroed in the hash
    usb.add_device("1-1", 0x046D, 0xC31C, [KEYBOARD, (3, 0, 0)], product="USB Keyboard", authorized=1)
    usb.add_device(
        "1-2",
        0x0781,
        0x5581,
        [STORAGE],
        product="Cruzer Blade",
        serial="4C530001234",
        connect_type="hardwired",
    )
    usb.add_device("1-3", 0x05E3, 0x0608, [HUB], product="USB2.0 Hub", authorized=1)
    usb.add_device("1-3.1", 0x1050, 0x0407, [KEYBOARD, CCID], product="YubiKey OTP+CCID")
    usb.add_device(
        "1-3.2",
        0x0BDA,
        0x8153,
        [(0xFF, 0xFF, 0), (2, 6, 0), (0x0A, 0, 0), (0x0A, 0, 0)],
        product='Café "NIC" \\ \x01',
        serial=b"\xff\xfeSN\t1",
    )
    usb.add_device("2-1", 0x8087, 0x0AAA, [WIRELESS, WIRELESS], connect_type="not used")
    return usb
