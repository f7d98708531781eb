"""Removable media for real, as root: tmpfs mounts made under a watched temp folder stand in for a USB
stick's mount (no USB bus here); the mount table, its POLLPRI notification and umount2 are real."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanroom_agent.enforcers.media import MediaEnforcer
from cleanroom_protocol import EnforcerState, Event, Mode, Policy
from tests.support.wait import wait_until

pytestmark = pytest.mark.root


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("media enforcement tests need root (mount/umount)")
    folder = tmp_path / "media"
    folder.mkdir()
    yield folder
    for stick in folder.iterdir():
        subprocess.run(["umount", "-l", str(stick)], capture_output=True, check=False)


def mount_stick(path: Path) -> None:
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stick", str(path)], check=True, timeout=10)


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def policy(watch: Path, unmount: bool = True) -> Policy:
    return Policy.model_validate(
        {"id": "p", "version": 1, "media": {"watch": [str(watch)], "unmount": unmount}}
    )


def kinds(events: list[Event], path: Path) -> list[str]:
    return [e.kind for e in events if e.details.get("mountpoint") == str(path)]


async def test_new_mount_reported_and_unmounted(watch: Path) -> None:
    events: list[Event] = []
    enforcer = MediaEnforcer(events.append)
    await enforcer.start(policy(watch), Mode.ENFORCE)
    try:
        assert enforcer.status().state is EnforcerState.ACTIVE
        stick = watch / "STICK"
        mount_stick(stick)
        await wait_until(
            lambda: kinds(events, stick) == ["media.mounted", "media.unmounted"], "mounted+unmounted"
        )
        assert not is_mounted(stick)
        unmounted = next(e for e in events if e.kind == "media.unmounted")
        assert (unmounted.blocked, unmounted.details["by"], unmounted.details["fstype"]) == (
            True,
            "agent",
            "tmpfs",
        )
        other = watch.parent / "elsewhere"
        mount_stick(other)
        try:
            mount_stick(watch / "SECOND")
            await wait_until(
                lambda: kinds(events, watch / "SECOND") == ["media.mounted", "media.unmounted"], "2nd"
            )
            assert kinds(events, other) == []
            assert is_mounted(other)
        finally:
            subprocess.run(["umount", str(other)], check=True)
    finally:
        await enforcer.stop()


async def test_audit_mode_and_unmount_false_only_report(watch: Path) -> None:
    events: list[Event] = []
    enforcer = MediaEnforcer(events.append)
    await enforcer.start(policy(watch), Mode.AUDIT)
    try:
        stick = watch / "AUDIT"
        mount_stick(stick)
        await wait_until(lambda: kinds(events, stick) == ["media.mounted"], "media.mounted")
        assert is_mounted(stick)
        await enforcer.apply(policy(watch, unmount=False), Mode.ENFORCE)
        subprocess.run(["umount", str(stick)], check=True)
        await wait_until(lambda: kinds(events, stick)[-1:] == ["media.unmounted"], "external unmount seen")
        assert next(e for e in events if e.kind == "media.unmounted").details["by"] == "other"
    finally:
        await enforcer.stop()


async def test_mount_present_at_start_is_judged(watch: Path) -> None:
    stick = watch / "EARLY"
    mount_stick(stick)
    events: list[Event] = []
    enforcer = MediaEnforcer(events.append)
    await enforcer.start(policy(watch), Mode.ENFORCE)
    try:
        await wait_until(
            lambda: kinds(events, stick) == ["media.mounted", "media.unmounted"], "present mount"
        )
        assert not is_mounted(stick)
        assert next(e for e in events if e.kind == "media.mounted").details["source"] == "present"
    finally:
        await enforcer.stop()
