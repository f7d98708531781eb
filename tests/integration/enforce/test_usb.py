"""USB enforcement end to end in-process: the real UsbEnforcer on a running event loop, a sysfs tree in a
temp dir and real-format kernel uevents sent as datagrams through a socket into the same parser and
handler the netlink socket feeds. Simulated because this machine has no USB bus (no dummy_hcd, usbip or
raw-gadget modules); the real netlink uevent socket is opened separately to prove it works here."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cleanroom_agent.enforcers.uevent import open_uevent_socket
from cleanroom_agent.enforcers.usb import UsbEnforcer
from cleanroom_protocol import EnforcerState, Event, Mode, Policy
from tests.support.usbtree import CCID, KEYBOARD, MOUSE, STORAGE, FakeUsb

pytestmark = pytest.mark.root


@dataclass
class Rig:
    usb: FakeUsb
    events: list[Event]
    kernel: socket.socket  # the "kernel" end: send uevents here
    enforcer: UsbEnforcer

    async def wait(self, what: str, cond: object, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not callable(cond) or not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; events: {[e.kind for e in self.events]}")
            await asyncio.sleep(0.01)

    def kinds(self, device: str) -> list[str]:
        return [e.kind for e in self.events if e.details.get("device") == device]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    usb = FakeUsb(tmp_path)
    usb.add_hub(1)
    usb.add_hub(2)
    # Present at start: the keyboard in use (configured, interface dirs) and a flash drive.
    usb.add_device(
        "1-1", 0x046D, 0xC31C, [KEYBOARD], product="USB Keyboard", authorized=1, interface_dirs=True
    )
    usb.add_device("2-1", 0x0781, 0x5581, [STORAGE], product="Cruzer", authorized=1, interface_dirs=True)
    kernel, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    events: list[Event] = []
    enforcer = UsbEnforcer(events.append, sysfs_root=tmp_path, uevent_socket=lambda: agent_end)
    rules = [
        'allow id 0781:5583 serial "4C530001234"',
        "allow with-interface one-of { 03:00:* 03:01:* }",
        "allow with-interface equals { 0b:*:* }",
        "block",
    ]
    await enforcer.start(
        Policy.model_validate({"id": "p", "version": 1, "usb": {"rules": rules}}), Mode.ENFORCE
    )
    try:
        yield Rig(usb, events, kernel, enforcer)
    finally:
        await enforcer.stop()
        kernel.close()


async def test_start_locks_hubs_keeps_present_keyboard_blocks_present_storage(rig: Rig) -> None:
    assert rig.enforcer.status().state is EnforcerState.ACTIVE
    assert rig.usb.authorized_default(1) == rig.usb.authorized_default(2) == "0"
    assert rig.usb.authorized("1-1") == "1"
    assert rig.kinds("1-1") == ["usb.allowed"]
    kept = next(e for e in rig.events if e.details.get("device") == "1-1")
    assert kept.details["rule"] == "keep_present_hid"
    assert rig.usb.authorized("2-1") == "0"
    assert rig.kinds("2-1") == ["usb.blocked"]


async def test_new_keyboard_and_mouse_allowed(rig: Rig) -> None:
    rig.usb.add_device("1-2", 0x413C, 0x2113, [KEYBOARD, MOUSE], product="Dell KB")
    rig.kernel.send(rig.usb.uevent("1-2", 0x413C, 0x2113))
    await rig.wait("keyboard authorized", lambda: rig.usb.authorized("1-2") == "1")
    assert rig.kinds("1-2") == ["usb.allowed"]


async def test_new_flash_drive_blocked(rig: Rig) -> None:
    rig.usb.add_device("1-3", 0x0781, 0x5581, [STORAGE], product="Cruzer Blade", serial="X1")
    rig.kernel.send(rig.usb.uevent("1-3", 0x0781, 0x5581))
    await rig.wait("usb.blocked for 1-3", lambda: rig.kinds("1-3") == ["usb.blocked"])
    assert rig.usb.authorized("1-3") == "0"
    assert not rig.usb.removed("1-3")
    event = next(e for e in rig.events if e.details.get("device") == "1-3")
    assert event.blocked
    assert (event.details["id"], event.details["interfaces"], event.details["rule"]) == (
        "0781:5581",
        "08:06:50",
        "block",
    )


async def test_keyboard_storage_composite_rejected_whole(rig: Rig) -> None:
    rig.usb.add_device("1-4", 0x1234, 0x5678, [KEYBOARD, STORAGE], product="Totally a keyboard")
    rig.kernel.send(rig.usb.uevent("1-4", 0x1234, 0x5678))
    await rig.wait("composite removed", lambda: rig.usb.removed("1-4"))
    assert rig.usb.authorized("1-4") == "0"
    event = next(e for e in rig.events if e.details.get("device") == "1-4")
    assert (event.kind, event.details["verdict"]) == ("usb.blocked", "reject")
    assert "08:06:50" in str(event.details["reason"])


async def test_serial_rule_matches_only_that_stick(rig: Rig) -> None:
    rig.usb.add_device("2-2", 0x0781, 0x5583, [STORAGE], serial="4C530001234")
    rig.usb.add_device("2-3", 0x0781, 0x5583, [STORAGE], serial="4C530009999")
    rig.kernel.send(rig.usb.uevent("2-2", 0x0781, 0x5583, seqnum=10))
    rig.kernel.send(rig.usb.uevent("2-3", 0x0781, 0x5583, seqnum=11))
    await rig.wait("both judged", lambda: rig.kinds("2-2") and rig.kinds("2-3"))
    assert (rig.usb.authorized("2-2"), rig.kinds("2-2")) == ("1", ["usb.allowed"])
    assert (rig.usb.authorized("2-3"), rig.kinds("2-3")) == ("0", ["usb.blocked"])


async def test_smart_card_reader_allowed_and_non_usb_uevents_ignored(rig: Rig) -> None:
    rig.kernel.send(b"add@/devices/virtual/net/tap0\0ACTION=add\0SUBSYSTEM=net\0INTERFACE=tap0\0")
    rig.usb.add_device("1-5", 0x076B, 0x3021, [CCID])
    rig.kernel.send(rig.usb.uevent("1-5", 0x076B, 0x3021))
    await rig.wait("reader authorized", lambda: rig.usb.authorized("1-5") == "1")
    assert rig.enforcer.rejected_uevents == 0


def test_real_netlink_uevent_socket_opens() -> None:
    sock = open_uevent_socket()
    try:
        assert sock.family == socket.AF_NETLINK
    finally:
        sock.close()
