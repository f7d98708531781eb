"""The live view renders agents, sessions and decisions from the store."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from cleanroom_controller import Condition, EndpointState, SessionRecord, SessionState, Store
from cleanroom_controller.watch import view

from .helpers import Sender, enrol


def test_view_renders_the_store(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    enrol(store, "a1", Sender("a1").key)
    store.save_endpoint(EndpointState("a1", Condition.VIOLATION, True, False, ("denied_process:scrot",), 1.0))
    store.save_session(
        SessionRecord("a1", "s-1-1", SessionState.ENDED, "xfreerdp", ended_reason="violation:x")
    )
    store.add_decision(
        "a1", 1.0, "violation", ["denied_process:scrot"], [{"action": "end_session", "session": "s-1-1"}]
    )
    console = Console(width=200, record=True)
    console.print(view(store))
    text = console.export_text()
    assert "denied_process:scrot" in text
    assert "violation:x" in text
    assert "end_session:s-1-1" in text


def test_view_shows_each_endpoints_spool(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    enrol(store, "a1", Sender("a1").key)
    posture = json.dumps({"spool_full": True, "spool_refused": 4321})
    store.save_endpoint(
        EndpointState("a1", Condition.VIOLATION, True, False, ("spool_full",), 1.0), posture=posture
    )
    console = Console(width=200, record=True)
    console.print(view(store))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "spool_full" in line and "spool_refused" in line)
    row = next(line for line in lines if line.startswith("│ a1 "))
    cells = dict(zip(header.split("┃")[1:-1], row.split("│")[1:-1], strict=True))
    assert {k.strip(): v.strip() for k, v in cells.items()}.items() >= {
        "spool_full": "yes",
        "spool_refused": "4321",
    }.items()
