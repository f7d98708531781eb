"""Two controllers on one PostgreSQL and one `$share` group; one is killed with -9 in the middle of a flood.

Real Mosquitto, a real PostgreSQL (tests/support/postgres.py), two real `cleanroom-controller run`
processes with the same controller key and id (one controller identity, as N hosts would share it), each its
own data dir and client connection, `--database` the same PostgreSQL and `--share-group` the same group.

What is simulated is the fleet (a real agent cannot produce thousands of events in a second here): FLEET
enrolled identities with real Ed25519 keys publish signed events over QoS 1 from one paho client, and keep
each event as the agent's outbox does (docs/data-path.md) until a watermark from the controllers lists it,
resending what is still unlisted a while after it was sent. Counted on both sides: every event the fleet
sent is stored exactly once in PostgreSQL (the set of seqs and the row count per agent), whichever
controller stored it. A violation reported during the fail-over is acted on (the signed `end_session` on the
wire) within 1 s of the survivor receiving it (its `messages.received` time for that posture).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanroom_controller.store import Store
from cleanroom_protocol import Channel, Kind, load_policy
from tests.support.fleet import Fleet, start_session, stored_events
from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, Controller, SimulatedAgent, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

FLEET = 10
EVENTS_EACH = 300  # 3,000 events: about a second or two of work for two controllers on two shared cores
KILL_AFTER = 800  # stored events when the first controller is killed
ACT_WITHIN_S = 1.0


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def test_a_controller_killed_mid_flood_loses_nothing_and_the_other_acts_in_time(
    world: Cleanroom, mosquitto: Mosquitto, postgres_url: str
) -> None:
    world.write_policy(heartbeat_s=30, max_offline_s=600)
    policy = load_policy(world.policy_path)
    # One controller identity on two hosts: the same key in both data dirs.
    first_dir, second_dir = world.root / "ctl-1", world.root / "ctl-2"
    shared = ["--database", postgres_url, "--share-group", "ingest", "--enroll-listen", "off"]
    first = Controller(data_dir=first_dir, broker_url=mosquitto.url, policy=world.policy_path, extra=shared)
    world.controller_key.write_text(first.identity_pem())
    second_dir.mkdir(mode=0o700)
    shutil.copy2(first_dir / "controller.key", second_dir / "controller.key")
    second = Controller(data_dir=second_dir, broker_url=mosquitto.url, policy=world.policy_path, extra=shared)

    store = Store.open(first_dir, postgres_url)
    fleet_agents = [SimulatedAgent(f"dev-{i:02d}") for i in range(FLEET)]
    violator = SimulatedAgent("violator")
    for agent in [*fleet_agents, violator]:
        store.add_agent(agent.agent_id, agent.public_pem(), agent.agent_id, time.time())
    first.start()
    second.start()
    fleet: Fleet | None = None
    try:
        wait_for(
            lambda: (
                "controller.started" in [e.kind for e in store.audit_entries()][-40:]
                and sum(e.kind == "controller.started" for e in store.audit_entries()) >= 2
            ),
            timeout=30,
            what="both controllers started",
        )
        session = start_session(
            mosquitto.port, store, violator, policy, client=world.client_name, session_id="s-77", pid=7777
        )
        tap = world.tap("cleanroom/v1/agents/violator/commands")

        fleet = Fleet(mosquitto.port, fleet_agents)
        for n in range(EVENTS_EACH):
            for agent in fleet_agents:
                fleet.send_event(agent, n)
            if n == EVENTS_EACH // 2:
                wait_for(
                    lambda: sum(map(len, stored_events(store).values())) >= KILL_AFTER,
                    timeout=30,
                    what=f"{KILL_AFTER} events stored before the kill",
                )
                first.kill()  # SIGKILL in the middle of the flood
                violation = violator.posture_body(policy, denied=[world.denied_name]).model_copy(
                    update={"sessions": [session]}
                )
                violation_seq = violator.seq + 1
                fleet.client.publish(
                    violator.topic(Channel.POSTURE), violator.seal(Kind.POSTURE, violation), qos=1
                )

        command = wait_for(
            lambda: next(iter(tap.on("/commands")), None), timeout=20, what="end_session for the violator"
        )
        received = wait_for(
            lambda: store._db.execute(
                "SELECT received FROM messages WHERE agent = ? AND seq = ?", ("violator", violation_seq)
            ).fetchone(),
            timeout=10,
            what="the violation stored",
        )[0]
        # Tapped.at is monotonic; the store's received is wall-clock: convert the tap's time.
        acted_after = (command.at + (time.time() - time.monotonic())) - float(received)
        assert json.loads(command.payload)["body"]["session_id"] == "s-77"

        deadline = time.monotonic() + 30
        while fleet.unlisted() and time.monotonic() < deadline:
            fleet.resend_unlisted()
            time.sleep(0.2)
        assert not fleet.unlisted(), f"never listed by a watermark: {fleet.unlisted()}"
        second.assert_alive()
    finally:
        if fleet is not None:
            fleet.close()
        for ctl in (first, second):
            ctl.stop()

    stored = stored_events(store)
    rows = store._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    print(
        f"fail-over: {sum(map(len, fleet.sent.values()))} events sent, {rows} stored, {fleet.resent} resent "
        f"after watermarks; violation acted on {1000 * acted_after:.0f} ms after the survivor received it"
    )
    for agent_id, sent in fleet.sent.items():
        missing = sorted(set(sent) - set(stored.get(agent_id, [])))
        assert not missing, (
            f"{agent_id}: sent, never stored: {missing}; rejects {store.reject_counts().get(agent_id)}"
        )
    assert rows == FLEET * EVENTS_EACH  # counted on the fleet's side: each event once
    assert acted_after <= ACT_WITHIN_S, f"acted on {acted_after:.3f} s after receipt"
    store.close()
