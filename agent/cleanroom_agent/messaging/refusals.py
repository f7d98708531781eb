"""Refused input reported in bounded form (pure apart from the clock it is given).

Anyone who can publish on the agent's command topic can send it junk, as fast as the broker forwards it.
Each refusal is counted, but a flood must not become a flood of events, log lines and outbox rows: per kind
of input (``command``, ``policy``), the first :data:`DETAILED_PER_WINDOW` refusals of a window are reported
one by one (an occasional bad message stays fully visible), the rest are held back and reported as one
summary when the window ends: how many, by verdict, and the last reason. So at most
``DETAILED_PER_WINDOW + 1`` reports per kind per window, whatever arrives.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 5.0
DETAILED_PER_WINDOW = 5


@dataclass(frozen=True, slots=True)
class RefusalReport:
    what: str  # "command" | "policy"
    reason: str  # "<status>: <detail>"; for a summary, the last refusal it covers
    count: int  # refusals this report stands for: 1, or a summary's total
    by_status: dict[str, int] = field(default_factory=dict)  # a summary's counts per status, else empty
    window_s: float = 0.0  # a summary's window

    @property
    def summary(self) -> bool:
        return bool(self.by_status)


@dataclass
class _Window:
    started: float
    detailed: int = 0
    held: Counter[str] = field(default_factory=Counter)
    last_reason: str = ""


class RefusalTally:
    def __init__(
        self,
        *,
        window_s: float = WINDOW_S,
        detailed_per_window: int = DETAILED_PER_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.detailed_per_window = detailed_per_window
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self.total: Counter[str] = Counter()  # every refusal ever, by "<what>:<status>"

    def refused(self, what: str, status: str, detail: str) -> list[RefusalReport]:
        """Count one refusal; return what to report now (the ended window's summary, then this one)."""
        self.total[f"{what}:{status}"] += 1
        now = self._clock()
        reports = self._close(what, now)
        window = self._windows.setdefault(what, _Window(started=now))
        reason = f"{status}: {detail}" if detail else status
        if window.detailed < self.detailed_per_window:
            window.detailed += 1
            reports.append(RefusalReport(what, reason, 1))
        else:
            window.held[status] += 1
            window.last_reason = reason
        return reports

    def flush(self) -> list[RefusalReport]:
        """The summaries of windows that have ended (call it every second or so, and when stopping)."""
        now = self._clock()
        reports: list[RefusalReport] = []
        for what in list(self._windows):
            reports += self._close(what, now)
        return reports

    def flush_all(self) -> list[RefusalReport]:
        """Every summary still held, ended window or not (the connection is going away)."""
        reports = [r for what, w in self._windows.items() if (r := self._summary(what, w)) is not None]
        self._windows.clear()
        return reports

    def _close(self, what: str, now: float) -> list[RefusalReport]:
        window = self._windows.get(what)
        if window is None or now - window.started < self.window_s:
            return []
        del self._windows[what]
        summary = self._summary(what, window)
        return [] if summary is None else [summary]

    def _summary(self, what: str, window: _Window) -> RefusalReport | None:
        if not window.held:
            return None
        return RefusalReport(
            what,
            window.last_reason,
            sum(window.held.values()),
            dict(sorted(window.held.items())),
            self.window_s,
        )
