"""Execs are judged on every local filesystem, not only the root mount: a renamed capture tool copied to
/dev/shm (a tmpfs), or to a tmpfs mounted after the listener started, is refused like one in /usr/bin.
Real fanotify listener as root, real mounts (a tmpfs under the test's temp dir, unmounted after)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cleanroom_protocol import EnforcerState, Mode

from .test_capture import Capture, policy, sh

pytestmark = [pytest.mark.root, pytest.mark.x11]


@pytest.fixture
async def guard(xvfb: str) -> AsyncIterator[Capture]:
    c = Capture(xvfb)
    yield c
    await c.enforcer.stop()


def refused(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode == 126 and "not permitted" in done.stderr


async def test_a_renamed_tool_on_dev_shm_is_refused(guard: Capture) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify permission events)")
    await guard.enforcer.start(policy(), Mode.ENFORCE)
    assert guard.enforcer.status().state is EnforcerState.ACTIVE, guard.enforcer.status()
    copy = Path("/dev/shm") / f"notes-{secrets.token_hex(3)}"
    shutil.copy2("/usr/bin/scrot", copy)
    try:
        done = await sh(f"{copy} --version")
        assert refused(done), f"a renamed scrot on /dev/shm ran: rc {done.returncode} {done.stderr!r}"
    finally:
        copy.unlink()


async def test_a_tmpfs_mounted_later_is_marked_and_judged(guard: Capture, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify permission events, mount)")
    await guard.enforcer.start(policy(), Mode.ENFORCE)
    before = (await guard.enforcer.listener_stats())["exec_filesystems"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "cleanroom-test", str(mnt)], check=True)
    try:
        deadline = time.monotonic() + 5
        while (await guard.enforcer.listener_stats())["exec_filesystems"] <= before:
            assert time.monotonic() < deadline, "the new tmpfs was not marked within 5 s of its mount"
            await asyncio.sleep(0.02)
        copy = mnt / "holiday"
        shutil.copy2("/usr/bin/scrot", copy)
        done = await sh(f"{copy} --version")
        assert refused(done), f"a renamed scrot on a new tmpfs ran: rc {done.returncode} {done.stderr!r}"
        allowed = mnt / "echo"
        shutil.copy2("/bin/echo", allowed)
        done = await sh(f"{allowed} still-works")
        assert done.returncode == 0 and done.stdout.strip() == "still-works", done
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
