"""The fair inbox between the link and ingest: quiet senders first, noisy ones rationed and dropped when
their queue is full, a quiet sender never dropped."""

from __future__ import annotations

import asyncio

from cleanroom_controller.ingest.inbox import FairInbox, Item


def make(noisy: set[str], **kw: int) -> tuple[FairInbox, list[tuple[str, Item]]]:
    dropped: list[tuple[str, Item]] = []
    inbox = FairInbox(
        key_of=lambda topic: topic.split("/")[0],
        noisy=lambda key: key in noisy,
        on_overflow=lambda key, item: dropped.append((key, item)),
        **kw,
    )
    return inbox, dropped


def msg(sender: str, n: int) -> Item:
    return (f"{sender}/posture", str(n).encode(), False)


async def one_round(inbox: FairInbox) -> list[str]:
    round_ = [(await asyncio.wait_for(inbox.get(), 1))[0]]
    while not inbox.empty():
        round_.append(inbox.get_nowait()[0])
    return [f"{t.split('/')[0]}{p.decode()}" for t, p, _ in round_]


async def test_quiet_senders_go_first_in_turn_and_a_noisy_one_gets_a_rounds_worth() -> None:
    inbox, dropped = make({"a"}, noisy_per_round=4)
    for i in range(100):
        await inbox.put(msg("a", i))  # the flood came first: all but a round's worth dropped unread
    for i in range(3):
        await inbox.put(msg("b", i))
    for i in range(2):
        await inbox.put(msg("c", i))
    assert await one_round(inbox) == ["b0", "c0", "b1", "c1", "b2", "a0", "a1", "a2", "a3"]
    assert [m for _, m in dropped] == [msg("a", i) for i in range(4, 100)]
    for i in range(100, 110):
        await inbox.put(msg("a", i))
    await inbox.put(msg("b", 3))  # a quiet message arriving behind the flood jumps the queue
    assert await one_round(inbox) == ["b3", "a100", "a101", "a102", "a103"]


async def test_a_noisy_senders_overflow_is_dropped_and_a_quiet_sender_waits_instead() -> None:
    inbox, dropped = make({"a"}, per_sender=5, capacity=100, noisy_per_round=10)
    for i in range(50):
        await inbox.put(msg("a", i))  # never blocks: the link keeps reading the socket
    assert inbox.qsize() == 10 and len(dropped) == 40 and dropped[0] == ("a", msg("a", 10))
    for i in range(5):
        await inbox.put(msg("b", i))
    blocked = asyncio.create_task(inbox.put(msg("b", 5)))
    await asyncio.sleep(0.01)
    assert not blocked.done()  # b is quiet: nothing of it is dropped, the link waits
    assert (await one_round(inbox))[0] == "b0"
    await asyncio.wait_for(blocked, 1)
    assert all(key == "a" for key, _ in dropped)


async def test_a_full_inbox_makes_room_for_a_quiet_sender_by_evicting_noisy_messages() -> None:
    inbox, dropped = make({"a"}, capacity=10, noisy_per_round=10)
    for i in range(10):
        await inbox.put(msg("a", i))
    await asyncio.wait_for(inbox.put(msg("b", 0)), 1)
    assert dropped == [("a", msg("a", 0))] and inbox.qsize() == 10
    assert (await one_round(inbox))[0] == "b0"


async def test_a_sender_is_classed_again_each_round() -> None:
    noisy = {"a"}
    inbox, _ = make(noisy, noisy_per_round=1)
    await inbox.put(msg("a", 0))
    noisy.clear()  # its budget refilled: quiet from the next round on
    for i in range(1, 3):
        await inbox.put(msg("a", i))
    assert await one_round(inbox) == ["a0", "a1", "a2"]
    noisy.add("a")
    for i in range(3, 6):
        await inbox.put(msg("a", i))  # one kept (a round's worth), two dropped
    assert await one_round(inbox) == ["a3"]


async def test_a_dropped_message_is_acknowledged_and_a_queued_one_only_when_ingest_settles_it() -> None:
    """A drop that stayed unacknowledged would hold one of the broker's inflight slots for good."""
    inbox, dropped = make({"a"}, noisy_per_round=1)
    settled: list[str] = []
    await inbox.put(msg("a", 0), lambda: settled.append("a0"))
    await inbox.put(msg("a", 1), lambda: settled.append("a1"))  # over the round's worth: dropped
    await inbox.put(msg("b", 0), lambda: settled.append("b0"))
    assert [k for k, _ in dropped] == ["a"] and settled == ["a1"]
    entries = [await inbox.get()]
    while not inbox.empty():
        entries.append(inbox.get_nowait())
    assert settled == ["a1"], "nothing queued is acknowledged before ingest settles it"
    for _, settle in entries:
        settle()
    assert sorted(settled) == ["a0", "a1", "b0"]
