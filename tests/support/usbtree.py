"""A fake USB sysfs tree in a temp dir, shaped like the kernel's (this machine has no USB bus, and no
dummy_hcd/usbip/raw-gadget modules to make one), plus real-format uevents for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cleanroom_agent.enforcers.uevent import format_uevent

KEYBOARD = (3, 1, 1)
MOUSE = (3, 1, 2)
STORAGE = (8, 6, 0x50)
CCID = (0x0B, 0, 0)
WIRELESS = (0xE0, 1, 1)


def descriptors(interfaces: list[tuple[int, int, int]]) -> bytes:
    """Device descriptor (18 bytes) + one configuration descriptor with the given interfaces."""
    device = bytes([18, 1, 0x00, 0x02, 0, 0, 0, 64, 0, 0, 0, 0, 0, 1, 1, 2, 3, 1])
    ifaces = b"".join(bytes([9, 4, n, 0, 1, c, s, p, 0]) for n, (c, s, p) in enumerate(interfaces))
    total = 9 + len(ifaces)
    config = bytes([9, 2, total & 0xFF, total >> 8, len(interfaces), 1, 0, 0x80, 50])
    return device + config + ifaces


@dataclass
class FakeUsb:
    root: Path

    @property
    def devices(self) -> Path:
        return self.root / "bus" / "usb" / "devices"

    def add_hub(self, bus: int = 1) -> None:
        hub = self.devices / f"usb{bus}"
        hub.mkdir(parents=True, exist_ok=True)
        (hub / "authorized_default").write_text("1\n")

    def add_device(
        self,
        name: str,
        vid: int,
        pid: int,
        interfaces: list[tuple[int, int, int]],
        *,
        serial: str = "",
        product: str = "",
        authorized: int = 0,
        interface_dirs: bool = False,
    ) -> None:
        """``authorized=0`` and descriptors only: how a new device looks after authorized_default=0.
        ``interface_dirs=True``: a configured (authorized) device, interfaces as directories."""
        dev = self.devices / name
        dev.mkdir(parents=True)
        (dev / "idVendor").write_text(f"{vid:04x}\n")
        (dev / "idProduct").write_text(f"{pid:04x}\n")
        (dev / "bDeviceClass").write_text("00\n")
        if serial:
            (dev / "serial").write_text(serial + "\n")
        if product:
            (dev / "product").write_text(product + "\n")
        (dev / "authorized").write_text(f"{authorized}\n")
        (dev / "remove").write_text("")
        if interface_dirs:
            for n, (c, s, p) in enumerate(interfaces):
                iface = self.devices / f"{name}:1.{n}"
                iface.mkdir()
                (iface / "bInterfaceClass").write_text(f"{c:02x}\n")
                (iface / "bInterfaceSubClass").write_text(f"{s:02x}\n")
                (iface / "bInterfaceProtocol").write_text(f"{p:02x}\n")
        else:
            (dev / "descriptors").write_bytes(descriptors(interfaces))

    def authorized(self, name: str) -> str:
        return (self.devices / name / "authorized").read_text().strip()

    def removed(self, name: str) -> bool:
        return (self.devices / name / "remove").read_text().strip() == "1"

    def authorized_default(self, bus: int = 1) -> str:
        return (self.devices / f"usb{bus}" / "authorized_default").read_text().strip()

    def uevent(self, name: str, vid: int, pid: int, action: str = "add", seqnum: int = 1) -> bytes:
        """The kernel's message for a USB device (lib/kobject_uevent.c format)."""
        bus, _, _ = name.partition("-")
        return format_uevent(
            action,
            f"/devices/pci0000:00/0000:00:14.0/usb{bus}/{name}",
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
