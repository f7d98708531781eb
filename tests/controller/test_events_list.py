"""`events list` shows the newest events first, so new ones never fall behind a full page of old ones;
`--agent ID --before SEQ` pages back through one agent's events. Real CLI processes, a real controller.db."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cleanroom_controller import Store

CLI = str(Path(sys.executable).parent / "cleanroom-controller")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """1,005 events of a1 and 3 of a2, interleaved in the order they were received."""
    d = tmp_path / "data"
    store = Store.open(d)
    with store.transaction():
        for n in range(1, 1006):
            store.add_event(
                "a1", n, kind="usb.blocked", ts=n, at=n, severity="info", blocked=True, details={}, now=n
            )
            if n in (500, 1000, 1004):
                seq = {500: 1, 1000: 2, 1004: 3}[n]
                store.add_event(
                    "a2",
                    seq,
                    kind="exec.denied",
                    ts=n,
                    at=n,
                    severity="info",
                    blocked=True,
                    details={},
                    now=n,
                )
    store.close()
    return d


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "events", "list", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def rows(data_dir: Path, *args: str) -> list[tuple[str, int]]:
    done = cli(data_dir, "--json", *args)
    assert done.returncode == 0, done.stderr
    lines: list[dict[str, Any]] = [json.loads(line) for line in done.stdout.splitlines()]
    return [(e["agent"], e["seq"]) for e in lines]


def test_the_newest_events_come_first_and_none_vanish_after_the_first_page(data_dir: Path) -> None:
    shown = rows(data_dir)
    assert len(shown) == 1000
    assert shown[:4] == [("a1", 1005), ("a2", 3), ("a1", 1004), ("a1", 1003)]
    assert ("a1", 1) not in shown  # the oldest make room, not the newest
    assert rows(data_dir, "--limit", "2") == [("a1", 1005), ("a2", 3)]


def test_one_agent_paged_back_by_seq(data_dir: Path) -> None:
    assert rows(data_dir, "--agent", "a2") == [("a2", 3), ("a2", 2), ("a2", 1)]
    first = rows(data_dir, "--agent", "a1", "--limit", "3")
    assert first == [("a1", 1005), ("a1", 1004), ("a1", 1003)]
    after = rows(data_dir, "--agent", "a1", "--limit", "3", "--before", str(first[-1][1]))
    assert after == [("a1", 1002), ("a1", 1001), ("a1", 1000)]


def test_the_table_is_newest_first_too_and_before_needs_an_agent(data_dir: Path) -> None:
    done = cli(data_dir, "--limit", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.index("1005") < done.stdout.index("exec.denied")
    refused = cli(data_dir, "--before", "10")
    assert refused.returncode == 2
    assert "--before SEQ needs --agent ID" in refused.stderr and "Traceback" not in refused.stderr
