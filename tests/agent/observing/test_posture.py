"""Posture probes: pure parsing on real-format inputs, the real Linux probe on this machine, the fingerprint."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from cleanroom_agent import (
    HostFacts,
    LinuxHostProbe,
    ProcessSnapshot,
    assemble_posture,
    build_mounts,
    detect_display_server,
    find_denied,
    fingerprint,
    parse_os_release,
)
from cleanroom_agent.observing.posture import block_device_base
from cleanroom_protocol import EnforcerState, EnforcerStatus, Mode, SessionInfo

DEBIAN = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
# a comment
"""


def test_os_release() -> None:
    assert parse_os_release(DEBIAN) == "Debian GNU/Linux 12 (bookworm)"
    assert parse_os_release("NAME=Alpine\nVERSION_ID=3.20\n") == "Alpine 3.20"
    assert parse_os_release("garbage") == "unknown"


def test_display_server() -> None:
    assert detect_display_server({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}, []) == "wayland"
    assert detect_display_server({"DISPLAY": ":1"}, []) == "x11"
    assert detect_display_server({}, ["/tmp/.X11-unix/X0"]) == "x11"
    assert detect_display_server({}, []) == "none"


def test_display_server_from_a_real_x_socket(tmp_path: Path) -> None:
    sockdir = tmp_path / ".X11-unix"
    sockdir.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sockdir / "X7"))
        probe = LinuxHostProbe(env={}, x11_socket_glob=str(sockdir / "X*"))
        assert probe.host_facts().display_server == "x11"
    assert (
        LinuxHostProbe(env={}, x11_socket_glob=str(tmp_path / "none" / "X*")).host_facts().display_server
        == "none"
    )


def test_block_device_base() -> None:
    assert block_device_base("/dev/sdb1") == "sdb"
    assert block_device_base("/dev/nvme0n1p2") == "nvme0n1"
    assert block_device_base("/dev/mmcblk0p1") == "mmcblk0"
    assert block_device_base("/dev/vda") == "vda"
    assert block_device_base("tmpfs") is None


def test_mounts_flag_removable_and_writable_and_skip_pseudo_filesystems() -> None:
    mounts = build_mounts(
        [
            ("/dev/vda1", "/", "ext4", "rw,relatime"),
            ("/dev/sdb1", "/media/usb", "vfat", "rw,nosuid"),
            ("/dev/sr0", "/media/cd", "iso9660", "ro"),
            ("proc", "/proc", "proc", "rw"),
            ("tmpfs", "/run", "tmpfs", "rw"),
        ],
        removable_devices={"sdb", "sr0"},
    )
    assert [(m.mountpoint, m.removable, m.writable) for m in mounts] == [
        ("/", False, True),
        ("/media/cd", True, False),
        ("/media/usb", True, True),
    ]


def test_removable_devices_from_a_sysfs_tree(tmp_path: Path) -> None:
    """No USB bus or removable disk on this machine: a /sys/block tree in a temp dir stands in."""
    for name, removable in (("vda", "0"), ("sdb", "1"), ("sr0", "1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "removable").write_text(removable + "\n")
    usb_device = tmp_path / "devices" / "usb1" / "1-1"
    usb_device.mkdir(parents=True)
    (tmp_path / "sdc").mkdir()
    (tmp_path / "sdc" / "removable").write_text("0\n")  # a USB disk that says it is fixed
    os.symlink(usb_device, tmp_path / "sdc" / "device")
    assert LinuxHostProbe(sys_block=tmp_path).removable_devices() == {"sdb", "sr0", "sdc"}


def test_real_probe_on_this_machine() -> None:
    facts = LinuxHostProbe().host_facts()
    assert facts.hostname == socket.gethostname()
    assert facts.kernel == os.uname().release
    assert facts.os != "" and facts.boot_time > 0
    assert any(m.mountpoint == "/" for m in facts.mounts)


def test_denied_processes_by_comm_or_exe_case_insensitive() -> None:
    procs = [
        ProcessSnapshot(1, 0, "init", None, 1.0),
        ProcessSnapshot(7, 1, "scrot", "scrot", 2.0, "bob"),
        ProcessSnapshot(8, 1, "AnyDesk", None, 3.0),
        ProcessSnapshot(9, 1, "python3", "teamviewer", 4.0),
    ]
    denied = find_denied(procs, ["scrot", "anydesk", "teamviewer", "obs"])
    assert [(d.name, d.pid, d.user) for d in denied] == [
        ("anydesk", 8, None),
        ("scrot", 7, "bob"),
        ("teamviewer", 9, None),
    ]


def make_posture(**changes: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "agent_id": "ep",
        "mode": Mode.ENFORCE,
        "policy": None,
        "facts": HostFacts("h", "Debian", "6.1", "x11", 1.0, ["alice"], []),
        "denied": [],
        "sessions": [SessionInfo(id="s-1-1", client="xfreerdp", pid=1, pids=[1], started=1.0)],
        "enforcers": [EnforcerStatus(name="clipboard", state=EnforcerState.ACTIVE)],
        "offline_since": None,
    }
    args.update(changes)
    return assemble_posture(**args)  # type: ignore[arg-type]


def test_fingerprint_ignores_volatile_fields_only() -> None:
    base = fingerprint(make_posture())
    assert fingerprint(make_posture(offline_since=123.0)) == base
    more_pids = [SessionInfo(id="s-1-1", client="xfreerdp", pid=1, pids=[1, 2, 3], started=1.0)]
    assert fingerprint(make_posture(sessions=more_pids)) == base
    assert fingerprint(make_posture(sessions=[])) != base
    assert fingerprint(make_posture(mode=Mode.AUDIT)) != base
    degraded = [EnforcerStatus(name="clipboard", state=EnforcerState.DEGRADED, reason="no display")]
    assert fingerprint(make_posture(enforcers=degraded)) != base
