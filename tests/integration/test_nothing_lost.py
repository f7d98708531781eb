"""Nothing the broker acknowledged is lost at the controller: killed with -9 several times under load,
stopped with SIGTERM, and while its database refuses writes.

Real Mosquitto (persistent sessions), the real controller process (restarted on the same data dir), a real
agent process producing session events, and a load publisher: a second enrolled device whose signed events
are published as fast as the broker takes them (a paho client; it records every seq the broker
acknowledged). Counted on both sides, by content, not through the store's UNIQUE (agent, seq): the load
publisher's acknowledged seqs and the agent's events seen on the wire against the controller's rows.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from cleanroom_protocol import Channel, Event, Kind, agent_topic, public_key_pem, seal
from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, Controller, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LOAD_ID = "load-1"


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


class LoadPublisher:
    """A device publishing signed events (QoS 1) in a thread until stopped; ``acked``: seqs the broker took."""

    def __init__(self, port: int, key: Ed25519PrivateKey) -> None:
        self.key = key
        self._sent: list[tuple[int, paho.MQTTMessageInfo]] = []
        self._stop = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="it-load-1")
        self.client.max_inflight_messages_set(200)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def acked(self) -> set[int]:
        return {seq for seq, info in list(self._sent) if info.is_published()}

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        topic = agent_topic(LOAD_ID, Channel.EVENTS)
        seq = 0
        while not self._stop.is_set():
            seq += 1
            body = Event(kind="load.tick", at=time.time(), details={"n": seq})
            payload = seal(Kind.EVENT, body, sender=LOAD_ID, seq=seq, key=self.key)
            self._sent.append((seq, self.client.publish(topic, payload, qos=1)))
            if seq % 100 == 0:
                time.sleep(0.05)  # ~1,500/s: load, and a backlog the controller works through after a kill

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        wait_for(
            lambda: all(info.is_published() for _, info in self._sent),
            timeout=15,
            what="every load message acknowledged by the broker",
        )
        self.client.loop_stop()
        self.client.disconnect()


def start_world(world: Cleanroom) -> tuple[Controller, LoadPublisher]:
    world.write_policy(heartbeat_s=1, max_offline_s=300)
    ctl = world.start_controller()
    key = Ed25519PrivateKey.generate()
    pub = world.root / f"{LOAD_ID}.pub"
    pub.write_text(public_key_pem(key))
    ctl.enrol(LOAD_ID, pub)
    world.add_agent("it-agent", keepalive=2)
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    return ctl, LoadPublisher(world.broker.port, key)


def stored_events(ctl: Controller, agent: str) -> list[dict[str, Any]]:
    return ctl.db_rows("SELECT seq, kind, at, details FROM events WHERE agent = ?", (agent,))


def assert_everything_stored_once(world: Cleanroom, ctl: Controller, load: LoadPublisher, tap: Any) -> None:
    def load_stored() -> bool:
        return {int(r["seq"]) for r in stored_events(ctl, LOAD_ID)} >= load.acked

    try:
        wait_for(load_stored, timeout=30, what="every acknowledged load message stored", interval=0.3)
    except AssertionError:
        missing = load.acked - {int(r["seq"]) for r in stored_events(ctl, LOAD_ID)}
        raise AssertionError(
            f"{len(missing)} of {len(load.acked)} lost, e.g. {sorted(missing)[:10]}"
        ) from None
    rows = stored_events(ctl, LOAD_ID)
    by_content = Counter(json.loads(r["details"])["n"] for r in rows)
    assert max(by_content.values()) == 1, f"stored twice: {by_content.most_common(3)}"
    assert {int(r["seq"]) for r in rows} == load.acked, "stored something the publisher never had acked"

    # The real agent: every event it put on the wire is stored once (identity: kind, session, time).
    def identity(body: dict[str, Any]) -> tuple[str, object, float]:
        return (body["kind"], body.get("details", {}).get("session"), round(float(body["at"]), 6))

    sent = {json.loads(m.payload)["seq"]: json.loads(m.payload)["body"] for m in tap.on("/it-agent/events")}
    assert len(sent) >= 4, f"the agent produced too few events to count: {sent}"

    def agent_stored() -> list[dict[str, Any]] | None:
        got = stored_events(ctl, "it-agent")
        return got if set(sent) <= {int(r["seq"]) for r in got} else None

    got = wait_for(agent_stored, timeout=20, what="every event of the agent stored", interval=0.3)
    assert got is not None
    stored = Counter(
        identity({"kind": r["kind"], "at": r["at"], "details": json.loads(r["details"])}) for r in got
    )
    assert max(stored.values()) == 1, f"an agent event stored twice: {stored.most_common(3)}"
    assert {identity(b) for b in sent.values()} <= set(stored)


def on_wire(tap: Any, session_id: str) -> Callable[[], bool]:
    return lambda: any(session_id in m.payload.decode() for m in tap.on("/it-agent/events"))


def produce_sessions(world: Cleanroom, tap: Any, n: int) -> None:
    """``n`` fake VDI sessions, each seen by the agent (its session.started on the wire) and then ended."""
    for _ in range(n):
        fake = world.spawn_client()
        wait_for(on_wire(tap, fake.session_id), timeout=10, what=f"session.started of {fake.session_id}")
        fake.end()


def test_controller_killed_with_sigkill_three_times_under_load_loses_nothing(world: Cleanroom) -> None:
    ctl, load = start_world(world)
    tap = world.tap("cleanroom/v1/agents/it-agent/events")
    load.start()
    for _ in range(3):
        produce_sessions(world, tap, 1)
        wait_for(lambda: len(load.acked) > 0 and ctl.alive, timeout=5, what="load flowing")
        time.sleep(0.7)  # let the controller get well into the flood: the kill must land mid-batch
        ctl.kill()
        produce_sessions(world, tap, 1)  # while it is down: the broker queues for its persistent session
        ctl.start()
    load.stop()
    assert len(load.acked) > 1000, f"too little load to mean anything: {len(load.acked)}"
    assert_everything_stored_once(world, ctl, load, tap)


def test_controller_stopped_with_sigterm_under_load_loses_nothing(world: Cleanroom) -> None:
    ctl, load = start_world(world)
    tap = world.tap("cleanroom/v1/agents/it-agent/events")
    load.start()
    produce_sessions(world, tap, 2)
    time.sleep(0.7)
    assert ctl.stop() == 0, ctl.log_tail()
    assert "ingest_drained" in ctl.log_text()
    produce_sessions(world, tap, 1)
    ctl.start()
    time.sleep(0.5)
    load.stop()
    assert_everything_stored_once(world, ctl, load, tap)


def test_database_refusing_writes_for_a_while_loses_nothing(world: Cleanroom) -> None:
    """The write-ahead log made immutable (chattr +i): every commit fails with an I/O error, as on a full
    or failing disk, until it is lifted. Needs root (it runs as root in CI)."""
    ctl, load = start_world(world)
    tap = world.tap("cleanroom/v1/agents/it-agent/events")
    wal = ctl.db_path.with_name(ctl.db_path.name + "-wal")
    load.start()
    wait_for(lambda: len(load.acked) > 200, timeout=5, what="load flowing")
    subprocess.run(["chattr", "+i", str(wal)], check=True)
    try:
        produce_sessions(world, tap, 2)
        wait_for(
            lambda: "ingest_commit_failed" in ctl.log_text(), timeout=10, what="commits failing (logged)"
        )
        time.sleep(2.0)  # the outage itself: retried with backoff meanwhile
        ctl.assert_alive()
    finally:
        subprocess.run(["chattr", "-i", str(wal)], check=True)
    load.stop()
    assert_everything_stored_once(world, ctl, load, tap)


def session_events(world: Cleanroom, tap: Any, n: int) -> set[tuple[str, str]]:
    """Start and end ``n`` sessions without waiting for the wire (the broker may be down): what the agent
    must report, known from this side: (kind, session id)."""
    expected: set[tuple[str, str]] = set()
    db = world.agents["it-agent"].data_dir / "agent.db"
    for _ in range(n):
        fake = world.spawn_client()
        wire = on_wire(tap, fake.session_id)
        sid = fake.session_id.encode()

        def seen(wire: Callable[[], bool] = wire, sid: bytes = sid) -> bool:
            return sid in db.read_bytes() + agent_wal(db) or wire()

        wait_for(seen, timeout=10, what=f"session.started of {fake.session_id} spooled or sent")
        fake.end()
        expected |= {("session.started", fake.session_id), ("session.ended", fake.session_id)}
    return expected


def agent_wal(db: Path) -> bytes:
    try:
        return db.with_name(db.name + "-wal").read_bytes()
    except FileNotFoundError:
        return b""


def wait_stored_once(ctl: Controller, expected: set[tuple[str, str]]) -> list[dict[str, Any]]:
    def stored() -> list[dict[str, Any]] | None:
        rows = [r for r in stored_events(ctl, "it-agent") if r["kind"].startswith("session.")]
        got = {(r["kind"], json.loads(r["details"]).get("session")) for r in rows}
        return rows if expected <= got else None

    rows = wait_for(stored, timeout=30, what=f"{len(expected)} session events stored", interval=0.3)
    assert rows is not None
    counts = Counter((r["kind"], json.loads(r["details"]).get("session")) for r in rows)
    assert max(counts.values()) == 1, f"stored twice: {counts.most_common(3)}"
    return rows


def test_broker_killed_with_sigkill_mid_stream_loses_nothing(world: Cleanroom, mosquitto: Mosquitto) -> None:
    """Mosquitto (persistence on, autosave every second) killed with -9 right after the agent published:
    what it acknowledged and had not saved is gone from the broker, and the agent's spool sends it again."""
    ctl, _ = start_world(world)
    tap = world.tap("cleanroom/v1/agents/it-agent/events")
    expected = session_events(world, tap, 2)
    assert mosquitto.proc is not None
    mosquitto.proc.kill()
    mosquitto.proc.wait()
    mosquitto.proc = None
    expected |= session_events(world, tap, 1)  # produced while it is down
    mosquitto.start()
    wait_stored_once(ctl, expected)


