"""UsbEnforcer decisions and statuses against a sysfs tree in a temp dir (no USB bus on this machine);
uevents are real-format datagrams through a socketpair into the same parser."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from cleanroom_agent.enforcers.usb import UsbEnforcer
from cleanroom_protocol import EnforcerState, Event, Mode, Policy
from cleanroom_protocol.policy import UsbSection
from tests.support.usbtree import KEYBOARD, STORAGE, FakeUsb


def policy(**usb: object) -> Policy:
    return Policy.model_validate({"id": "p", "version": 1, "usb": usb})


async def test_no_usb_bus_is_unsupported(tmp_path: Path) -> None:
    events: list[Event] = []
    enforcer = UsbEnforcer(events.append, sysfs_root=tmp_path)
    await enforcer.start(policy(), Mode.ENFORCE)
    assert enforcer.status().state is EnforcerState.UNSUPPORTED
    assert "no USB bus" in (enforcer.status().reason or "")
    await enforcer.stop()


async def test_bad_rule_is_refused_with_the_policy_and_fails_closed_if_one_gets_through(
    tmp_path: Path,
) -> None:
    """A rule USBGuard refuses refuses the whole policy where it is loaded. Should one reach the enforcer
    anyway (a policy built without validation, as a newer protocol's might be), every new device is
    blocked and the enforcer says degraded, naming the rule."""
    with pytest.raises(ValidationError, match="usb rule 1, column 16: via-port takes a double-quoted string"):
        policy(rules=["allow via-port 1-1"])
    unvalidated = Policy.model_construct(
        id="p",
        version=1,
        usb=UsbSection.model_construct(rules=["allow via-port 1-1"], keep_present_hid=False),
    )
    usb = FakeUsb(tmp_path)
    usb.add_hub()
    usb.add_device("1-1", 0x046D, 0xC31C, [KEYBOARD], authorized=0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    events: list[Event] = []
    enforcer = UsbEnforcer(events.append, sysfs_root=tmp_path, uevent_socket=lambda: b)
    await enforcer.start(unvalidated, Mode.ENFORCE)
    status = enforcer.status()
    assert status.state is EnforcerState.DEGRADED
    assert "via-port" in (status.reason or "")
    assert usb.authorized("1-1") == "0"
    await enforcer.stop()
    a.close()


async def test_audit_mode_writes_nothing_and_reports(tmp_path: Path) -> None:
    usb = FakeUsb(tmp_path)
    usb.add_hub()
    usb.add_device("1-2", 0x0781, 0x5581, [STORAGE], authorized=1, interface_dirs=True)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    events: list[Event] = []
    enforcer = UsbEnforcer(events.append, sysfs_root=tmp_path, uevent_socket=lambda: b)
    await enforcer.start(policy(), Mode.AUDIT)
    assert enforcer.status().state is EnforcerState.ACTIVE
    assert usb.authorized_default() == "1"
    assert usb.authorized("1-2") == "1"
    detected = [e for e in events if e.kind == "usb.detected"]
    assert len(detected) == 1
    assert not detected[0].blocked
    assert detected[0].details["device"] == "1-2"
    await enforcer.stop()
    assert enforcer.status().state is EnforcerState.OFF
    a.close()


async def test_policy_update_rejudges_present_devices_and_reports_changes_only(tmp_path: Path) -> None:
    usb = FakeUsb(tmp_path)
    usb.add_hub()
    usb.add_device("1-2", 0x0781, 0x5581, [STORAGE], serial="S1", authorized=0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    events: list[Event] = []
    enforcer = UsbEnforcer(events.append, sysfs_root=tmp_path, uevent_socket=lambda: b)
    await enforcer.start(policy(), Mode.ENFORCE)
    assert [e.kind for e in events if e.kind.startswith("usb.")] == ["usb.blocked"]
    await enforcer.apply(policy(), Mode.ENFORCE)
    assert [e.kind for e in events if e.kind.startswith("usb.")] == ["usb.blocked"]
    await enforcer.apply(policy(rules=['allow serial "S1"']), Mode.ENFORCE)
    assert [e.kind for e in events if e.kind.startswith("usb.")] == ["usb.blocked", "usb.allowed"]
    assert usb.authorized("1-2") == "1"
    await enforcer.stop()
    a.close()


async def test_malformed_uevents_are_counted_not_fatal(tmp_path: Path) -> None:
    usb = FakeUsb(tmp_path)
    usb.add_hub()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    enforcer = UsbEnforcer(lambda e: None, sysfs_root=tmp_path, uevent_socket=lambda: b)
    await enforcer.start(policy(), Mode.ENFORCE)
    enforcer.handle_uevent(b"nonsense")
    enforcer.handle_uevent(b"libudev\0xx")
    assert enforcer.rejected_uevents == 2
    assert enforcer.status().state is EnforcerState.ACTIVE
    await enforcer.stop()
    a.close()
