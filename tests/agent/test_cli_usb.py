"""`cleanroom-agent usb devices` as a site runs it to build its allow-list: a real process, reading a
sysfs tree in a temp dir (this machine has no USB bus; the tree is the only USB simulation allowed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cleanroom_agent.enforcers.sysfs import UsbSysfs
from cleanroom_protocol.usbrules import Target, judge_device, parse_rules
from tests.support.usbtree import GENERATE_POLICY_GOLDEN, STORAGE, reference_tree


def usb_devices(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cleanroom_agent", "usb", "devices", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_rules_are_what_usbguard_generate_policy_writes_and_allow_exactly_those_devices(
    tmp_path: Path,
) -> None:
    usb = reference_tree(tmp_path / "sys")
    done = usb_devices("--rules", "--sysfs-root", str(tmp_path / "sys"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == GENERATE_POLICY_GOLDEN
    # The output, used as a policy, parses and allows every listed device; a new stick does not pass.
    rules = parse_rules(done.stdout.splitlines())
    sysfs = UsbSysfs(tmp_path / "sys")
    for name in sysfs.devices():
        assert judge_device(rules, sysfs.read_device(name)).target is Target.ALLOW, name
    usb.add_device("1-4", 0x0781, 0x5581, [STORAGE], product="Cruzer Blade", serial="4C530009999")
    assert judge_device(rules, sysfs.read_device("1-4")).target is Target.BLOCK


def test_options_ports_and_hashes(tmp_path: Path) -> None:
    reference_tree(tmp_path)
    done = usb_devices("--rules", "--with-ports", "--no-hashes", "--sysfs-root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all('via-port "' in line and "hash" not in line for line in lines)
    assert lines[3] == (
        'allow id 0781:5581 serial "4C530001234" name "Cruzer Blade" via-port "1-2" with-interface 08:06:50 '
        'with-connect-type "hardwired"'
    )


def test_listing_shows_each_device_state_and_port(tmp_path: Path) -> None:
    reference_tree(tmp_path)
    done = usb_devices("--sysfs-root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    states = {line.split(":", 1)[0]: line.split(" ", 2)[1] for line in done.stdout.splitlines()}
    assert states == {
        "usb1": "allow",
        "usb2": "allow",
        "1-1": "allow",
        "1-2": "block",
        "1-3": "allow",
        "2-1": "block",
        "1-3.1": "block",
        "1-3.2": "block",
    }
    assert 'via-port "1-2"' in done.stdout.splitlines()[3]


def test_unreadable_device_is_named_and_the_exit_status_says_so(tmp_path: Path) -> None:
    usb = reference_tree(tmp_path)
    (usb.devices / "1-2" / "descriptors").write_bytes(b"\x12\x01")
    done = usb_devices("--rules", "--sysfs-root", str(tmp_path))
    assert done.returncode == 70
    assert "skipped 1-2:" in done.stderr and "descriptors" in done.stderr
    assert len(done.stdout.splitlines()) == len(GENERATE_POLICY_GOLDEN) - 1


def test_no_usb_bus_is_a_clear_error(tmp_path: Path) -> None:
    done = usb_devices("--sysfs-root", str(tmp_path))
    assert done.returncode == 70
    assert "no USB bus" in done.stderr and "Traceback" not in done.stderr
