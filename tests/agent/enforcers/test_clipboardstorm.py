"""Storm detection (pure): per-client limits over a sliding second, many clients together, renotify,
forgetting a disconnected client, stale events ignored until the guard's mark, bounded memory."""

from __future__ import annotations

import pytest

from cleanroom_agent.enforcers.clipboardstorm import (
    CUT_BUFFER_WRITER,
    UNATTRIBUTED_OWNER,
    RateWatch,
    StormCounter,
)

A, B = 0x400000, 0x600000


def test_a_client_is_named_on_the_change_above_the_limit_and_only_once() -> None:
    watch = RateWatch(100)
    found = [watch.note(A, 10.0 + i * 1e-4) for i in range(150)]
    named = [i for i, storms in enumerate(found) if storms]
    assert named == [100]  # the 101st change within the second
    storm = found[100][0]
    assert (storm.key, storm.together, storm.limit_per_s) == (A, False, 100)
    assert storm.rate_per_s > 100
    assert watch.last_over is not None


def test_a_steady_rate_below_the_limit_is_never_a_storm() -> None:
    watch = RateWatch(100)
    # 60 changes a second for ten seconds: a drag-select re-claiming PRIMARY on every motion event.
    assert not any(watch.note(A, 5.0 + i / 60) for i in range(600))
    assert watch.calm(20.0, 10.0)


def test_the_window_slides_so_a_burst_straddling_two_seconds_counts() -> None:
    watch = RateWatch(100)
    assert not any(watch.note(A, 9.7 + i * 0.003) for i in range(90))  # 90 in [9.7, 9.97]
    # 30 more just after the second boundary: ~70 % of the previous window still overlaps.
    found = [watch.note(A, 10.05 + i * 0.001) for i in range(30)]
    assert any(found)


def test_a_client_still_above_the_limit_is_named_again_after_renotify() -> None:
    watch = RateWatch(100, renotify_s=1.0)
    times = [i * 1e-3 for i in range(3000)]  # 1000 changes a second for three seconds
    named = [t for t in times if watch.note(A, t)]
    assert len(named) == 3
    assert named[1] - named[0] >= 1.0


def test_forget_starts_a_disconnected_client_from_nothing() -> None:
    watch = RateWatch(100)
    for i in range(101):
        watch.note(A, i * 1e-4)
    watch.forget(A)
    assert watch.rate(A, 0.02) == 0.0
    assert not any(watch.note(A, 0.02 + i * 1e-4) for i in range(100))


def test_many_clients_together_above_the_total_are_each_named() -> None:
    watch = RateWatch(100, total_factor=4)
    clients = [0x200000 * (k + 1) for k in range(10)]
    found = []
    for i in range(50):  # each client 50 changes (below 100), 500 together (above 400)
        for client in clients:
            found += watch.note(client, 1.0 + (i * 10 + clients.index(client)) * 1e-4)
    named = {storm.key for storm in found}
    assert named == set(clients)
    assert all(storm.together for storm in found)


def test_keys_are_bounded() -> None:
    watch = RateWatch(100, max_keys=16)
    for key in range(1000):
        watch.note(key, key * 10.0)  # each alone, long apart: stale keys are pruned
    assert len(watch._keys) <= 16
    for key in range(1000, 1100):
        watch.note(key, 20000.0)  # all active at once: the oldest known are dropped
    assert len(watch._keys) <= 16


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        RateWatch(0)


def test_counter_names_the_window_and_kind() -> None:
    counter = StormCounter(10, 10)
    for i in range(11):
        counter.change(A, A + 1, "CLIPBOARD", i * 1e-3)
    for i in range(11):
        counter.change(CUT_BUFFER_WRITER, None, "CUT_BUFFER0", i * 1e-3)
    for i in range(11):
        counter.change(UNATTRIBUTED_OWNER, None, "PRIMARY", i * 1e-3)
    for i in range(101):
        counter.paste(B, B + 2, "CLIPBOARD", i * 1e-4)
    found = {(f.kind, f.storm.key, f.window, f.selection) for f in counter.take_found()}
    assert found == {
        ("owner_changes", A, A + 1, "CLIPBOARD"),
        ("cut_buffers", CUT_BUFFER_WRITER, None, "CUT_BUFFER0"),
        ("unattributed_owner", UNATTRIBUTED_OWNER, None, "PRIMARY"),
        ("pastes", B, B + 2, "CLIPBOARD"),
    }
    assert counter.take_found() == []
    assert counter.flooded(0.011)
    assert not counter.calm(1.0, 10.0)
    assert counter.calm(10.02, 10.0)


def test_counter_ignores_a_disconnected_client_until_every_stream_marked() -> None:
    counter = StormCounter(10, 10)
    for i in range(11):
        counter.change(A, A, "CLIPBOARD", i * 1e-3)
    assert counter.take_found()
    counter.disconnected((A,), ("watch", "act"))
    # Stale events of A still queued on the streams: ignored, whatever their number.
    assert not any(counter.change(A, A, "CLIPBOARD", 0.02 + i * 1e-4) for i in range(100))
    counter.mark("act")
    assert not any(counter.change(A, A, "CLIPBOARD", 0.04 + i * 1e-4) for i in range(100))
    counter.mark("watch")
    # A new client that got A's resource base: counted afresh.
    found = [counter.change(A, A, "CLIPBOARD", 0.06 + i * 1e-4) for i in range(11)]
    assert found[-1] and not any(found[:-1])


def test_a_mark_nobody_waits_for_changes_nothing() -> None:
    counter = StormCounter(10, 10)
    counter.mark("record")  # anyone can change a property on the guard's window
    counter.disconnected((A,), ("record",))
    counter.mark("watch")
    assert not counter.change(A, A, "CLIPBOARD", 0.0) and not any(
        counter.change(A, A, "CLIPBOARD", i * 1e-4) for i in range(20)
    )
