"""Refusals are reported in bounded form: a few in full per window, the rest as one summary with exact
counts, whatever the volume."""

from __future__ import annotations

from cleanroom_agent.messaging.refusals import RefusalReport, RefusalTally


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_becomes_a_few_reports_and_one_summary_per_window() -> None:
    clock = Clock()
    tally = RefusalTally(window_s=5, detailed_per_window=3, clock=clock)
    reports: list[RefusalReport] = []
    for n in range(100_000):
        reports += tally.refused("command", "bad_signature" if n % 2 else "malformed", f"junk {n}")
    assert [r.reason for r in reports] == ["malformed: junk 0", "bad_signature: junk 1", "malformed: junk 2"]
    assert tally.flush() == []  # the window has not ended
    clock.now += 5
    (summary,) = tally.flush()
    assert summary.summary and summary.what == "command"
    assert summary.count == 100_000 - 3
    assert summary.by_status == {"bad_signature": 50_000 - 1, "malformed": 50_000 - 2}
    assert summary.reason == "bad_signature: junk 99999"
    assert tally.flush() == []  # reported once
    assert sum(tally.total.values()) == 100_000


def test_windows_are_per_kind_of_input() -> None:
    tally = RefusalTally(window_s=5, detailed_per_window=1, clock=Clock())
    assert len(tally.refused("command", "malformed", "x")) == 1
    assert tally.refused("command", "malformed", "x") == []
    assert len(tally.refused("policy", "bad_signature", "y")) == 1  # a command flood hides no policy


def test_the_next_refusal_after_a_window_brings_its_summary_then_is_reported() -> None:
    clock = Clock()
    tally = RefusalTally(window_s=5, detailed_per_window=1, clock=clock)
    tally.refused("command", "malformed", "a")
    tally.refused("command", "too_large", "b")
    clock.now += 6
    summary, single = tally.refused("command", "malformed", "c")
    assert (summary.count, summary.by_status, single.reason) == (1, {"too_large": 1}, "malformed: c")


def test_flush_all_reports_what_is_held_when_the_connection_goes() -> None:
    tally = RefusalTally(window_s=5, detailed_per_window=0, clock=Clock())
    tally.refused("policy", "bad_signature", "a")
    (summary,) = tally.flush_all()
    assert (summary.what, summary.count) == ("policy", 1)
    assert tally.flush_all() == []
