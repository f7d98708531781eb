"""An agent that dies or hangs is noticed and acted on.

SIGKILL: the broker delivers the agent's signed Last Will at once, the controller records the endpoint
offline, decides to end its running session and keeps retrying the signed ``end_session`` until the agent
is back (the killed agent cannot act); the restarted agent receives it and ends the session.

SIGSTOP: the socket stays open, so no Will comes for ~1.5 × keepalive; with a 1 s heartbeat and a 60 s
keepalive the controller's silence rule (no report for 3 × heartbeat) fires first. After SIGCONT the agent
gets the queued ``end_session`` and ends the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, audit_entries, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def _decisions_for(world: Cleanroom, agent_id: str, condition: str) -> list[dict[str, object]]:
    assert world.controller is not None
    return [
        e
        for e in audit_entries(world.controller.db_path)
        if e["kind"] == "decision" and e["subject"] == agent_id and condition in e["data_json"]
    ]


def test_killed_agent_is_recorded_offline_by_its_last_will_and_its_session_ended(world: Cleanroom) -> None:
    world.write_policy(heartbeat_s=1, max_offline_s=60)
    ctl = world.start_controller("--command-timeout", "60")
    session = world.spawn_client()
    agent = world.add_agent("it-agent", keepalive=30)
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    world.wait_session(session.session_id, timeout=15, what="the session listed running", state="running")

    agent.kill()
    # keepalive is 30 s: only the Last Will can make it offline this quickly.
    world.wait_agent("it-agent", timeout=8, what="it-agent offline through its Last Will", online=False)
    wait_for(
        lambda: _decisions_for(world, "it-agent", "offline"),
        timeout=10,
        what="an 'offline' decision for it-agent in the audit trail",
    )
    # The agent is dead: the session still runs, the controller has asked for it to end.
    assert session.live_pids() == session.tree_pids(), "session ended while no agent was running?"
    world.wait_session(session.session_id, timeout=10, what="the session marked ending", state="ending")

    agent.start()
    wait_for(
        lambda: not session.live_pids(), timeout=45, what="the restarted agent to end the session's tree"
    )
    world.wait_session(session.session_id, timeout=20, what="the session recorded ended", state="ended")
    ctl.assert_alive()
    verify = ctl.audit_verify()
    assert verify.returncode == 0, (
        f"audit verify failed on an untouched trail:\n{verify.stdout}{verify.stderr}"
    )


def test_frozen_agent_is_found_silent_and_its_session_ended_after_it_thaws(world: Cleanroom) -> None:
    world.write_policy(heartbeat_s=1, max_offline_s=120)
    ctl = world.start_controller("--command-timeout", "60")
    session = world.spawn_client()
    agent = world.add_agent("it-agent", keepalive=60)
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    world.wait_session(session.session_id, timeout=15, what="the session listed running", state="running")

    agent.freeze()
    try:
        wait_for(
            lambda: _decisions_for(world, "it-agent", "silent"),
            timeout=15,
            what="a 'silent' decision for it-agent (no report for 3 × 1 s heartbeat)",
        )
        row = ctl.agent("it-agent")
        # `compliant` is the last posture's judgement; the endpoint's condition is what silence changes.
        assert row is not None and row.get("condition") == "silent", (
            f"agents list does not show silent: {row}"
        )
        assert session.live_pids() == session.tree_pids(), "the session ended while the agent was frozen?"
    finally:
        agent.thaw()

    wait_for(lambda: not session.live_pids(), timeout=30, what="the thawed agent to end the session's tree")
    world.wait_session(session.session_id, timeout=20, what="the session recorded ended", state="ended")
    world.wait_agent(
        "it-agent", timeout=20, what="it-agent back online and compliant", online=True, compliant=True
    )
    ctl.assert_alive()
