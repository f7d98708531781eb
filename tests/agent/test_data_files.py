"""The agent's data stay private: a real agent process, started on a data directory left open (0755), runs
with it 0700 and with agent.db, its -wal and -shm and agent.key 0600."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from cleanroom_protocol import Channel
from tests.agent.conftest import Tap
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_agent_data_directory_and_files_are_private(
    mosquitto: Mosquitto, tap: Tap, agent_factory: Any
) -> None:
    agent = agent_factory(mosquitto.url)
    agent.data_dir.mkdir()
    agent.data_dir.chmod(0o755)
    agent.start()
    wait_for(lambda: tap.on(Channel.POSTURE), timeout=15, what="a posture (the outbox was written)")
    # While the agent runs, its database has its -wal and -shm beside it.
    files = {p.name: mode(p) for p in agent.data_dir.iterdir()}
    assert mode(agent.data_dir) == 0o700
    assert files == dict.fromkeys(("agent.key", "agent.db", "agent.db-wal", "agent.db-shm"), 0o600)
    assert "data directory was mode 0755" in agent.log.read_text()
