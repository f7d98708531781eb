"""Rich rendering: the list commands' tables and the live ``watch`` view (reads the store; writes nothing)."""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table

from .store import Store
from .views import agent_rows, session_rows

_TS_FIELDS = {"last_seen", "ts", "started", "at"}


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in _TS_FIELDS and isinstance(value, int | float):
        return datetime.datetime.fromtimestamp(value, tz=datetime.UTC).strftime("%H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "-"
    return str(value)


def table(title: str, columns: list[str], rows: list[dict[str, Any]]) -> Table:
    t = Table(title=title, expand=False)
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*(_cell(c, row.get(c)) for c in columns))
    return t


def view(store: Store) -> Group:
    decisions = [
        {**d, "actions": [f"{a['action']}:{a['session']}" for a in d["actions"]]}
        for d in store.decisions(limit=15)
    ]
    return Group(
        table(
            "agents",
            ["id", "online", "compliant", "condition", "reasons", "last_seen", "sessions", "rejects"],
            agent_rows(store),
        ),
        table("sessions", ["id", "agent", "state", "ended_reason", "client"], session_rows(store)[-20:]),
        table("last decisions", ["ts", "agent", "condition", "reasons", "actions"], decisions),
    )


def live(store: Store, interval: float) -> None:
    with Live(view(store), refresh_per_second=4, screen=False) as display:
        while True:
            time.sleep(interval)
            display.update(view(store))
