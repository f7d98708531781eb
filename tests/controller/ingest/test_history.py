"""History is not stale: a message signed long ago (an endpoint's spool after a long outage) is stored and
marked late, never refused for its age; replays are still refused by seq, and the endpoint's current state
is judged only from fresh reports. Real SQLite store, real signatures."""

from __future__ import annotations

import time
from pathlib import Path

from cleanroom_controller import Store
from cleanroom_controller.ingest.pipeline import Ingest, Outcome
from cleanroom_controller.models import Condition
from cleanroom_protocol import Channel, Event, Kind, Severity, agent_topic
from tests.controller.helpers import Sender, enrol, posture, wired_ingest

HOUR = 3600.0


def make(tmp_path: Path) -> tuple[Store, Ingest, Sender]:
    store = Store.open(tmp_path)
    a1 = Sender("a1")
    enrol(store, "a1", a1.key)
    return (
        store,
        wired_ingest(store),
        a1,
    )


def test_an_event_spooled_an_hour_ago_is_stored_marked_late_and_reported_in_the_watermark(
    tmp_path: Path,
) -> None:
    store, ingest, a1 = make(tmp_path)
    sealed_at = time.time() - HOUR
    old = a1.seal(
        Kind.EVENT,
        Event(kind="agent.fail_closed", at=sealed_at, severity=Severity.CRITICAL),
        ts=sealed_at,
    )
    assert ingest.handle(agent_topic("a1", Channel.EVENTS), old) is Outcome.ACCEPTED
    assert ingest.late == 1
    (row,) = store.events(agent="a1")
    assert row["kind"] == "agent.fail_closed" and row["seq"] == a1.seq
    assert row["received"] - row["ts"] > HOUR - 60, "how late it came is kept (received - ts)"
    (mark,) = ingest.watermarks.take()
    assert (mark.agent, mark.seq, mark.stored) == ("a1", a1.seq, [(a1.seq, a1.seq)])
    assert store.reject_counts() == {}


def test_a_replay_of_history_is_still_refused_by_its_seq(tmp_path: Path) -> None:
    _, ingest, a1 = make(tmp_path)
    topic = agent_topic("a1", Channel.EVENTS)
    at = time.time() - HOUR
    assert (
        ingest.handle(topic, a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=at), ts=at)) is Outcome.ACCEPTED
    )
    assert ingest.handle(topic, a1.seal(Kind.EVENT, Event(kind="usb.allowed", at=at), ts=at, seq=1)) is (
        Outcome.REJECTED
    )
    assert ingest.counts["replayed"] == 1


def test_a_late_posture_is_kept_as_evidence_but_never_judged_as_the_current_state(tmp_path: Path) -> None:
    store, ingest, a1 = make(tmp_path)
    topic = agent_topic("a1", Channel.POSTURE)
    assert ingest.handle(topic, a1.seal(Kind.POSTURE, posture("a1"))) is Outcome.ACCEPTED
    assert store.endpoint("a1").condition is Condition.COMPLIANT
    # A posture from an hour ago showing a denied process: stored (the digest, the watermark), not judged.
    old = a1.seal(Kind.POSTURE, posture("a1", denied=("scrot",)), ts=time.time() - HOUR)
    assert ingest.handle(topic, old) is Outcome.ACCEPTED
    assert ingest.late == 1
    assert store.message_digest("a1", a1.seq) is not None
    ep = store.endpoint("a1")
    assert ep.condition is Condition.COMPLIANT and ep.reasons == ()
    # The next fresh posture is what judges the endpoint.
    assert ingest.handle(topic, a1.seal(Kind.POSTURE, posture("a1", denied=("scrot",)))) is Outcome.ACCEPTED
    assert store.endpoint("a1").reasons == ("denied_process:scrot",)


def test_a_skipped_message_resent_below_the_last_accepted_seq_is_stored_not_refused_as_replayed(
    tmp_path: Path,
) -> None:
    """The agent resends what a later stored seq shows was lost; its seq is below the last accepted one, but
    it was never stored: history filling a gap, not a replay. A real replay (stored bytes) stays a duplicate,
    other bytes under a stored seq stay refused."""
    store, ingest, a1 = make(tmp_path)
    topic = agent_topic("a1", Channel.EVENTS)
    skipped = a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=time.time()))  # lost on the way
    assert ingest.handle(topic, a1.seal(Kind.EVENT, Event(kind="usb.allowed", at=time.time()))) is (
        Outcome.ACCEPTED
    )
    assert ingest.handle(topic, skipped) is Outcome.ACCEPTED
    assert sorted(e["seq"] for e in store.events(agent="a1")) == [1, 2]
    assert ingest.handle(topic, skipped) is Outcome.DUPLICATE
    forged_gap = a1.seal(Kind.EVENT, Event(kind="usb.allowed", at=time.time()), seq=1)
    assert ingest.handle(topic, forged_gap) is Outcome.REJECTED
    old = a1.seal(Kind.EVENT, Event(kind="usb.allowed", at=time.time()), seq=0, ts=time.time() - 2 * 86400)
    assert ingest.handle(topic, old) is Outcome.REJECTED, "older than the digests are kept: maybe a replay"
