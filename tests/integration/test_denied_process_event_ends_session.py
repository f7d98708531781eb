"""Process events drive posture: with the agent's poll set to 30 s, only the proc-connector exec and exit
events can make these deadlines.

Real Mosquitto, controller and agent (enforce mode, enforcers off) processes; the VDI client and the
denied program are renamed copies of /bin/sleep (see tests/support/procs.py). The agent's safety-net
process rescan runs at max(10 s, poll) = 30 s, and its startup observes are over before the client starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

POLL_S = 30
EVENT_DEADLINE_S = 5.0  # generous for a loaded 2-core machine; the poll alone would need up to 30 s


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def test_exec_and_exit_events_start_end_and_judge_sessions_without_the_poll(world: Cleanroom) -> None:
    world.write_policy(heartbeat_s=1, end_grace_s=1.0)
    world.start_controller()
    world.add_agent("it-agent", extra=["--poll-interval", str(POLL_S)])
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )

    # exec of a client name → a session, seen at once.
    session = world.spawn_client()
    world.wait_session(
        session.session_id,
        timeout=EVENT_DEADLINE_S,
        what="the new session listed (exec event)",
        state="running",
    )

    # exec of a denied name → posture → violation → end_session → the tree is gone.
    started = time.monotonic()
    denied = world.spawn_denied()
    wait_for(
        lambda: not session.live_pids(),
        timeout=EVENT_DEADLINE_S,
        what=f"the session's tree {session.tree_pids()} ended after the denied exec",
        interval=0.01,
    )
    took = time.monotonic() - started
    row = world.wait_agent("it-agent", timeout=EVENT_DEADLINE_S, what="judged non-compliant", compliant=False)
    assert f"denied_process:{world.denied_name}" in row["reasons"], row

    # exit of the denied process → compliant again.
    denied.cleanup()
    world.wait_agent(
        "it-agent",
        timeout=EVENT_DEADLINE_S,
        what="compliant after the denied exit (exit event)",
        compliant=True,
    )

    # exit of a session's client (the user closed it) → the session recorded ended.
    second = world.spawn_client()
    world.wait_session(second.session_id, timeout=EVENT_DEADLINE_S, what="second session", state="running")
    second.end()
    world.wait_session(
        second.session_id, timeout=EVENT_DEADLINE_S, what="second session ended (exit event)", state="ended"
    )
    print(f"denied exec -> session tree gone: {took * 1000:.0f} ms")