def test_broker_down_longer_than_the_freshness_window_stores_every_event_as_late_history(
    world: Cleanroom, mosquitto: Mosquitto
) -> None:
    """The freshness window shrunk to 3 s and the broker down for 6 s: every event the endpoint spooled
    meanwhile is stored (late, not refused as stale), and its current state is judged only on fresh
    reports: compliant, as it is now."""
    config = world.root / "controller.toml"
    config.write_text("max_skew_s = 3\n")
    world.write_policy(heartbeat_s=1, max_offline_s=300)
    ctl = world.start_controller("--config", str(config))
    world.add_agent("it-agent", keepalive=2)
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    tap = world.tap("cleanroom/v1/agents/it-agent/events")
    mosquitto.stop()
    down_at = time.monotonic()
    expected = session_events(world, tap, 2)
    time.sleep(max(0.0, 6.0 - (time.monotonic() - down_at)))  # the outage is the condition under test
    mosquitto.start()
    rows = wait_stored_once(ctl, expected)
    late = [r for r in ctl.db_rows("SELECT ts, received FROM events WHERE agent = 'it-agent'")]
    assert sum(1 for r in late if r["received"] - r["ts"] > 3) >= len(expected) - 1, late
    assert len(rows) >= len(expected)
    world.wait_agent("it-agent", timeout=15, what="judged compliant on fresh reports", compliant=True)
    assert not ctl.db_rows("SELECT * FROM rejects WHERE sender = 'it-agent' AND status = 'stale'")
