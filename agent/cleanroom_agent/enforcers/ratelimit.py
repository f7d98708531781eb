"""A token bucket for events: a user selecting text all day, or a tool exec'd in a loop, must not flood
the spool. What is suppressed is counted and reported with the next event that passes."""

from __future__ import annotations

import threading
import time


class EventBudget:
    def __init__(self, rate_per_s: float = 10.0, burst: int = 50) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._suppressed = 0
        self._lock = threading.Lock()

    def take(self, now: float | None = None) -> int | None:
        """None when over budget (suppressed, counted); else how many were suppressed before this one."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._tokens = min(self._burst, self._tokens + max(0.0, now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return None
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed
