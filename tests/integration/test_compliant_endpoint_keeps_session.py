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
    session = world.spawn_client()
    agent = world.add_agent("it-agent")

    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    world.wait_session(
        session.session_id, timeout=15, what="the fake-vdi session listed running", state="running"
    )

    # Wait on the controller having accepted N more heartbeat postures (its own record of verified
    # messages), not on time; the session must stay intact and the endpoint compliant throughout.
    def accepted_postures() -> int:
        rows = ctl.db_rows("SELECT seq FROM messages WHERE agent = ? AND kind = 'posture'", ("it-agent",))
        return len(rows)

    first_seen = ctl.agent("it-agent")
    assert first_seen is not None
    start = accepted_postures()

    def heartbeats_seen() -> bool:
        assert session.live_pids() == session.tree_pids(), (
            f"session tree lost pids: alive {session.live_pids()}"
        )
        assert ctl.db_gate("endpoints", "agent", "it-agent", {"compliant": True}), (
            "it-agent became non-compliant"
        )
        return accepted_postures() >= start + HEARTBEATS

    wait_for(
        heartbeats_seen, timeout=30, what=f"the controller to accept {HEARTBEATS} more postures from it-agent"
    )

    postures = tap.on("/agents/it-agent/posture")
    assert len(postures) >= HEARTBEATS, f"only {len(postures)} postures on the wire"
    commands = tap.on("/agents/it-agent/commands")
    assert commands == [], f"the controller sent commands to a compliant endpoint: {commands}"
    row = world.wait_agent(
        "it-agent", timeout=5, what="it-agent still compliant", online=True, compliant=True
    )
    assert row["reasons"] == [], f"compliant endpoint with reasons: {row}"
    assert row["last_seen"] > first_seen["last_seen"], f"last_seen did not advance: {first_seen} → {row}"
    listed = ctl.session(session.session_id)
    assert listed is not None and listed["state"] == "running", f"session not running: {listed}"
    assert session.live_pids() == session.tree_pids(), "the compliant session's process tree was touched"
    agent.assert_alive()
    ctl.assert_alive()
