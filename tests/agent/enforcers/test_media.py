"""Mount table parsing and removable-mount decisions (pure)."""

from __future__ import annotations

from cleanroom_agent.enforcers.media import (
    Mount,
    is_removable_mount,
    new_removable,
    parse_mountinfo,
    watched_dirs,
)
from cleanroom_protocol import Policy

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
90 27 8:17 / /media/alice/MY\\040STICK rw,nosuid,nodev shared:50 - vfat /dev/sdb1 rw,fmask=0022
91 27 8:33 / /run/media/bob/DATA ro,nosuid - exfat /dev/sdc1 ro
garbage line without separator
"""


def test_parse_mountinfo_real_lines_and_escapes() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mount_id for m in mounts] == [22, 36, 90, 91]
    stick = mounts[2]
    assert (stick.mountpoint, stick.fstype, stick.source, stick.read_only) == (
        "/media/alice/MY STICK",
        "vfat",
        "/dev/sdb1",
        False,
    )
    assert mounts[3].read_only


def test_removable_is_strictly_below_a_watched_folder() -> None:
    policy = Policy.model_validate({"id": "p", "version": 1, "media": {"watch": ["/mnt/usb/"]}})
    dirs = watched_dirs(policy)
    assert dirs == ["/media", "/mnt/usb", "/run/media"]
    assert is_removable_mount("/media/alice/X", dirs)
    assert is_removable_mount("/mnt/usb/stick", dirs)
    assert not is_removable_mount("/media", dirs)
    assert not is_removable_mount("/mediafoo/x", dirs)


def test_new_removable_compares_mount_ids() -> None:
    before = {m.mount_id: m for m in parse_mountinfo(MOUNTINFO)[:2]}
    after = [*parse_mountinfo(MOUNTINFO), Mount(99, "/home/x", "ext4", "/dev/sda3", False)]
    assert [m.mount_id for m in new_removable(before, after, ["/media", "/run/media"])] == [90, 91]
