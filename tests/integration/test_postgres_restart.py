"""PostgreSQL restarted under a steady flow: the controller stays up, loses and doubles nothing, and acts.

Real Mosquitto, a real PostgreSQL of this test's own (tests/support/postgres.py: it is stopped with
``pg_ctl stop -m fast``, as an operator's restart, and started again on the same port and data), a real
`cleanroom-controller run --database postgresql://…` process. What is simulated is the fleet
(tests/support/fleet.py: enrolled identities with real keys publishing signed events over QoS 1, each kept
until a watermark lists it, as the agent's outbox does). Counted on both sides: every event the fleet sent is
stored exactly once (the set of seqs per agent and the row count), and a violation reported after the
restart ends its session (the signed `end_session` on the wire).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanroom_controller.store import Store
from cleanroom_protocol import Channel, Kind, load_policy
from tests.support.fleet import Fleet, start_session, stored_events
from tests.support.mosquitto import Mosquitto
from tests.support.postgres import Postgres
from tests.support.procs import Cleanroom, Controller, SimulatedAgent, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

FLEET = 5
ROUND_S = 0.02  # one event per agent per round: ~250 events/s
DOWN_S = 3.0  # the server stays stopped this long while the fleet keeps sending


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


@pytest.fixture
def server() -> Iterator[Postgres]:
    """Not the session's server: this one is stopped and started."""
    with Postgres() as pg:
        yield pg


def flow(fleet: Fleet, agents: list[SimulatedAgent], seconds: float, counter: list[int]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for agent in agents:
            fleet.send_event(agent, counter[0])
        counter[0] += 1
        time.sleep(ROUND_S)


def test_the_controller_rides_out_a_postgres_restart(
    world: Cleanroom, mosquitto: Mosquitto, server: Postgres
) -> None:
    world.write_policy(heartbeat_s=30, max_offline_s=600)
    policy = load_policy(world.policy_path)
    url = server.create_database("restart")
    ctl = Controller(
        data_dir=world.root / "ctl",
        broker_url=mosquitto.url,
        policy=world.policy_path,
        extra=["--database", url, "--enroll-listen", "off"],
    )
    world.controller_key.write_text(ctl.identity_pem())
    store = Store.open(ctl.data_dir, url)
    agents = [SimulatedAgent(f"dev-{i}") for i in range(FLEET)]
    violator = SimulatedAgent("violator")
    for agent in [*agents, violator]:
        store.add_agent(agent.agent_id, agent.public_pem(), agent.agent_id, time.time())
    ctl.start()
    fleet: Fleet | None = None
    try:
        wait_for(
            lambda: any(e.kind == "controller.started" for e in store.audit_entries()),
            timeout=30,
            what="the controller started",
        )
        session = start_session(
            mosquitto.port, store, violator, policy, client=world.client_name, session_id="s-9", pid=9999
        )
        tap = world.tap("cleanroom/v1/agents/violator/commands")

        fleet = Fleet(mosquitto.port, agents, client_id="it-fleet-restart")
        rounds = [0]
        flow(fleet, agents, 1.0, rounds)
        server.stop_server()  # every session ended (FATAL 57P01), the controller's among them
        flow(fleet, agents, DOWN_S, rounds)
        assert not any(tap.on("/commands")), "acted while the database was down"
        server.start_server()
        flow(fleet, agents, 1.0, rounds)

        violation = violator.posture_body(policy, denied=[world.denied_name]).model_copy(
            update={"sessions": [session]}
        )
        fleet.client.publish(violator.topic(Channel.POSTURE), violator.seal(Kind.POSTURE, violation), qos=1)
        command = wait_for(
            lambda: next(iter(tap.on("/commands")), None), timeout=20, what="end_session for the violator"
        )
        assert json.loads(command.payload)["body"]["session_id"] == "s-9"

        deadline = time.monotonic() + 30
        while fleet.unlisted() and time.monotonic() < deadline:
            fleet.resend_unlisted()
            time.sleep(0.2)
        assert not fleet.unlisted(), f"never listed by a watermark: {fleet.unlisted()}"
        ctl.assert_alive()
        log = ctl.log_text()
        assert "database_connection_lost" in log and "database_reconnected" in log
    finally:
        if fleet is not None:
            fleet.close()
        ctl.stop()
        store.close()

    counted = Store.open(ctl.data_dir, url)  # the test's own connection was cut by the restart too
    stored = stored_events(counted)
    rows = counted._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    sent = sum(map(len, fleet.sent.values()))
    print(f"postgres restart: {sent} events sent ({rounds[0]} rounds), {rows} stored, {fleet.resent} resent")
    for agent_id, seqs in fleet.sent.items():
        missing = sorted(set(seqs) - set(stored.get(agent_id, [])))
        assert not missing, f"{agent_id}: sent, never stored: {missing}"
    assert rows == sent  # counted on the fleet's side: each event once
    counted.close()
