"""What one sender can cost the controller, on a real SQLite file: a flood of forgeries is counted to the
message and audited in a handful of rows (also across a crash), a signed flood is rate limited without
junk that names another agent spending that agent's budget, one agent cannot open more than the cap of
sessions (nor be sent more end_session commands), and per-message work does not grow with an agent's
history."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import Store, Tracker, verify_chain
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.decisions.decide import MAX_OPEN_SESSIONS, EndSession
from cleanroom_controller.ingest.budgets import Limits
from cleanroom_controller.ingest.pipeline import Ingest, KeyCache, Outcome
from cleanroom_controller.store.sqlite import SqliteBackend
from cleanroom_protocol import Channel, Event, Kind, agent_topic
from tests.controller.helpers import Sender, enrol, posture, session, shipped_policy


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_ingest(
    store: Store, clock: Clock, *, limits: Limits | None = None, acts: list[EndSession] | None = None
) -> Ingest:
    recorder = Recorder(store, "controller:test")
    policy = shipped_policy()
    sink = acts.append if acts is not None else (lambda _: None)
    tracker = Tracker(store=store, recorder=recorder, policy=lambda: policy, act=sink)
    return Ingest(
        store=store,
        recorder=recorder,
        tracker=tracker,
        keys=KeyCache(store),
        max_skew_s=3600,  # the fake clock runs ahead of the messages' ts in some tests
        clock=clock,
        limits=limits,
    )


def summaries(store: Store, sender: str) -> list[dict]:
    return [e.data for e in store.audit_entries() if e.kind == "verdict.summary" and e.subject == sender]


def event(sender: Sender, kind: str = "clipboard.blocked", **details: object) -> bytes:
    return sender.seal(Kind.EVENT, Event(kind=kind, at=time.time(), details=details))


def events_topic(agent: str) -> str:
    return agent_topic(agent, Channel.EVENTS)


def test_a_flood_of_forgeries_is_counted_to_the_message_and_audited_once_per_window(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    a1, a2 = Sender("a1"), Sender("a2")
    enrol(store, "a1", a1.key)
    enrol(store, "a2", a2.key)
    clock = Clock(time.time())
    ingest = make_ingest(store, clock)
    forger = Sender("a1", Ed25519PrivateKey.generate())
    forged = [event(forger) for _ in range(200)]  # distinct messages, the same cost to verify
    flood = 10_000
    for i in range(0, flood, 500):  # 25 simulated seconds: three windows of 10 s
        batch = [(events_topic("a1"), forged[(i + k) % 200], False) for k in range(500)]
        batch.append((events_topic("a2"), event(a2), False))  # another device, accepted meanwhile
        outcomes = ingest.handle_batch(batch)
        assert outcomes.count(Outcome.REJECTED) == 500 and outcomes[-1] is Outcome.ACCEPTED
        clock.now += 1.25
    assert store.reject_counts()["a1"] == {"bad_signature": flood}  # live counts, per batch
    ingest.close()
    windows = summaries(store, "a1")
    # A window closes at the first batch 10 s after it opened: batches at 0..10 s, 11.25..21.25 s, the rest.
    assert [w["counts"] for w in windows] == [
        {"bad_signature": 4500},
        {"bad_signature": 4500},
        {"bad_signature": 1000},
    ]
    assert windows[0]["first"]["bad_signature"]["detail"] == "signature does not verify"
    entries = list(store.audit_entries())
    assert len(entries) < 3 + 3 * 20  # 3 summaries and a2's 20 verdicts with their decisions
    assert verify_chain(entries, store.audit_head()) is None


def test_a_crash_loses_no_count_and_the_next_start_audits_the_orphaned_window(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    a1 = Sender("a1")
    enrol(store, "a1", a1.key)
    clock = Clock(time.time())
    crashed = make_ingest(store, clock)
    crashed.handle_batch([(events_topic("a1"), b"{broken", False)] * 30)
    store.close()  # killed: no close(), its window persisted with the batch
    store = Store.open(tmp_path)
    clock.now += 5.0
    restarted = make_ingest(store, clock)
    restarted.tick()
    assert summaries(store, "a1") == []  # the crashed process might still be alive: not yet
    clock.now += 30.0
    restarted.tick()
    (orphan,) = summaries(store, "a1")
    assert orphan["counts"] == {"malformed": 30} and orphan["recovered"] is True
    assert store.reject_counts()["a1"] == {"malformed": 30}
    restarted.tick()  # written once
    assert len(summaries(store, "a1")) == 1


def test_a_signed_backlog_is_accepted_whole_and_junk_naming_b_never_spends_bs_budget(tmp_path: Path) -> None:
    """An agent replaying an outage's spool sends thousands of valid messages at once: every one was
    acknowledged and deleted from its outbox, so none may be refused for its rate (that would lose it)."""
    store = Store.open(tmp_path)
    a1, b = Sender("a1"), Sender("b")
    enrol(store, "a1", a1.key)
    enrol(store, "b", b.key)
    clock = Clock(time.time())
    ingest = make_ingest(store, clock)
    backlog = [(events_topic("a1"), event(a1), False) for _ in range(3000)]
    outcomes = ingest.handle_batch(backlog)
    assert outcomes.count(Outcome.ACCEPTED) == 3000, {o: outcomes.count(o) for o in set(outcomes)}
    assert store.reject_counts().get("a1", {}) == {}
    assert not ingest.budgets.noisy("a1", clock.now)
    # Forgeries on b's topic (the broker ACL would stop them; here it is missing) make b's topic noisy …
    forger = Sender("b", Ed25519PrivateKey.generate())
    junk = [(events_topic("b"), event(forger), False) for _ in range(300)]
    assert set(ingest.handle_batch(junk)) == {Outcome.REJECTED}
    assert ingest.budgets.noisy("b", clock.now)
    # … and are refused, while b's own signed messages are all accepted.
    assert set(ingest.handle_batch([(events_topic("b"), event(b), False) for _ in range(20)])) == {
        Outcome.ACCEPTED
    }


def test_forged_session_starts_open_at_most_the_cap_and_a_violation_ends_at_most_that_many(
    tmp_path: Path,
) -> None:
    """The issue's stolen key: 2,000 forged session.started events made 2,001 sessions and commands."""
    store = Store.open(tmp_path)
    thief = Sender("a1")
    enrol(store, "a1", thief.key)
    acts: list[EndSession] = []
    ingest = make_ingest(store, Clock(time.time()), acts=acts)
    started = [
        (events_topic("a1"), event(thief, "session.started", session=f"s-{i}", pid=1000 + i), False)
        for i in range(2000)
    ]
    for i in range(0, len(started), 500):
        assert set(ingest.handle_batch(started[i : i + 500])) == {Outcome.ACCEPTED}
    assert store.count_open_sessions("a1") == MAX_OPEN_SESSIONS
    refused = [e.data for e in store.audit_entries() if e.kind == "limit.refused"]
    assert len(refused) == 2000 - MAX_OPEN_SESSIONS and refused[0]["what"] == "sessions"
    # A violating posture that reports 256 sessions: the open ones stay, none beyond the cap is added.
    reported = tuple(session(f"s-{i}", pid=1000 + i) for i in range(256))
    violating = thief.seal(Kind.POSTURE, posture("a1", denied=("scrot",), sessions=reported))
    assert ingest.handle(agent_topic("a1", Channel.POSTURE), violating) is Outcome.ACCEPTED
    assert len(acts) == MAX_OPEN_SESSIONS
    assert {a.session_id for a in acts} == {f"s-{i}" for i in range(MAX_OPEN_SESSIONS)}
    assert store.count_open_sessions("a1") == MAX_OPEN_SESSIONS


