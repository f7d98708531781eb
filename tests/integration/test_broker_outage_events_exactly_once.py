"""Events produced while the broker is down reach the controller after it returns, each exactly once.

The broker (real Mosquitto) is stopped for 10 s; meanwhile fake VDI sessions start and end on the endpoint,
so the agent emits ``session.started``/``session.ended`` events into its durable outbox. After the broker
comes back on the same port, every event the agent emitted (seen on the wire before the outage, or held in
its outbox during it) is in ``events list --json`` exactly once. "Once" is counted by each event's content on
both sides (the agent's production, the controller's rows, the controller's `ok` verdicts), not through the
store's UNIQUE (agent, seq), which would hide a duplicate.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Agent, Cleanroom, audit_entries, cleanroom
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

    # Exactly once, counted on both sides without leaning on the store's UNIQUE (agent, seq), which
    # would hide a duplicate stored under the same seq and cannot see one re-sealed under a new seq:
    # each event is identified by its content (kind, session, time of occurrence). The agent goes on
    # producing events meanwhile, so its side is everything it put on the wire or spooled, read again now.
    def identity(body: dict[str, Any]) -> tuple[str, object, float]:
        return (body["kind"], body.get("details", {}).get("session"), float(body["at"]))

    def agent_side() -> dict[int, dict[str, Any]] | None:
        sent = {e["seq"]: e for e in (json.loads(m.payload) for m in tap.on("/it-agent/events"))}
        sent.update(spooled)
        return sent if {int(r["seq"]) for r in rows} <= set(sent) else None

    everything = wait_for(agent_side, timeout=10, what="every stored event seen on the wire by the tap")
    produced = Counter(identity(e["body"]) for e in everything.values())
    stored = Counter(identity(e) for e in rows)
    assert max(produced.values()) == 1, f"the agent produced an event twice: {produced.most_common(3)}"
    assert max(stored.values()) == 1, f"the controller stored an event twice: {stored.most_common(3)}"
    assert set(stored) <= set(produced), f"stored but never produced: {set(stored) - set(produced)}"
    missing = {identity(e["body"]) for e in emitted.values()} - set(stored)
    assert not missing, f"emitted during/around the outage but not stored: {missing}"

    # The controller's own count of what it accepted, from the audit side: the leaves of its verdict.batch
    # entries (each entry's count must match the messages it covers); broker redeliveries after the
    # outage are `duplicate`s, never a second leaf.
    def covered() -> Counter[int] | None:
        con = sqlite3.connect(f"file:{ctl.db_path}?mode=ro", uri=True, timeout=10)
        try:
            leaves = con.execute("SELECT agent, seq, kind, batch FROM messages").fetchall()
        finally:
            con.close()
        if any(batch is None for *_, batch in leaves):
            return None  # sealed within about a second
        per_batch = Counter(batch for *_, batch in leaves)
        for e in audit_entries(ctl.db_path):
            if e["kind"] == "verdict.batch":
                assert json.loads(e["data_json"])["count"] == per_batch.pop(e["id"], 0), e
        assert not per_batch, f"messages naming no verdict.batch entry: {per_batch}"
        return Counter(seq for agent, seq, kind, _ in leaves if agent == "it-agent" and kind == "event")

    accepted = wait_for(covered, timeout=10, what="every stored message sealed into a batch")
    assert accepted is not None
    assert set(emitted) <= set(accepted) and max(accepted.values()) == 1, (
        f"ok verdicts per event seq: {dict(accepted)}; emitted seqs {sorted(emitted)}"
    )
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
