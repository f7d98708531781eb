"""sysfs reading and writing against a tree in a temp dir (this machine has no USB bus)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanroom_agent.enforcers.sysfs import UsbSysfs, parse_descriptors
from cleanroom_agent.enforcers.usbdescriptors import DescriptorError
from cleanroom_protocol.usbrules import Interface
from tests.support.usbtree import KEYBOARD, STORAGE, FakeUsb, descriptors


def test_parse_descriptors_lists_interfaces() -> None:
    assert parse_descriptors(descriptors([KEYBOARD, STORAGE])) == (Interface(3, 1, 1), Interface(8, 6, 0x50))
    # Malformed descriptors are refused whole, as USBGuard refuses the device.
    with pytest.raises(DescriptorError, match="bLength 0"):
        parse_descriptors(b"\x00\x01")
    with pytest.raises(DescriptorError, match="runs past the end"):
        parse_descriptors(descriptors([KEYBOARD])[:-3])  # truncated endpoint descriptor


def test_reads_devices_from_descriptors_configured_or_not(tmp_path: Path) -> None:
    usb = FakeUsb(tmp_path)
    usb.add_hub(1)
    usb.add_device(
        "1-1", 0x046D, 0xC31C, [KEYBOARD], product="USB Keyboard", authorized=1, interface_dirs=True
    )
    usb.add_device("1-2", 0x0781, 0x5581, [STORAGE], serial="ABC")
    sysfs = UsbSysfs(tmp_path)
    assert sysfs.available()
    assert sysfs.root_hubs() == ["usb1"]
    assert sysfs.devices() == ["1-1", "1-2"]
    kbd = sysfs.read_device("1-1")
    assert (kbd.id, kbd.name, kbd.interfaces) == ("046d:c31c", b"USB Keyboard", (Interface(3, 1, 1),))
    stick = sysfs.read_device("1-2")
    assert (stick.serial, stick.interfaces) == (b"ABC", (Interface(8, 6, 0x50),))
    sysfs.set_authorized_default("usb1", 0)
    sysfs.set_authorized("1-2", 1)
    sysfs.remove("1-2")
    assert (usb.authorized_default(), usb.authorized("1-2"), usb.removed("1-2")) == ("0", "1", True)


def test_missing_tree_is_unavailable(tmp_path: Path) -> None:
    assert not UsbSysfs(tmp_path).available()
    assert UsbSysfs(tmp_path).devices() == []