def test_per_message_work_does_not_grow_with_the_agents_history(tmp_path: Path) -> None:
    """SQLite's own instruction count (a progress handler) for the same messages from an agent with 2,000
    finished sessions and from a fresh one, both in violation with one running session."""
    store = Store.open(tmp_path)
    old, new = Sender("old"), Sender("new")
    enrol(store, "old", old.key)
    enrol(store, "new", new.key)
    ingest = make_ingest(store, Clock(time.time()))
    history = []
    for i in range(2000):
        history.append((events_topic("old"), event(old, "session.started", session=f"h-{i}"), False))
        history.append((events_topic("old"), event(old, "session.ended", session=f"h-{i}"), False))
    for i in range(0, len(history), 500):
        ingest.handle_batch(history[i : i + 500])
    assert store.count_open_sessions("old") == 0

    def steps(agent: Sender) -> int:
        topic = agent_topic(agent.agent, Channel.POSTURE)
        running = (session("s-1", pid=77),)
        messages = [
            (
                topic,
                agent.seal(Kind.POSTURE, posture(agent.agent, denied=("scrot",), sessions=running)),
                False,
            ),
            (topic, agent.seal(Kind.POSTURE, posture(agent.agent, denied=("obs",), sessions=running)), False),
            (events_topic(agent.agent), event(agent), False),
            (events_topic(agent.agent), event(agent, "session.started", session="s-2"), False),
        ]
        count = [0]

        def tick() -> int:
            count[0] += 1
            return 0

        assert isinstance(store._db, SqliteBackend)  # counts SQLite's virtual machine steps
        store._db.connection.set_progress_handler(tick, 10)
        try:
            assert set(ingest.handle_batch(messages)) == {Outcome.ACCEPTED}
        finally:
            store._db.connection.set_progress_handler(None, 0)
        return count[0]

    fresh, long_history = steps(new), steps(old)
    assert long_history <= fresh * 1.25, (long_history, fresh)
