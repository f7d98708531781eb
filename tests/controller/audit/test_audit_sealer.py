"""The Merkle sealer through real ingest: transactional across a commit that fails and is retried, and each
``verdict.batch`` entry recording how many of its messages came late.

A failing commit is a real one: the SQLite write-ahead log made immutable (``chattr +i``, needs root, as CI
runs), so ``COMMIT`` fails with an I/O error, as on a full or failing disk, until it is lifted; the batch is
then handed again, as the daemon's ingest loop does."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cleanroom_controller import Store, Tracker
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.audit.sealer import BATCH_KIND, SealPolicy, Waiting
from cleanroom_controller.audit.verify import verify_store
from cleanroom_controller.ingest.pipeline import Ingest, KeyCache, Outcome
from cleanroom_protocol import Ack, AckResult, Channel, Event, Kind, Status, agent_topic
from tests.conftest import StoreOpener
from tests.controller.helpers import Sender, covered, enrol, posture, shipped_policy

EVENTS = agent_topic("a1", Channel.EVENTS)
HOUR = 3600.0


def make(store: Store, policy: SealPolicy) -> tuple[Ingest, Sender]:
    a1 = Sender("a1")
    enrol(store, "a1", a1.key)
    recorder = Recorder(store, "controller:test")
    rules = shipped_policy()
    tracker = Tracker(store=store, recorder=recorder, policy=lambda: rules, act=lambda _: None)
    ingest = Ingest(
        store=store, recorder=recorder, tracker=tracker, keys=KeyCache(store), max_skew_s=300, seal=policy
    )
    return ingest, a1


def events(a1: Sender, n: int) -> list[tuple[str, bytes, bool]]:
    return [(EVENTS, a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=time.time())), False) for _ in range(n)]


@contextmanager
def commits_failing(store: Store) -> Iterator[None]:
    wal = store.path.with_name(store.path.name + "-wal")
    assert wal.exists(), "WAL mode: the log exists once something was written"
    subprocess.run(["chattr", "+i", str(wal)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(wal)], check=True)


def batch_entries(store: Store) -> list[dict[str, object]]:
    return [e.data for e in store.audit_entries() if e.kind == BATCH_KIND]


def assert_covered_once(store: Store, sent: int) -> None:
    """Counted on both sides: the seqs sent, and every leaf of every batch entry (a leaf twice shows twice)."""
    assert sorted(covered(store)) == [("a1", seq, "event") for seq in range(1, sent + 1)]
    report = verify_store(store)
    assert report.ok, report.problem


def test_a_failed_commit_is_not_counted_twice_by_the_sealer(tmp_path: Path) -> None:
    """Without the undo the retried messages count twice (7 + 3 waiting, not 4 + 3) and the sealer seals
    early, before the policy's 10 messages."""
    store = Store.open(tmp_path)
    ingest, a1 = make(store, SealPolicy(max_leaves=10, max_age_s=3600))
    ingest.handle_batch(events(a1, 4))
    before = ingest.sealer.waiting
    assert before.count == 4
    failing = events(a1, 3)
    with commits_failing(store), pytest.raises(Exception, match="I/O"):
        ingest.handle_batch(failing)
    assert ingest.sealer.waiting == before, "the failed batch's messages are not waiting: they are gone"
    assert ingest.handle_batch(failing) == [Outcome.ACCEPTED] * 3  # the retry
    assert ingest.sealer.waiting.count == 7
    assert batch_entries(store) == [], "7 of 10: not due"
    ingest.handle_batch(events(a1, 3))
    assert [d["count"] for d in batch_entries(store)] == [10]
    assert ingest.sealer.waiting == Waiting()
    assert_covered_once(store, 10)


def test_a_failed_commit_that_sealed_leaves_its_waiting_messages_waiting(tmp_path: Path) -> None:
    """The failed batch reached the policy and sealed inside its transaction, which then did not commit:
    without the undo the sealer believes nothing waits, and the 8 stored before wait uncovered for a tick."""
    store = Store.open(tmp_path)
    ingest, a1 = make(store, SealPolicy(max_leaves=10, max_age_s=3600))
    ingest.handle_batch(events(a1, 8))
    before = ingest.sealer.waiting
    failing = events(a1, 3)
    with commits_failing(store), pytest.raises(Exception, match="I/O"):
        ingest.handle_batch(failing)
    assert ingest.sealer.waiting == before
    assert batch_entries(store) == [], "the seal was rolled back with its batch"
    ingest.handle_batch(failing)
    assert [d["count"] for d in batch_entries(store)] == [11], "sealed at the retry, the 8 with the 3"
    assert_covered_once(store, 11)


def test_a_failed_seal_at_a_tick_or_shutdown_is_retried_and_covers_once(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ingest, a1 = make(store, SealPolicy(max_leaves=1000, max_age_s=0.0))
    ingest.sealer.policy = SealPolicy(max_leaves=1000, max_age_s=3600)  # nothing sealed by the batches
    ingest.handle_batch(events(a1, 5))
    before = ingest.sealer.waiting
    with commits_failing(store), pytest.raises(Exception, match="I/O"):
        ingest.sealer.seal_all()
    assert ingest.sealer.waiting == before
    assert ingest.sealer.seal_all() == 1
    assert_covered_once(store, 5)


def test_each_batch_entry_records_how_many_of_its_messages_came_late(open_store: StoreOpener) -> None:
    """Postures, statuses, acks and events signed an hour ago (a spool emptied after an outage) are stored
    with their envelope ts and counted as late by the entry that covers them; fresh ones are not; a message
    signed in the future beyond the window is counted as ahead. Real store on SQLite and PostgreSQL."""
    store = open_store()
    ingest, a1 = make(store, SealPolicy(max_leaves=1000, max_age_s=3600))
    now = time.time()
    ack = Ack(command_id="c1", result=AckResult.ENDED)
    items = [
        (agent_topic("a1", Channel.POSTURE), a1.seal(Kind.POSTURE, posture("a1"), ts=now - HOUR)),
        (agent_topic("a1", Channel.STATUS), a1.seal(Kind.STATUS, Status(state="online"), ts=now - 2 * HOUR)),
        (agent_topic("a1", Channel.ACKS), a1.seal(Kind.ACK, ack, ts=now - 600)),
        (EVENTS, a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=now - 900), ts=now - 900)),
        (agent_topic("a1", Channel.POSTURE), a1.seal(Kind.POSTURE, posture("a1"))),  # fresh
        (agent_topic("a1", Channel.POSTURE), a1.seal(Kind.POSTURE, posture("a1"), ts=now + 900)),  # ahead
    ]
    outcomes = ingest.handle_batch([(topic, payload, False) for topic, payload in items])
    assert outcomes == [Outcome.ACCEPTED] * 6
    ingest.close()
    (data,) = batch_entries(store)
    assert data["count"] == 6 and data["late"] == 4 and data["ahead"] == 1
    assert 2 * HOUR - 5 < float(data["max_late_s"]) <= 2 * HOUR + 60  # type: ignore[arg-type]
    # Fresh traffic seals entries that say so.
    ingest.handle_batch(events(a1, 2))
    ingest.close()
    assert batch_entries(store)[1] == batch_entries(store)[1] | {"late": 0, "ahead": 0, "max_late_s": 0.0}
