"""The outbox on real SQLite files: order, coalescing, durability across reopen."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_agent import Outbox, Spool
from cleanroom_agent.messaging.spool import SpoolFull
from cleanroom_protocol import (
    Ack,
    AckResult,
    AgentState,
    Event,
    Kind,
    Status,
    verify,
)


def payload(text: str):  # type: ignore[no-untyped-def]
    return lambda seq: f"{text}:{seq}".encode()


def test_rows_come_out_in_seq_order_and_leave_only_when_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "agent.db")
    seqs = [spool.enqueue("t/events", payload(f"e{i}")) for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert [r.seq for r in spool.pending()] == seqs
    first = spool.first()
    assert first is not None and first.seq == seqs[0] and first.payload == f"e0:{seqs[0]}".encode()
    spool.delete(seqs[0])
    assert spool.first() is not None and spool.first().seq == seqs[1]  # type: ignore[union-attr]
    assert spool.count() == 4


def test_posture_and_status_coalesce_events_do_not(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "agent.db")
    p1 = spool.enqueue("t/posture", payload("p1"), coalesce_key="posture")
    e1 = spool.enqueue("t/events", payload("e1"))
    s1 = spool.enqueue("t/status", payload("s1"), retain=True, coalesce_key="status")
    e2 = spool.enqueue("t/events", payload("e2"))
    p2 = spool.enqueue("t/posture", payload("p2"), coalesce_key="posture")
    s2 = spool.enqueue("t/status", payload("s2"), retain=True, coalesce_key="status")
    rows = spool.pending()
    assert [r.seq for r in rows] == [e1, e2, p2, s2]
    assert p1 not in [r.seq for r in rows] and s1 not in [r.seq for r in rows]
    assert rows[-1].retain is True and rows[0].retain is False


def test_rows_and_seq_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    spool = Spool(db)
    a = spool.enqueue("t/events", payload("a"))
    b = spool.enqueue("t/events", payload("b"))
    spool.delete(a)
    spool.close()
    again = Spool(db)
    assert [r.seq for r in again.pending()] == [b]
    assert again.next_seq() > b  # the counter is durable: never reused after a restart
    assert again.enqueue("t/events", payload("c")) > b


def test_fresh_counter_starts_at_the_clock(tmp_path: Path) -> None:
    # A lost and recreated database still produces seqs above what a controller saw before.
    assert Spool(tmp_path / "a.db").next_seq() > 1_600_000_000_000


def test_wal_and_full_sync(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "agent.db")
    assert spool._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_failed_signing_leaves_nothing_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "agent.db")
    spool.enqueue("t/posture", payload("p1"), coalesce_key="posture")

    def boom(seq: int) -> bytes:
        raise ValueError("too large")

    with pytest.raises(ValueError, match="too large"):
        spool.enqueue("t/posture", boom, coalesce_key="posture")
    assert [r.payload[:2] for r in spool.pending()] == [b"p1"]  # the older posture was not coalesced away


def test_state_and_commands_are_kept_and_bounded(tmp_path: Path, monkeypatch: object) -> None:
    import cleanroom_agent.messaging.spool as spool_module

    spool = Spool(tmp_path / "agent.db")
    assert spool.get_state("x") is None
    spool.set_state("x", "1")
    spool.set_state("x", "2")
    assert spool.get_int("x") == 2
    spool_module.MAX_REMEMBERED_COMMANDS = 3  # type: ignore[misc]
    try:
        for i in range(5):
            spool.remember_command(f"c{i}", {"command_id": f"c{i}", "result": "ended"})
        assert spool.command_ack("c4") == {"command_id": "c4", "result": "ended"}
        assert spool.command_ack("c0") is None
    finally:
        spool_module.MAX_REMEMBERED_COMMANDS = 1000  # type: ignore[misc]
    spool.close()
    assert Spool(tmp_path / "agent.db").get_int("x") == 2


def test_outbox_signs_with_the_allocated_seq(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    outbox = Outbox(Spool(tmp_path / "agent.db"), agent_id="ep-1", key=key)
    seq = outbox.event(Event(kind="session.started", at=1.0, details={"session": "s-1-1"}))
    will_seq, will = outbox.will()
    status_seq = outbox.status(Status(state=AgentState.ONLINE, will_seq=will_seq))
    assert seq < will_seq < status_seq
    rows = outbox.spool.pending()
    assert [r.topic for r in rows] == ["cleanroom/v1/agents/ep-1/events", "cleanroom/v1/agents/ep-1/status"]
    pub = key.public_key()
    verdict = verify(rows[0].payload, public_key_for=lambda s: pub, expected_kind=Kind.EVENT)
    assert verdict.ok and verdict.seq == seq
    w = verify(will, public_key_for=lambda s: pub, last_seq=status_seq, will_seq=will_seq)
    assert w.ok and w.is_will


def test_a_full_outbox_counts_refused_events_and_reports_them_when_room_frees(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path / "agent.db", max_rows=3)
    outbox = Outbox(spool, agent_id="ep-1", key=key)
    seqs = [outbox.event(Event(kind="session.started", at=float(i))) for i in range(3)]
    assert None not in seqs
    assert outbox.event(Event(kind="launch.denied", at=3.0)) is None
    assert outbox.event(Event(kind="launch.denied", at=4.0)) is None
    assert spool.count() == 3
    # coalescing rows still fit: posture and status must keep flowing while events wait
    outbox.status(Status(state=AgentState.ONLINE))
    assert spool.count() == 4
    # the count survives a restart
    spool.close()
    spool = Spool(tmp_path / "agent.db", max_rows=3)
    outbox = Outbox(spool, agent_id="ep-1", key=key)
    for row in spool.pending()[:3]:
        spool.delete(row.seq)
    assert outbox.event(Event(kind="session.started", at=5.0)) is not None
    bodies = [
        verify(r.payload, public_key_for=lambda _s: key.public_key(), max_skew_s=None).body
        for r in spool.pending()
    ]
    kinds = [b.kind for b in bodies if isinstance(b, Event)]
    assert kinds[-2:] == ["spool.overflow", "session.started"]
    overflow = next(b for b in bodies if isinstance(b, Event) and b.kind == "spool.overflow")
    assert overflow.details == {"dropped": 2, "refused_total": 2}
    assert outbox.refused == 2


def test_a_sent_row_stays_until_a_watermark_lists_it_and_is_sent_again_when_found_missing(
    tmp_path: Path,
) -> None:
    """The broker's PUBACK only marks a row sent; the controller's watermark deletes it. A row sent a while
    ago and unlisted while a later seq was stored is due again; after a reconnect every unlisted row is."""
    spool = Spool(tmp_path / "agent.db")
    seqs = [spool.enqueue("t/events", lambda s: str(s).encode()) for _ in range(4)]
    for seq in seqs:
        row = spool.first()
        assert row is not None and row.seq == seq
        spool.mark_sent(seq, now=100.0)
    assert spool.first() is None and spool.unsent() == 0 and spool.count() == 4
    # the controller stored the 1st and the 3rd: the 2nd was lost on the way (4th: maybe still coming)
    assert spool.covered([(seqs[0], seqs[0]), (seqs[2], seqs[2])]) == 2
    assert spool.resend_gaps(seqs[2], sent_before=100.0) == 0, "not due yet: it may still be on its way"
    assert spool.resend_gaps(seqs[2], sent_before=105.0) == 1
    row = spool.first()
    assert row is not None and row.seq == seqs[1]
    spool.mark_sent(seqs[1], now=106.0)
    assert spool.resend_all() == 2  # reconnected: the 2nd and the 4th go out again, in seq order
    assert [r.seq for r in spool.pending()] == [seqs[1], seqs[3]] and spool.first().seq == seqs[1]  # type: ignore[union-attr]
    assert spool.covered([(seqs[0], seqs[3])]) == 2
    assert spool.count() == 0


def test_rows_waiting_for_a_watermark_count_against_the_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "agent.db", max_rows=2)
    for _ in range(2):
        seq = spool.enqueue("t/events", lambda s: b"e")
        spool.mark_sent(seq, now=1.0)
    with pytest.raises(SpoolFull):
        spool.enqueue("t/events", lambda s: b"e")
    spool.covered([(0, 2**62)])
    spool.enqueue("t/events", lambda s: b"e")


def test_a_full_spool_stays_full_until_watermarks_drain_it_to_the_low_water_mark(tmp_path: Path) -> None:
    """The real spool's level: full at its bound (the next event would be refused), still full above 90 %,
    drained at or below it; the listener hears each change once (it wakes posture and the fail-closed
    check)."""
    spool = Spool(tmp_path / "agent.db", max_rows=20)  # low water: 18 rows
    heard: list[bool] = []
    spool.on_level_change(heard.append)
    seqs = [spool.enqueue("t/events", lambda s: b"e") for _ in range(19)]
    assert not spool.full and heard == []
    seqs.append(spool.enqueue("t/events", lambda s: b"e"))
    assert spool.full and spool.low_rows == 18 and heard == [True]
    spool.covered([(seqs[0], seqs[0])])  # 19 rows: room for one, but still full
    assert spool.full
    spool.enqueue("t/events", lambda s: b"e")  # the room is used: rows already held are never dropped
    spool.covered([(seqs[1], seqs[2])])  # 18 rows: drained
    assert not spool.full and heard == [True, False]
    spool.close()
    for _ in range(2):
        Spool(tmp_path / "agent.db", max_rows=20).enqueue("t/events", lambda s: b"e")
    assert Spool(tmp_path / "agent.db", max_rows=20).full, "a spool full at a restart is full from the start"


def test_acks_refused_by_a_full_spool_are_counted_and_the_total_never_resets(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path / "agent.db", max_rows=10)
    outbox = Outbox(spool, agent_id="ep-1", key=key)
    seqs = [outbox.event(Event(kind="session.started", at=float(i))) for i in range(10)]
    assert outbox.ack(Ack(command_id="c1", result=AckResult.REJECTED)) is None  # not end_session's answer
    assert outbox.event(Event(kind="launch.denied", at=11.0)) is None
    assert outbox.refused == 2 and spool.count() == 10
    spool.covered([(min(s for s in seqs if s), max(s for s in seqs if s))])
    assert outbox.ack(Ack(command_id="c2", result=AckResult.NOT_FOUND)) is not None  # overflow reported first
    assert spool.count() == 2  # the spool.overflow event and the ack
    for i in range(8):
        assert outbox.event(Event(kind="session.started", at=20.0 + i)) is not None
    assert outbox.event(Event(kind="launch.denied", at=31.0)) is None
    spool.close()
    spool = Spool(tmp_path / "agent.db", max_rows=10)
    outbox = Outbox(spool, agent_id="ep-1", key=key)
    assert outbox.refused == 3, "the total survives a restart and is not reset by the overflow event"
    spool.covered([(0, 2**62)])
    assert outbox.event(Event(kind="session.started", at=40.0)) is not None
    bodies = [
        verify(r.payload, public_key_for=lambda _s: key.public_key(), max_skew_s=None).body
        for r in spool.pending()
    ]
    overflow = [b.details for b in bodies if isinstance(b, Event) and b.kind == "spool.overflow"]
    assert overflow == [{"dropped": 1, "refused_total": 3}]


def verified_bodies(spool: Spool, key: Ed25519PrivateKey) -> list[Event | Ack]:
    out: list[Event | Ack] = []
    for row in spool.pending():
        body = verify(row.payload, public_key_for=lambda _s: key.public_key(), max_skew_s=None).body
        if isinstance(body, Event | Ack):
            out.append(body)
    return out


def test_a_full_spool_keeps_a_reserve_for_the_record_of_ending_sessions(tmp_path: Path) -> None:
    """Once the bound is reached, ordinary events and acks are refused, but agent.fail_closed, session.ended
    and the acks of end_session go into the reserve (32 rows for a small spool), stored and signed like any
    row; a pending spool.overflow report does not stand in their way. The reserve is bounded: used up, the
    evidence is refused and counted too."""
    key = Ed25519PrivateKey.generate()
    spool = Spool(tmp_path / "agent.db", max_rows=10)
    outbox = Outbox(spool, agent_id="ep-1", key=key)
    assert spool.reserve_rows == 32
    for i in range(10):
        assert outbox.event(Event(kind="launch.denied", at=float(i))) is not None
    assert outbox.event(Event(kind="launch.denied", at=10.0)) is None  # full: refused, an overflow pending
    assert outbox.ack(Ack(command_id="c0", result=AckResult.REJECTED)) is None
    assert spool.full and outbox.refused == 2
    evidence = [
        outbox.event(Event(kind="agent.fail_closed", at=11.0, details={"reason": "spool_full"})),
        outbox.event(
            Event(kind="session.ended", at=12.0, details={"session": "s-1", "reason": "fail_closed"})
        ),
        outbox.ack(Ack(command_id="c1", result=AckResult.ENDED, sessions=["s-2"])),
        outbox.ack(Ack(command_id="c2", result=AckResult.NOT_FOUND)),
    ]
    assert None not in evidence and spool.count() == 14 and outbox.refused == 2
    stored = verified_bodies(spool, key)[-4:]
    assert [b.kind if isinstance(b, Event) else b.command_id for b in stored] == [
        "agent.fail_closed",
        "session.ended",
        "c1",
        "c2",
    ]
    assert not any(isinstance(b, Event) and b.kind == "spool.overflow" for b in verified_bodies(spool, key))
    # the rest of the reserve, then it is full too: evidence refused and counted like any event
    for i in range(28):
        assert outbox.event(Event(kind="session.ended", at=20.0 + i)) is not None
    assert spool.count() == 42
    assert outbox.event(Event(kind="agent.fail_closed", at=50.0)) is None
    assert outbox.ack(Ack(command_id="c3", result=AckResult.ENDED)) is None
    assert outbox.refused == 4 and spool.count() == 42
    # drained: the overflow report goes out first, with every refusal (evidence included)
    spool.covered([(0, 2**62)])
    assert not spool.full
    assert outbox.event(Event(kind="launch.denied", at=60.0)) is not None
    kinds = [b.kind for b in verified_bodies(spool, key) if isinstance(b, Event)]
    assert kinds == ["spool.overflow", "launch.denied"]
    overflow = next(b for b in verified_bodies(spool, key) if isinstance(b, Event))
    assert overflow.details == {"dropped": 4, "refused_total": 4}


def test_the_reserve_is_one_percent_of_the_bound_and_survives_a_restart(tmp_path: Path) -> None:
    """A spool reopened with its reserve in use is still full, admits evidence only up to the same limit."""
    spool = Spool(tmp_path / "agent.db", max_rows=5000)
    assert spool.reserve_rows == 50
    spool.close()
    spool = Spool(tmp_path / "agent.db", max_rows=10)
    for _ in range(10 + 32):
        spool.enqueue("t/events", lambda s: b"e", evidence=True)
    with pytest.raises(SpoolFull, match="bound 42"):
        spool.enqueue("t/events", lambda s: b"e", evidence=True)
    spool.close()
    spool = Spool(tmp_path / "agent.db", max_rows=10)
    assert spool.full
    with pytest.raises(SpoolFull, match="bound 10"):
        spool.enqueue("t/events", lambda s: b"e")
    with pytest.raises(SpoolFull, match="bound 42"):
        spool.enqueue("t/events", lambda s: b"e", evidence=True)
