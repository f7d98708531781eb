"""An agent whose spool is full fails closed, reports the gap, and recovers once the controller drains it.

Real Mosquitto, a real agent process (its spool bound shrunk to 16 rows through ``CLEANROOM_SPOOL_MAX_ROWS``)
and the real controller process. The controller is stopped, so no watermark comes and the agent's rows
stay: denied launches on the real launch socket fill the spool. Then: the VDI client stand-in (a renamed
``sleep`` with a child) is ended, ``cleanroom-agent launch`` is refused naming ``spool_full``, and the
posture on the wire says ``spool_full`` with the events it refused counted. The record of that end (its
``session.ended`` and the ``agent.fail_closed``) is not refused: it goes into the spool's reserve beyond the
bound, and is stored by the controller exactly once. The controller starts again:
its watermarks drain the spool, the agent recovers (the same launch now execs the client), and every event
the agent accepted is stored by the controller exactly once, counted by content on both sides (the
agent's outbox and what it put on the wire against the controller's rows); the refused count reaches the
controller in a ``spool.overflow`` event equal to the agent's own durable counter.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cleanroom_agent.sessions.localsock import LocalSocketClient
from tests.support.mosquitto import Mosquitto
from tests.support.procs import Agent, Cleanroom, Tapped, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LIMIT = 16  # the spool's bound in this test (the setting's smallest allowed is 10)


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def outbox(agent: Agent) -> list[tuple[int, str, bytes]]:
    """The agent's outbox rows (seq, topic, payload), read-only while it runs."""
    con = sqlite3.connect(f"file:{agent.data_dir / 'agent.db'}?mode=ro", uri=True, timeout=10)
    try:
        return [
            (int(s), str(t), bytes(p)) for s, t, p in con.execute("SELECT seq, topic, payload FROM outbox")
        ]
    finally:
        con.close()


def agent_state(agent: Agent, key: str) -> str | None:
    con = sqlite3.connect(f"file:{agent.data_dir / 'agent.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = con.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    finally:
        con.close()
    return None if row is None else str(row[0])


def bodies(messages: list[Tapped]) -> list[dict[str, Any]]:
    return [m.envelope()["body"] for m in messages]


def identity(body: dict[str, Any]) -> str:
    """An event by its content (kind, time, details): how "once" is counted, never by the store's key."""
    return json.dumps([body["kind"], round(float(body["at"]), 6), body.get("details", {})], sort_keys=True)


def launch(agent: Agent, client: Path) -> subprocess.Popen[str]:
    """``cleanroom-agent launch -- CLIENT 3600``: denied, it exits 77; allowed, it becomes the client."""
    return subprocess.Popen(
        [agent.exe, "launch", "--socket", str(agent.socket_path), "--", str(client), "3600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_full_spool_fails_closed_reports_the_gap_and_recovers_when_drained(world: Cleanroom) -> None:
    world.write_policy(heartbeat_s=1, max_offline_s=300)
    ctl = world.start_controller()
    tap = world.tap("cleanroom/v1/agents/it-agent/#")
    agent = world.add_agent("it-agent", start=False)
    agent.env = {**os.environ, "CLEANROOM_SPOOL_MAX_ROWS": str(LIMIT)}
    agent.start()
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    fake = world.spawn_client()
    wait_for(
        lambda: any(fake.session_id in json.dumps(b) for b in bodies(tap.on("it-agent/events"))),
        timeout=10,
        what="session.started of the VDI client stand-in on the wire",
    )

    # No controller: nothing lists the agent's rows any more. Denied launches (an event each) fill it.
    assert ctl.stop() == 0, ctl.log_tail()
    sock = LocalSocketClient(agent.socket_path)

    def one_more_denied_launch() -> bool:
        answer = sock.request({"op": "launch", "client": "not-a-vdi-client"})
        assert answer.get("ok") or answer.get("error") == "rate limited", answer
        return len(outbox(agent)) >= LIMIT

    wait_for(
        one_more_denied_launch, timeout=10, what=f"the agent's spool holding {LIMIT} rows", interval=0.01
    )
    assert len(outbox(agent)) >= LIMIT

    # Fail closed: the session is ended, a launch is refused, the posture reports it and the gap.
    wait_for(lambda: not fake.live_pids(), timeout=5, what="the VDI client stand-in ended by the agent")
    client = world.root / "bin" / world.client_name
    denied = launch(agent, client)
    _, err = denied.communicate(timeout=15)
    assert denied.returncode == 77 and "spool_full" in err, (denied.returncode, err)

    def full_posture() -> dict[str, Any] | None:
        return next(
            (
                b
                for b in reversed(bodies(tap.on("it-agent/posture")))
                if b["spool_full"] and b["spool_refused"] >= 3
            ),
            None,
        )

    def refused_once_more() -> bool:
        sock.request({"op": "launch", "client": "not-a-vdi-client"})  # its launch.denied: no room
        return int(agent_state(agent, "spool_refused") or 0) >= 3

    wait_for(refused_once_more, timeout=10, what="3 events refused by the full spool", interval=0.05)
    reported = wait_for(full_posture, timeout=5, what="a posture saying spool_full with the refusals counted")
    assert reported is not None and reported["sessions"] == []
    held = outbox(agent)
    held_events = {seq: json.loads(p)["body"] for seq, t, p in held if t.endswith("/events")}

    # The evidence of failing closed was kept beyond the bound (the reserve), not refused.
    def evidence(bodies: Iterable[dict[str, Any]]) -> Counter[str]:
        """The fail-closed and session-ended events about the stand-in's session, by content."""
        found = (
            (
                b["kind"],
                b["details"].get("session") or b["details"].get("sessions"),
                b["details"].get("reason"),
            )
            for b in bodies
            if b["kind"] in ("agent.fail_closed", "session.ended")
        )
        return Counter(
            f"{kind}:{session}:{reason}" for kind, session, reason in found if session == fake.session_id
        )

    ended = f"session.ended:{fake.session_id}:fail_closed"
    failed_closed = f"agent.fail_closed:{fake.session_id}:spool_full"
    assert evidence(held_events.values()) == {ended: 1, failed_closed: 1}, held_events
    assert len([t for _, t, _ in held if not t.endswith(("/posture", "/status"))]) == LIMIT + 2
    posture_count = len(tap.on("it-agent/posture"))

    # The controller returns: its watermarks drain the spool and the agent recovers by itself.
    ctl.start()

    def drained_posture() -> bool:
        return any(not b["spool_full"] for b in bodies(tap.on("it-agent/posture")[posture_count:]))

    wait_for(drained_posture, timeout=15, what="a posture saying the spool drained")
    world.wait_agent("it-agent", timeout=10, what="it-agent compliant again", compliant=True)
    allowed = launch(agent, client)
    try:

        def runs_client() -> bool:
            try:
                return psutil.Process(allowed.pid).name() == world.client_name
            except psutil.NoSuchProcess:
                return False

        wait_for(runs_client, timeout=10, what="cleanroom-agent launch allowed (it became the client)")
    finally:
        allowed.kill()
        allowed.communicate(timeout=10)

    # Exactly once: every event the agent accepted (held in its spool, or put on the wire) stored once.
    def accepted() -> dict[int, dict[str, Any]]:
        return {
            **{int(m.envelope()["seq"]): m.envelope()["body"] for m in tap.on("it-agent/events")},
            **held_events,
        }

    refused_total = int(agent_state(agent, "spool_refused") or 0)
    assert refused_total >= 3

    def overflow_stored() -> list[dict[str, Any]] | None:
        rows = ctl.db_rows("SELECT seq, kind, at, details FROM events WHERE agent = ?", ("it-agent",))
        overflow = any(r["kind"] == "spool.overflow" for r in rows)
        return rows if overflow and set(accepted()) <= {int(r["seq"]) for r in rows} else None

    rows = wait_for(overflow_stored, timeout=15, what="every accepted event stored", interval=0.3)
    assert rows is not None
    stored = Counter(
        identity({"kind": r["kind"], "at": r["at"], "details": json.loads(r["details"])}) for r in rows
    )
    assert max(stored.values()) == 1, f"stored twice: {stored.most_common(3)}"
    assert {identity(b) for b in accepted().values()} == set(stored), "stored and accepted differ"
    assert len(rows) == len(accepted())
    overflow = [json.loads(r["details"]) for r in rows if r["kind"] == "spool.overflow"]
    assert overflow == [{"dropped": refused_total, "refused_total": refused_total}]
    # The fail-closed evidence of the full spool: stored at the controller exactly once, counted by content
    # (the session the allowed launch started and the test killed ended later: "exited", not counted here).
    stored_evidence = evidence({"kind": r["kind"], "details": json.loads(r["details"])} for r in rows)
    assert stored_evidence == {ended: 1, failed_closed: 1}, stored_evidence
    wait_for(
        lambda: not any(t.endswith("/events") for _, t, _ in outbox(agent)),
        timeout=10,
        what="every event listed by a watermark and gone from the agent's spool",
    )
