"""Descriptors, hash, parent-hash, port and connect type read as USBGuard reads them, against a sysfs tree
in a temp dir (the only USB simulation allowed: this machine has no USB bus).

The golden lines (``tests/support/usbtree.py``) are the output of the real ``usbguard generate-policy``
on the tree ``reference_tree`` builds."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cleanroom_agent.enforcers.sysfs import SysfsError, UsbSysfs, parent_path
from cleanroom_agent.enforcers.usbdescriptors import DescriptorError, read_descriptors, string_hash
from cleanroom_protocol.usbrules import Interface, device_rule, parse_rules
from tests.support.usbtree import GENERATE_POLICY_GOLDEN as GOLDEN
from tests.support.usbtree import KEYBOARD, STORAGE, FakeUsb, descriptors, reference_tree


def test_hashes_and_rule_lines_are_exactly_usbguards(tmp_path: Path) -> None:
    reference_tree(tmp_path)
    sysfs = UsbSysfs(tmp_path)
    names = sysfs.all_devices()
    assert names == ["usb1", "usb2", "1-1", "1-2", "1-3", "2-1", "1-3.1", "1-3.2"]  # USBGuard's order
    lines = []
    for name in names:
        device = sysfs.read_device(name)
        lines.append(device_rule(device, with_port=not device.serial))
    assert lines == GOLDEN


def test_generated_rules_parse_back_and_each_matches_its_own_device(tmp_path: Path) -> None:
    reference_tree(tmp_path)
    sysfs = UsbSysfs(tmp_path)
    devices = {name: sysfs.read_device(name) for name in sysfs.all_devices()}
    rules = parse_rules(GOLDEN)
    for name, device in devices.items():
        matching = [n for n, rule in zip(devices, rules, strict=True) if rule.matches(device)]
        # the two root hubs are the same model on the same controller: one hash, as in USBGuard
        assert matching == (["usb1", "usb2"] if name.startswith("usb") else [name])


def test_parent_hash_port_and_connect_type(tmp_path: Path) -> None:
    reference_tree(tmp_path)
    sysfs = UsbSysfs(tmp_path)
    hub, child, root_hub = sysfs.read_device("1-3"), sysfs.read_device("1-3.1"), sysfs.read_device("usb1")
    assert child.parent_hash == hub.hash  # behind a hub: the hub's own hash
    assert hub.parent_hash == root_hub.hash
    assert sysfs.devpath("usb1") == "/devices/pci0000:00/0000:00:14.0/usb1"
    assert root_hub.parent_hash == string_hash(b"/devices/pci0000:00/0000:00:14.0")
    assert (child.port, child.connect_type) == (b"1-3.1", b"hotplug")
    assert (root_hub.port, root_hub.connect_type) == (b"usb1", b"")  # no port/connect_type read for hubs
    assert sysfs.read_device("1-2").connect_type == b"hardwired"


def test_root_hub_hash_ignores_the_kernel_version_other_devices_do_not(tmp_path: Path) -> None:
    reference_tree(tmp_path)
    sysfs = UsbSysfs(tmp_path)
    assert sysfs.read_device("usb1").hash == sysfs.read_device("usb2").hash
    a = read_descriptors(descriptors([KEYBOARD], 0x046D, 0xC31C, bcd_device=0x0100))
    b = read_descriptors(descriptors([KEYBOARD], 0x046D, 0xC31C, bcd_device=0x0200))
    assert a.hashed != b.hashed


def test_strings_are_read_raw_and_trimmed_as_usbguard_trims_them(tmp_path: Path) -> None:
    usb = FakeUsb(tmp_path)
    usb.add_hub()
    usb.add_device("1-1", 0x1234, 0x5678, [STORAGE], serial=b" ABC \x00\r\t", product=b"\xe9t\xe9")
    device = UsbSysfs(tmp_path).read_device("1-1")
    assert (device.serial, device.name) == (b" ABC ", b"\xe9t\xe9")  # NUL/CR/TAB/LF trimmed, not spaces


def test_every_interface_descriptor_counts_duplicates_and_configurations_kept() -> None:
    config = bytes([9, 2, 0, 0, 1, 1, 0, 0x80, 50])
    alt0 = bytes([9, 4, 0, 0, 1, 8, 6, 0x50, 0]) + bytes([7, 5, 0x81, 2, 0, 2, 0])
    alt1 = bytes([9, 4, 0, 1, 1, 8, 6, 0x50, 0]) + bytes([7, 5, 0x81, 2, 0, 2, 0])
    second = bytes([9, 2, 0, 0, 1, 2, 0, 0x80, 50]) + bytes([9, 4, 0, 0, 0, 3, 1, 1, 0])
    device = descriptors([])[:18]
    assert read_descriptors(device + config + alt0 + alt1 + second).interfaces == (
        Interface(8, 6, 0x50),
        Interface(8, 6, 0x50),
        Interface(3, 1, 1),
    )


DEVICE = descriptors([])[:18]
CONFIG = bytes([9, 2, 18, 0, 1, 1, 0, 0x80, 50])
IFACE = bytes([9, 4, 0, 0, 1, 3, 1, 1, 0])


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "less than a device descriptor"),
        (DEVICE[:17], "runs past the end"),
        (DEVICE + b"\x09", "partial descriptor header"),
        (DEVICE + b"\x00\x04", "bLength 0"),
        (struct.pack("<BB", 17, 1) + DEVICE[2:17], "device descriptor of 17 bytes"),
        (DEVICE + DEVICE, "second device descriptor"),
        (CONFIG + DEVICE, "configuration descriptor without a device"),
        (DEVICE + IFACE, "interface descriptor without a configuration"),
        (DEVICE + CONFIG + bytes([7, 5, 0x81, 3, 8, 0, 10]), "endpoint descriptor without a interface"),
        (DEVICE + CONFIG + IFACE[:5], "runs past the end"),
        (DEVICE + CONFIG + bytes([8, 4, 0, 0, 1, 3, 1, 1]), "interface descriptor of 8 bytes"),
        (DEVICE + CONFIG + IFACE + bytes([8, 5, 0x81, 3, 8, 0, 10, 0]), "endpoint descriptor of 8 bytes"),
    ],
)
def test_descriptors_usbguard_refuses_are_refused(raw: bytes, fragment: str) -> None:
    with pytest.raises(DescriptorError, match=fragment):
        read_descriptors(raw)


def test_a_device_usbguard_cannot_read_is_an_error_and_so_gets_the_implicit_block(tmp_path: Path) -> None:
    usb = FakeUsb(tmp_path)
    usb.add_hub()
    usb.add_device("1-1", 0x1234, 0x5678, [STORAGE], raw_descriptors=DEVICE + IFACE)
    usb.add_device("1-2", 0x1234, 0x5678, [STORAGE], product="x" * 254)
    usb.add_device("1-3", 0x1234, 0x5678, [STORAGE])
    (usb.devices / "1-3" / "descriptors").unlink()
    sysfs = UsbSysfs(tmp_path)
    with pytest.raises(SysfsError, match="without a configuration"):
        sysfs.read_device("1-1")
    with pytest.raises(SysfsError, match="longer than 253 bytes"):
        sysfs.read_device("1-2")
    with pytest.raises(SysfsError, match="descriptors: cannot read"):
        sysfs.read_device("1-3")


@pytest.mark.parametrize(
    ("path", "parent"),
    [
        ("/foo/bar", "/foo"),
        ("/foo/bar/", "/foo"),
        ("/foo/bar//", "/foo"),
        ("/foo", ""),
        ("/", ""),
        ("//foo", ""),
    ],
)
def test_parent_path_as_usbguard_computes_it(path: str, parent: str) -> None:
    assert parent_path(path) == parent
