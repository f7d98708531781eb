"""An agent started without a local policy file receives the controller's signed, retained policy at once,
while its enforcers start. Whatever the interleaving, the capture enforcer must end up enforcing that
policy's own deny list, and posture must name that policy's hash only once it does. Real agent processes
(capture enforcer on: a real fanotify listener, as root), a real Mosquitto, real execs."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cleanroom_protocol import POLICY_TOPIC, Channel, Kind, Policy, policy_hash
from tests.agent.conftest import CLIENT, Controller, Tap
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.integration]


def capture_policy_reported(tap: Tap, agent: Any, skip: int) -> str | None:
    """The policy hash the capture enforcer reports in the newest posture of this agent process."""
    for message in reversed(tap.on(Channel.POSTURE)[skip:]):
        verdict = agent.verify(message.payload, expected_kind=Kind.POSTURE)
        if not verdict.ok:
            continue  # another agent process (an earlier round) under the same id
        for enforcer in verdict.envelope.body["enforcers"]:
            if enforcer["name"] == "capture" and enforcer["state"] == "active":
                return str(enforcer.get("policy"))
        return None
    return None


def test_a_signed_policy_delivered_at_start_is_enforced_every_time(
    mosquitto: Mosquitto, tap: Tap, agent_factory: Any, controller: Controller, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root: the capture enforcer's fanotify listener")
    target = tmp_path / f"deny-{secrets.token_hex(3)}"  # denied by the signed policy only
    shutil.copy2("/bin/true", target)
    signed = Policy.model_validate(
        {
            "id": "at-start",
            "version": 7,
            "sessions": {"clients": [CLIENT]},
            "capture": {"deny": [target.name]},
        }
    )
    tap.publish(POLICY_TOPIC, controller.policy(signed), retain=True)
    try:
        for round_ in range(8):
            agent = agent_factory(mosquitto.url, policy=None, extra=["--enforcers", "capture"])
            skip = len(tap.on(Channel.POSTURE))
            agent.start()
            wait_for(
                lambda agent=agent, skip=skip: (
                    capture_policy_reported(tap, agent, skip) == policy_hash(signed)
                ),
                timeout=20,
                what=f"round {round_}: capture active with the signed policy's hash",
            )
            with pytest.raises(PermissionError):  # execve refused (EPERM) by the fanotify listener
                subprocess.run([str(target)], timeout=10, check=False)
            assert agent.stop() == 0
    finally:
        tap.publish(POLICY_TOPIC, b"", retain=True)  # clear the retained policy for the tests after
