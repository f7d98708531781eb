"""A compliant endpoint keeps its VDI session: heartbeats flow, the controller says compliant, nothing is ended.

Real Mosquitto, real `cleanroom-controller run` and `cleanroom-agent run` processes; the VDI client is a
renamed copy of /bin/sleep with a child (see tests/support/procs.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

HEARTBEATS = 4


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def test_compliant_endpoint_keeps_its_session_running_across_heartbeats(world: Cleanroom) -> None:
    world.write_policy(heartbeat_s=1)
    ctl = world.start_controller()
    tap = world.tap()
    session = world.spawn("fake-vdi")
    agent = world.add_agent("it-agent")

    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    world.wait_session(
        session.session_id, timeout=15, what="the fake-vdi session listed running", state="running"
    )

    # Count heartbeats the controller accepted: every accepted message moves last_seen. Wait on that
    # count, not on time.
    seen: set[float] = set()

    def heartbeats_seen() -> bool:
        row = ctl.agent("it-agent")
        assert row is not None, "it-agent vanished from agents list"
        assert row["compliant"] is True, f"it-agent became non-compliant: {row}"
        assert session.live_pids() == session.tree_pids(), (
            f"session tree lost pids: alive {session.live_pids()}"
        )
        if row.get("last_seen") is not None:
            seen.add(float(row["last_seen"]))
        return len(seen) > HEARTBEATS

    wait_for(
        heartbeats_seen, timeout=30, what=f"the controller to accept {HEARTBEATS} more reports from it-agent"
    )

    postures = tap.on("/agents/it-agent/posture")
    assert len(postures) >= HEARTBEATS, f"only {len(postures)} postures on the wire"
    commands = tap.on("/agents/it-agent/commands")
    assert commands == [], f"the controller sent commands to a compliant endpoint: {commands}"
    row = world.wait_agent(
        "it-agent", timeout=5, what="it-agent still compliant", online=True, compliant=True
    )
    assert row["reasons"] == [], f"compliant endpoint with reasons: {row}"
    listed = ctl.session(session.session_id)
    assert listed is not None and listed["state"] == "running", f"session not running: {listed}"
    assert session.live_pids() == session.tree_pids(), "the compliant session's process tree was touched"
    agent.assert_alive()
    ctl.assert_alive()
