"""Kernel uevents: the netlink kobject-uevent socket and a parser of its messages.

A kernel uevent datagram is ``ACTION@DEVPATH\\0KEY=VALUE\\0KEY=VALUE\\0…`` (lib/kobject_uevent.c);
udev's re-broadcasts start with ``libudev\\0`` and are ignored (we listen on the kernel group only).
Example for a USB device::

    add@/devices/pci0000:00/0000:00:14.0/usb1/1-1\\0ACTION=add\\0DEVPATH=/devices/…/usb1/1-1\\0
    SUBSYSTEM=usb\\0DEVNAME=bus/usb/001/002\\0DEVTYPE=usb_device\\0PRODUCT=46d/c31c/6400\\0
    TYPE=0/0/0\\0BUSNUM=001\\0DEVNUM=002\\0SEQNUM=2103\\0
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
MAX_UEVENT_BYTES = 8192  # the kernel's UEVENT_BUFFER_SIZE is 2048; anything larger is not a kernel uevent
MAX_KEYS = 64


@dataclass(frozen=True)
class Uevent:
    action: str
    devpath: str
    env: dict[str, str]

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def devtype(self) -> str:
        return self.env.get("DEVTYPE", "")

    @property
    def name(self) -> str:
        """The sysfs name (last DEVPATH component), e.g. ``1-1.2``."""
        return self.devpath.rstrip("/").rsplit("/", 1)[-1]


class UeventError(ValueError):
    pass


def parse_uevent(raw: bytes) -> Uevent:
    """Parse one kernel uevent datagram; :class:`UeventError` says what is wrong."""
    if len(raw) > MAX_UEVENT_BYTES:
        raise UeventError(f"uevent of {len(raw)} bytes exceeds {MAX_UEVENT_BYTES}")
    if raw.startswith(b"libudev\0"):
        raise UeventError("udev-format message (not from the kernel)")
    parts = raw.split(b"\0")
    header = parts[0].decode("utf-8", "replace")
    action, sep, devpath = header.partition("@")
    if not sep or not action or not devpath.startswith("/"):
        raise UeventError(f"bad uevent header {header[:80]!r}")
    env: dict[str, str] = {}
    for part in parts[1:]:
        if not part:
            continue
        key, eq, value = part.decode("utf-8", "replace").partition("=")
        if not eq:
            raise UeventError(f"bad uevent line {key[:80]!r}")
        if len(env) >= MAX_KEYS:
            raise UeventError(f"more than {MAX_KEYS} keys")
        env[key] = value
    if env.get("ACTION", action) != action:
        raise UeventError("ACTION differs from header")
    return Uevent(action=action, devpath=env.get("DEVPATH", devpath), env=env)


def format_uevent(action: str, devpath: str, env: dict[str, str]) -> bytes:
    """The kernel's wire format (used by tests and the benchmark to feed the real parser)."""
    lines = [f"{action}@{devpath}", f"ACTION={action}", f"DEVPATH={devpath}"]
    lines += [f"{k}={v}" for k, v in env.items() if k not in ("ACTION", "DEVPATH")]
    return ("\0".join(lines) + "\0").encode()


def open_uevent_socket() -> socket.socket:
    """The kernel uevent multicast group (needs root or CAP_NET_ADMIN on most kernels)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, KERNEL_GROUP))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
