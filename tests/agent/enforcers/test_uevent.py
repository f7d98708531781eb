"""Kernel uevent parser, fed real-format messages (lib/kobject_uevent.c layout)."""

from __future__ import annotations

import pytest

from cleanroom_agent.enforcers.uevent import UeventError, format_uevent, parse_uevent

REAL = (
    b"add@/devices/pci0000:00/0000:00:14.0/usb1/1-2\0ACTION=add\0"
    b"DEVPATH=/devices/pci0000:00/0000:00:14.0/usb1/1-2\0SUBSYSTEM=usb\0MAJOR=189\0MINOR=2\0"
    b"DEVNAME=bus/usb/001/003\0DEVTYPE=usb_device\0PRODUCT=781/5581/100\0TYPE=0/0/0\0"
    b"BUSNUM=001\0DEVNUM=003\0SEQNUM=4242\0"
)


def test_parses_a_real_usb_device_uevent() -> None:
    event = parse_uevent(REAL)
    assert (event.action, event.subsystem, event.devtype, event.name) == ("add", "usb", "usb_device", "1-2")
    assert event.env["PRODUCT"] == "781/5581/100"


def test_format_round_trips() -> None:
    raw = format_uevent("remove", "/devices/x/usb1/1-1.4", {"SUBSYSTEM": "usb", "DEVTYPE": "usb_device"})
    event = parse_uevent(raw)
    assert (event.action, event.name, event.subsystem) == ("remove", "1-1.4", "usb")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"libudev\0\xfe\xed", "udev-format"),
        (b"garbage", "bad uevent header"),
        (b"add@/x\0NOEQUALS\0", "bad uevent line"),
        (b"add@/x\0ACTION=remove\0", "ACTION differs"),
        (b"add@/x\0" + b"A=1\0" * 5000, "exceeds"),
        (b"add@/x\0" + b"".join(b"K%d=1\0" % i for i in range(100)), "more than"),
    ],
)
def test_rejects_malformed(raw: bytes, fragment: str) -> None:
    with pytest.raises(UeventError, match=fragment):
        parse_uevent(raw)
