"""Reject windows (pure): counts per sender and reason, one summary per sender per window, nothing lost."""

from __future__ import annotations

from cleanroom_controller.ingest.rejects import REJECTS, Reason, RejectWindows


def test_a_flood_is_one_window_per_sender_with_counts_and_the_first_detail() -> None:
    w = RejectWindows(window_s=10)
    for i in range(100_000):
        opened = w.add("a1", Reason.BAD_SIGNATURE, 1000.0 + i * 0.00005, {"seq": i, "detail": "forged"})
        assert opened is (i == 0)
    w.add("a1", Reason.DUPLICATE, 1001.0, {"seq": 7})
    w.add("(unenrolled)", Reason.UNKNOWN_SENDER, 1002.0, {"topic": "t" * 999})
    first = w.flush(1005.0)
    assert first.closed == ()  # not due yet
    assert first.counts == {
        ("a1", "bad_signature"): (100_000, 1000.0 + 99_999 * 0.00005),
        ("(unenrolled)", "unknown_sender"): (1, 1002.0),
    }  # duplicates are no reject
    assert {t.sender for t in first.touched} == {"a1", "(unenrolled)"}
    due = w.flush(1010.0)
    assert [c.sender for c in due.closed] == ["a1"]  # opened at 1000
    summary = due.closed[0].summary(10)
    assert summary["counts"] == {"bad_signature": 100_000, "duplicate": 1}
    assert summary["total"] == 100_001
    assert summary["first"] == {
        "bad_signature": {"seq": 0, "detail": "forged", "at": 1000.0},
        "duplicate": {"seq": 7, "at": 1001.0},
    }
    (stranger,) = w.flush(1012.0).closed
    assert len(stranger.first["unknown_sender"]["topic"]) == 200  # details are bounded
    assert w.open_senders == 0


def test_close_all_writes_every_open_window_and_undo_keeps_what_was_not_stored() -> None:
    w = RejectWindows(window_s=60)
    w.add("a1", Reason.STALE, 1.0, {})
    w.add("a2", Reason.MALFORMED, 2.0, {})
    failed = w.flush(3.0, close_all=True)
    assert {c.sender for c in failed.closed} == {"a1", "a2"}
    w.add("a1", Reason.STALE, 4.0, {})  # arrives before the failed flush is undone
    w.undo(failed)
    retry = w.flush(5.0, close_all=True)
    by_sender = {c.sender: c for c in retry.closed}
    assert by_sender["a1"].counts == {"stale": 2} and by_sender["a1"].opened == 1.0
    assert retry.counts == {("a1", "stale"): (2, 4.0), ("a2", "malformed"): (1, 2.0)}


def test_which_reasons_are_rejects() -> None:
    assert Reason.DUPLICATE not in REJECTS and Reason.OLD_STATUS not in REJECTS
    assert {Reason.OVERFLOW, Reason.BAD_SIGNATURE} <= REJECTS
