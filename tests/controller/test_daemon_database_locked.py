"""SQLite's "database is locked" past the busy timeout (another writer holds the lock: a CLI command, a
backup tool) fails a batch's commit: the daemon keeps the batch, unacknowledged, and retries it until it
commits; the controller stays up and every event is stored exactly once.

The real daemon in-process, a real Mosquitto, a real SQLite file; the other writer is a second real
connection holding ``BEGIN IMMEDIATE``. Only the busy timeout is shortened (30 s in production) so that the
lock outlasts it within a fast test."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from cleanroom_controller.store import sqlite as sqlite_backend
from cleanroom_protocol import Channel, Event, Kind
from tests.support.mosquitto import Mosquitto

from .harness import agent_client, publish, running_controller, until
from .helpers import Sender

EVENTS = 50


async def test_a_database_locked_past_the_busy_timeout_is_retried_and_loses_nothing(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_S", 0.1)
    a1 = Sender("a1")
    async with (
        running_controller(mosquitto, tmp_path / "c", senders=(a1,)) as run,
        agent_client(mosquitto) as client,
    ):
        locker = sqlite3.connect(run.controller.store.path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # the one writer lock, held by someone else
        try:
            for n in range(EVENTS):
                event = Event(kind="usb.blocked", at=time.time(), details={"n": n})
                await publish(client, "a1", Channel.EVENTS, a1.seal(Kind.EVENT, event))
            await until(
                lambda: run.controller.commit_failures >= 3, timeout=10, what="commits refused while locked"
            )
            assert run.store._db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
            assert run.controller.link.acked == 0, "acknowledged before its commit"
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await until(
            lambda: run.store._db.execute("SELECT COUNT(*) FROM events").fetchone()[0] >= EVENTS,
            timeout=10,
            what="every event stored once the lock is gone",
        )
        assert run.controller.link.connected
        assert run.controller.link.acked >= EVENTS
        seqs = [r[0] for r in run.store._db.execute("SELECT seq FROM events WHERE agent = 'a1' ORDER BY seq")]
    assert seqs == list(range(1, EVENTS + 1))  # counted on the sender's side: each once, none missing
