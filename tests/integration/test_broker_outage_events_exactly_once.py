"""Events produced while the broker is down reach the controller after it returns, each exactly once.

The broker (real Mosquitto) is stopped for 10 s; meanwhile fake VDI sessions start and end on the endpoint,
so the agent emits ``session.started``/``session.ended`` events into its durable outbox. After the broker
comes back on the same port, every event the agent emitted (seen on the wire before the outage, or held in
its outbox during it) is in ``events list --json`` exactly once, keyed by (agent, seq).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Agent, Cleanroom, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

OUTAGE_S = 10.0


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def _outbox_events(agent: Agent) -> dict[int, dict[str, Any]]:
    """Signed event envelopes waiting in the agent's outbox, by seq (read-only; the agent keeps running)."""
    db = agent.data_dir / "agent.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT seq, topic, payload FROM outbox ORDER BY seq").fetchall()
    finally:
        con.close()
    return {int(seq): json.loads(payload) for seq, topic, payload in rows if str(topic).endswith("/events")}


def _has_event(events: dict[int, dict[str, Any]], kind: str, session_id: str) -> bool:
    return any(
        e["body"]["kind"] == kind and e["body"].get("details", {}).get("session") == session_id
        for e in events.values()
    )


def _wait_spooled(agent: Agent, spooled: dict[int, dict[str, Any]], kind: str, session_id: str) -> None:
    def seen() -> bool:
        spooled.update(_outbox_events(agent))
        return _has_event(spooled, kind, session_id)

    wait_for(
        seen, timeout=OUTAGE_S / 2, what=f"{kind} {session_id} in the agent's outbox while the broker is down"
    )


def test_events_emitted_during_a_10s_broker_outage_are_stored_exactly_once(
    world: Cleanroom, mosquitto: Mosquitto
) -> None:
    world.write_policy(heartbeat_s=1, max_offline_s=300)
    ctl = world.start_controller()
    tap = world.tap("cleanroom/v1/agents/+/events")
    agent = world.add_agent("it-agent", keepalive=2)
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )

    # One session before the outage: its events go straight through.
    before = world.spawn_client()
    wait_for(
        lambda: any(
            json.loads(m.payload)["body"].get("details", {}).get("session") == before.session_id
            for m in tap.on("/it-agent/events")
        ),
        timeout=15,
        what="session.started of the pre-outage session on the wire",
    )

    mosquitto.stop()
    stopped_at = time.monotonic()
    spooled: dict[int, dict[str, Any]] = {}
    during = [world.spawn_client() for _ in range(3)]
    for fake in during:
        _wait_spooled(agent, spooled, "session.started", fake.session_id)
    for fake in (before, during[0]):
        fake.end()
        _wait_spooled(agent, spooled, "session.ended", fake.session_id)
    spooled.update(_outbox_events(agent))
    elapsed = time.monotonic() - stopped_at
    assert elapsed < OUTAGE_S, f"producing the events took {elapsed:.1f} s, longer than the outage"
    # The outage itself is the condition under test: it lasts OUTAGE_S whatever the agent does.
    time.sleep(OUTAGE_S - elapsed)
    spooled.update(_outbox_events(agent))
    agent.assert_alive()
    ctl.assert_alive()
    mosquitto.start()

    wait_for(
        lambda: not _outbox_events(agent), timeout=30, what="the agent's outbox to drain after the outage"
    )
    emitted: dict[int, dict[str, Any]] = {
        e["seq"]: e for e in (json.loads(m.payload) for m in tap.on("/it-agent/events"))
    }
    emitted.update(spooled)
    assert len(spooled) >= 5, f"expected ≥ 5 events spooled during the outage, got {sorted(spooled)}"

    def stored_all() -> list[dict[str, Any]] | None:
        rows = [e for e in ctl.events() if e.get("agent") == "it-agent"]
        return rows if set(emitted) <= {int(e["seq"]) for e in rows} else None

    rows: list[dict[str, Any]] | None
    try:
        rows = wait_for(
            stored_all, timeout=30, what="every emitted event in `events list --json`", interval=0.3
        )
    except AssertionError as exc:
        stored = sorted(int(e["seq"]) for e in ctl.events() if e.get("agent") == "it-agent")
        raise AssertionError(f"{exc}\nemitted seqs {sorted(emitted)}\nstored seqs {stored}") from None

    assert rows is not None
    seqs = [int(e["seq"]) for e in rows]
    duplicates = sorted({s for s in seqs if seqs.count(s) > 1})
    assert not duplicates, f"events stored more than once (agent it-agent, seq): {duplicates}"
    for seq, envelope in emitted.items():
        row = next(e for e in rows if int(e["seq"]) == seq)
        assert row["kind"] == envelope["body"]["kind"], f"seq {seq}: stored {row}, emitted {envelope['body']}"
    for fake in during:
        assert _has_event(emitted, "session.started", fake.session_id), (
            f"no session.started for {fake.session_id}"
        )
    for fake in (before, during[0]):
        assert _has_event(emitted, "session.ended", fake.session_id), (
            f"no session.ended for {fake.session_id}"
        )
