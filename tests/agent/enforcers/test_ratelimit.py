"""Event budget: bursts pass, floods are counted."""

from __future__ import annotations

from cleanroom_agent.enforcers.ratelimit import EventBudget


def test_burst_then_suppressed_then_refilled() -> None:
    budget = EventBudget(rate_per_s=2.0, burst=3)
    assert [budget.take(now=100.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take(now=100.6) == 2  # one token back; the two suppressed are reported
    assert budget.take(now=100.6) is None
