"""While the database refuses ingest's commits, an endpoint's reports wait unapplied: its stored last_seen
grows old although it kept reporting. Silence must not be judged from that, neither during the outage nor
right after it, before the held reports are applied (daemon: silence held while commits fail and for one
silence period after they resume).

The real daemon in-process, a real Mosquitto, a real SQLite file locked by a second real connection
(``BEGIN IMMEDIATE``) for longer than the silence period; only the busy timeout is shortened so that the lock
outlasts it within a fast test (the same outage as a PostgreSQL restart, from ingest's side)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiomqtt
import pytest

from cleanroom_controller.store import sqlite as sqlite_backend
from cleanroom_protocol import Channel, Kind, agent_topic
from tests.support.mosquitto import Mosquitto

from .harness import agent_client, publish, running_controller, until
from .helpers import Sender, posture, session

HEARTBEAT_S = 1  # silence after 3 s without a report
LOCKED_S = 4.5


async def test_silence_is_not_judged_from_reports_held_by_a_database_outage(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_S", 0.1)
    policy = tmp_path / "fast.toml"
    policy.write_text(f'id = "fast"\nversion = 1\n[report]\nheartbeat_s = {HEARTBEAT_S}\n')
    a1 = Sender("a1")
    async with (
        running_controller(mosquitto, tmp_path / "c", senders=(a1,), policy=policy) as run,
        agent_client(mosquitto) as c,
    ):
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        report = posture(sessions=(session(),), policy=run.controller.policy.policy)

        async def heartbeats() -> None:  # the endpoint keeps reporting throughout
            while True:
                await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, report))
                await asyncio.sleep(0.3)

        beating = asyncio.create_task(heartbeats())
        commands: list[aiomqtt.Message] = []

        async def collect() -> None:
            async for message in c.messages:
                commands.append(message)

        collecting = asyncio.create_task(collect())
        try:
            await until(
                lambda: run.store.endpoint("a1").condition.value == "compliant", timeout=5, what="a1 known"
            )
            locker = sqlite3.connect(run.controller.store.path, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
            try:
                await asyncio.sleep(LOCKED_S)
                assert run.controller.commit_failures > 0
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            failures = run.controller.commit_failures
            await until(
                lambda: run.store.endpoint("a1").last_seq or a1.seq - 2 <= 0,
                timeout=10,
                what="held reports applied",
            )
            await asyncio.sleep(1.0)  # ticks after the outage
            assert run.controller.commit_failures == failures
            assert run.store.endpoint("a1").condition.value == "compliant"
            assert not commands, "an end_session was sent for an endpoint that never stopped reporting"
        finally:
            beating.cancel()
            collecting.cancel()
