"""One enrolled device floods junk; another device's violation is still decided at once.

Real Mosquitto, the real `cleanroom-controller run` process. ``noisy-dev`` (enrolled) pushes junk on its
own topic through a C client (``mosquitto_pub -l``) at FLOOD_RATE messages a second for as long as the test
runs: forgeries (well-formed envelopes whose signature does not verify, the dearest junk to refuse), garbage
and envelopes claiming to be ``quiet-dev``. While it floods, ``quiet-dev`` reports one violation after
another, each with a new running session; each must get its signed ``end_session`` within a deadline.
Afterwards every junk message is counted (rejected by reason, or dropped unread as ``overflow``: together
exactly what was sent), quiet-dev has no reject, and the audit trail holds a handful of ``verdict.summary``
rows for the flood, not one per message. 100,000 junk messages at full speed and the p99 are in
``bench/ingest.py``.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from cleanroom_protocol import Channel, Event, Kind, SessionInfo, load_policy
from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, SimulatedAgent, audit_entries, cleanroom, publish
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

FLOOD_RATE = 10_000  # junk messages a second: the controller before the fair inbox fell behind at this rate
VIOLATIONS = 6
# Generous for a loaded 2-core CI machine: with both cores kept busy by other processes one decision took
# over 3 s here (starved of CPU, the controller reads its socket slower than the flood arrives, and what it
# has not read no inbox can put first). Before the fair inbox the wait grew with the flood's backlog without
# bound. The bench measures the p99 (37 ms paced at this rate, unloaded).
DECISION_DEADLINE_S = 5.0


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def enrol(world: Cleanroom, agent: SimulatedAgent) -> None:
    assert world.controller is not None
    pub = world.root / f"{agent.agent_id}.pub"
    pub.write_text(agent.public_pem())
    world.controller.enrol(agent.agent_id, pub)


def junk(noisy: SimulatedAgent, quiet: SimulatedAgent) -> list[bytes]:
    """One cycle of junk lines: 60% forgeries, 20% garbage, 20% claiming to be quiet-dev (no newlines)."""
    forger = SimulatedAgent(noisy.agent_id, key=Ed25519PrivateKey.generate())
    forger.seq = 1000
    impostor = SimulatedAgent(quiet.agent_id, key=Ed25519PrivateKey.generate())
    event = Event(kind="clipboard.blocked", at=time.time())
    lines = []
    for i in range(500):
        kind = i % 5
        if kind < 3:
            lines.append(forger.seal(Kind.EVENT, event))
        elif kind == 3:
            lines.append(b'{"v":1,"kind":"event","sender":"' + str(i).encode() + b'", garbage')
        else:
            lines.append(impostor.seal(Kind.EVENT, event))
    assert not any(b"\n" in line for line in lines)
    return lines


class Flood:
    """``mosquitto_pub -l`` as noisy-dev's client, fed ``rate`` lines a second from a thread until stopped."""

    def __init__(self, port: int, topic: str, lines: list[bytes], rate: int) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto_pub", "-p", str(port), "-q", "1", "-i", "it-noisy-dev", "-l", "-t", topic],
            stdin=subprocess.PIPE,
        )
        self.sent = 0
        self._lines = lines
        self._rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        assert self.proc.stdin is not None
        chunk = b"".join(line + b"\n" for line in self._lines)
        started = time.monotonic()
        while not self._stop.is_set():
            due = started + (self.sent + len(self._lines)) / self._rate
            self._stop.wait(max(0.0, due - time.monotonic()))
            if self._stop.is_set():
                break
            self.proc.stdin.write(chunk)
            self.proc.stdin.flush()
            self.sent += len(self._lines)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)
        return self.sent


class Sender:
    """quiet-dev's connection: a paho client on its own thread, publishing QoS 1."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="it-quiet-dev")
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_junk_flood_from_one_device_does_not_delay_another_devices_decision(
    world: Cleanroom, mosquitto: Mosquitto
) -> None:
    world.write_policy(heartbeat_s=30, max_offline_s=600)
    policy = load_policy(world.policy_path)
    ctl = world.start_controller()
    noisy, quiet = SimulatedAgent("noisy-dev"), SimulatedAgent("quiet-dev")
    enrol(world, noisy)
    enrol(world, quiet)
    publish(mosquitto.port, [quiet.online(), quiet.posture(policy)])
    world.wait_agent("quiet-dev", timeout=20, what="quiet-dev online and compliant", compliant=True)
    tap = world.tap(f"cleanroom/v1/agents/{quiet.agent_id}/commands")

    flood = Flood(mosquitto.port, noisy.topic(Channel.EVENTS), junk(noisy, quiet), FLOOD_RATE)
    sender = Sender(mosquitto.port)
    latencies: list[float] = []
    try:
        # Wait until the controller is in the thick of it, then report violations one after another.
        wait_for(
            lambda: rejects_of(world, "noisy-dev") >= 2_000,
            timeout=20,
            what="the controller counting noisy-dev's junk",
        )
        for i in range(VIOLATIONS):
            session_id = f"s-{9000 + i}"
            running = SessionInfo(
                id=session_id, client=world.client_name, pid=9000 + i, pids=[9000 + i], started=time.time()
            )
            body = quiet.posture_body(policy, denied=[world.denied_name]).model_copy(
                update={"sessions": [running]}
            )
            sent = time.monotonic()
            sender.send(quiet.topic(Channel.POSTURE), quiet.seal(Kind.POSTURE, body))
            command = wait_for(
                lambda sid=session_id: next(
                    (
                        m
                        for m in tap.on("/commands")
                        if json.loads(m.payload)["body"].get("session_id") == sid
                    ),
                    None,
                ),
                timeout=DECISION_DEADLINE_S,
                what=f"end_session for {session_id} while noisy-dev floods",
                interval=0.005,
            )
            latencies.append(command.at - sent)
        flooding = flood.proc.poll() is None
    finally:
        sender.close()
        total = flood.stop()
    print(
        f"decision latencies while {total} junk messages flooded: {[round(1000 * x) for x in latencies]} ms"
    )
    assert flooding, f"the flooding client died early (exit {flood.proc.returncode})"

    # Every junk message is counted, by reason, under the device whose topic it came on.
    wait_for(
        lambda: rejects_of(world, "noisy-dev") == total,
        timeout=60,
        what=f"all {total} junk messages counted",
        interval=0.2,
    )
    row = world.wait_agent("noisy-dev", timeout=10, what="noisy-dev listed")
    assert sum(row["rejects"].values()) == total, row["rejects"]
    assert set(row["rejects"]) <= {"bad_signature", "malformed", "overflow"}, row["rejects"]
    assert world.wait_agent("quiet-dev", timeout=10, what="quiet-dev listed")["rejects"] == {}
    ctl.assert_alive()
    assert ctl.stop() == 0
    summaries = [
        json.loads(e["data_json"])
        for e in audit_entries(ctl.db_path)
        if e["kind"] == "verdict.summary" and e["subject"] == "noisy-dev"
    ]
    assert sum(s["total"] for s in summaries) == total
    assert 1 <= len(summaries) <= 6, [s["counts"] for s in summaries]  # one per 10 s window
    verify = ctl.audit_verify()
    assert verify.returncode == 0, verify.stdout + verify.stderr


def rejects_of(world: Cleanroom, sender: str) -> int:
    assert world.controller is not None
    rows: list[dict[str, Any]] = world.controller.db_rows(
        "SELECT COALESCE(SUM(count), 0) AS n FROM rejects WHERE sender = ?", (sender,)
    )
    return int(rows[0]["n"])
