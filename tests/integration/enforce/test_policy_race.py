"""A policy that arrives while the capture enforcer starts must be the one enforced (issue 6's first
finding): real fanotify listener processes as root, real execs of a program that only the new policy
denies. The apply is issued at delays spread over the listener's start (0-140 ms), where the old code
updated its rules but had no listener yet to send them to."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from pathlib import Path

import pytest

from cleanroom_protocol import EnforcerState, Mode, policy_hash

from .test_capture import Capture, policy, sh

pytestmark = [pytest.mark.root, pytest.mark.x11]


async def test_a_policy_applied_while_the_listener_starts_is_the_one_enforced(
    xvfb: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify permission events)")
    target = tmp_path / f"cap-{secrets.token_hex(3)}"  # on the new policy's deny list only
    shutil.copy2("/bin/true", target)
    bootstrap = policy()  # the shipped defaults, as an agent without a local policy file starts with
    new = policy(deny=[target.name])
    failures = []
    for attempt in range(15):
        c = Capture(xvfb)
        starting = asyncio.create_task(c.enforcer.start(bootstrap, Mode.ENFORCE))
        try:
            await asyncio.sleep(attempt * 0.01)
            await c.enforcer.apply(new, Mode.ENFORCE)
            await starting
            status = c.enforcer.status()
            ran = await sh(str(target))
            if (
                ran.returncode == 0
                or status.policy != policy_hash(new)
                or status.state is not EnforcerState.ACTIVE
            ):
                failures.append((attempt, ran.returncode, status))
        finally:
            if not starting.done():
                await starting
            await c.enforcer.stop()
    assert not failures, f"new policy's deny list not in force after apply during start: {failures}"
