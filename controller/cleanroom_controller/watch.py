"""Rich rendering: the list commands' tables and the live ``watch`` view (reads the store; writes nothing).

Every cell is a :class:`rich.text.Text` built from the value, never a markup string: paths, session ids,
reasons and details come from endpoints, and a local user there chooses them (a folder named ``x[/]``, a
session id ``[red]``). Control and bidirectional-override characters are shown as escapes too, so text from
an endpoint cannot move the cursor, clear the screen, recolour or reorder what the operator reads.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .store import Store
from .views import AGENT_COLUMNS, agent_rows, session_rows

_DATE_FIELDS = frozenset({"expires_at", "created_at"})
_TS_FIELDS = {"last_seen", "ts", "started", "at"}

# C0 controls (ESC starts terminal escape sequences; CR and newline fake lines and rows), DEL, C1 controls
# (0x9b is a one-byte CSI), and the Unicode bidirectional embeddings, overrides and isolates, which reorder
# what is displayed ("Trojan Source").
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control and bidi-override character replaced by its ``\\xNN``/``\\uNNNN`` escape."""
    return _UNPRINTABLE.sub(_escape_char, text)


def literal(text: str) -> Text:
    """``text`` as it is, for display: no markup is interpreted, no control character reaches the terminal."""
    return Text(printable(text))


def _cell(name: str, value: Any) -> Text:
    return literal(_cell_text(name, value))


def _cell_text(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name in _DATE_FIELDS and isinstance(value, int | float):  # days or weeks away: the date matters
        try:
            return datetime.datetime.fromtimestamp(value, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        except (OverflowError, ValueError, OSError):
            return str(value)
    if name in _TS_FIELDS and isinstance(value, int | float):
        try:
            return datetime.datetime.fromtimestamp(value, tz=datetime.UTC).strftime("%H:%M:%S")
        except (OverflowError, ValueError, OSError):  # an endpoint's own time can be anything
            return str(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "-"
    return str(value)


def table(title: str, columns: list[str], rows: list[dict[str, Any]]) -> Table:
    t = Table(title=literal(title), expand=False)
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
            AGENT_COLUMNS,
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
