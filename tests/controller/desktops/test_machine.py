"""The desktop state machine (pure)."""

from __future__ import annotations

import pytest

from cleanroom_controller.desktops import machine as m
from cleanroom_controller.desktops.machine import Desktop, DesktopState, Step, TransitionRefused

CLEAN = Desktop("d1", "pool")


def in_use() -> Desktop:
    return m.assign(CLEAN, agent="a1", session_id="s1", user="u1", now=1.0)


def test_full_cycle_clean_in_use_ending_ended_wiping_clean() -> None:
    d = in_use()
    assert (d.state, d.agent, d.session_id, d.user) == (DesktopState.IN_USE, "a1", "s1", "u1")
    d = m.request_end(d, reason="violation", now=2.0)
    assert d.state is DesktopState.ENDING and m.step_of(d) is Step.LOG_OFF
    d = m.logged_off(d, detail="gone", now=3.0)
    assert d.state is DesktopState.ENDED and m.step_of(d) is Step.WIPE
    d = m.start_wipe(d, now=4.0)
    assert d.state is DesktopState.WIPING
    d = m.wiped(d, detail="fresh", now=5.0)
    assert d.state is DesktopState.CLEAN and d.last_wiped == 5.0
    assert (d.agent, d.session_id, d.user) == (None, None, None)
    assert m.available(d)


@pytest.mark.parametrize("state", [s for s in DesktopState if s is not DesktopState.CLEAN])
def test_only_a_clean_desktop_is_given_to_a_session(state: DesktopState) -> None:
    d = Desktop("d1", "pool", state=state, agent="other", session_id="old")
    with pytest.raises(TransitionRefused):
        m.assign(d, agent="a1", session_id="s1", user=None, now=1.0)
    assert not m.available(d)


def test_same_session_reported_again_keeps_the_desktop() -> None:
    d = in_use()
    assert m.assign(d, agent="a1", session_id="s1", user="u1", now=9.0) == d


def test_failures_back_off_doubling_then_quarantine() -> None:
    d = m.request_end(in_use(), reason="r", now=0.0)
    d = m.failed(d, detail="x", retries=3, backoff_s=2.0, now=10.0)
    assert (d.state, d.attempts, d.next_attempt_at) == (DesktopState.ENDING, 1, 12.0)
    d = m.failed(d, detail="x", retries=3, backoff_s=2.0, now=20.0)
    assert (d.state, d.attempts, d.next_attempt_at) == (DesktopState.ENDING, 2, 24.0)
    d = m.failed(d, detail="x", retries=3, backoff_s=2.0, now=30.0)
    assert d.state is DesktopState.QUARANTINED and d.next_attempt_at is None
    assert "log_off failed 3 times" in d.reason


def test_quarantined_leaves_only_through_release_and_a_clean_wipe() -> None:
    d = Desktop("d1", "pool", state=DesktopState.QUARANTINED, attempts=3)
    with pytest.raises(TransitionRefused, match="release"):
        m.request_wipe(d, reason="op", now=1.0)
    d = m.release(d, reason="looked at it", now=1.0)
    assert d.state is DesktopState.WIPING and d.attempts == 0 and not m.available(d)
    again = m.failed(d, detail="still broken", retries=1, backoff_s=0.0, now=2.0)
    assert again.state is DesktopState.QUARANTINED
    assert m.wiped(d, detail="ok", now=3.0).state is DesktopState.CLEAN


def test_release_refused_unless_quarantined() -> None:
    with pytest.raises(TransitionRefused, match="not quarantined"):
        m.release(CLEAN, reason="x", now=1.0)


def test_operator_wipe_of_an_in_use_desktop_logs_it_off_first() -> None:
    assert m.request_wipe(in_use(), reason="op", now=1.0).state is DesktopState.ENDING
    assert m.request_wipe(CLEAN, reason="op", now=1.0).state is DesktopState.WIPING


def test_request_end_of_a_desktop_already_on_its_way_is_a_no_op() -> None:
    d = m.start_wipe(m.logged_off(m.request_end(in_use(), reason="r", now=0), detail="", now=0), now=0)
    assert m.request_end(d, reason="again", now=1.0) == d
    with pytest.raises(TransitionRefused):
        m.request_end(CLEAN, reason="x", now=1.0)


def test_backoff_is_capped() -> None:
    assert m.backoff(1, 1.0) == 1.0
    assert m.backoff(4, 1.0) == 8.0
    assert m.backoff(50, 1.0) == 32.0
