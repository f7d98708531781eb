"""Ingest against a real Mosquitto and the real daemon: each bad message is rejected, counted and audited
(summed up per sender per window: ``verdict.summary``), nothing crashes, duplicates are stored once, a
retained status replayed after a restart is not an attack."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import Store, Tracker, verify_chain
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.ingest.pipeline import Ingest, KeyCache, Outcome
from cleanroom_protocol import AgentState, Channel, Event, Kind, Status
from tests.controller.harness import agent_client, publish, running_controller, until
from tests.controller.helpers import Sender, covered, enrol, posture, session, shipped_policy, wired_ingest
from tests.support.mosquitto import Mosquitto


def summaries(store: Store, sender: str) -> list[dict]:
    """The ``verdict.summary`` entries of ``sender``: one per window it had messages not accepted in."""
    return [e.data for e in store.audit_entries() if e.kind == "verdict.summary" and e.subject == sender]


def summed(store: Store, sender: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for data in summaries(store, sender):
        for reason, n in data["counts"].items():
            total[reason] = total.get(reason, 0) + n
    return total


def reopened(data_dir: Path) -> Store:
    return Store.open(data_dir)


async def test_bad_messages_are_rejected_counted_and_audited(mosquitto: Mosquitto, tmp_path: Path) -> None:
    a1 = Sender("a1")
    async with (
        running_controller(mosquitto, tmp_path / "c", senders=(a1,)) as run,
        agent_client(mosquitto) as c,
    ):
        good = a1.seal(Kind.POSTURE, posture("a1"))
        await publish(c, "a1", Channel.POSTURE, good)
        await until(
            lambda: run.store.endpoint("a1").compliant is True, timeout=5, what="first posture accepted"
        )

        forger = Sender("a1", Ed25519PrivateKey.generate())
        forger.seq = 100
        await publish(c, "a1", Channel.POSTURE, forger.seal(Kind.POSTURE, posture("a1")))  # forged signature
        replay = a1.seal(Kind.POSTURE, posture("a1"), seq=1)  # seq 1 again, new bytes
        await publish(c, "a1", Channel.POSTURE, replay)
        await publish(c, "a1", Channel.POSTURE, b"{not json")  # malformed
        await publish(c, "a1", Channel.POSTURE, b"x" * (65 * 1024))  # oversized
        mallory = Sender("mallory")
        await publish(c, "mallory", Channel.POSTURE, mallory.seal(Kind.POSTURE, posture("mallory")))
        await publish(c, "a1", Channel.EVENTS, a1.seal(Kind.POSTURE, posture("a1")))  # wrong kind for topic
        # (an old ts is history, not a reject: tests/controller/ingest/test_history.py)

        expected = {"bad_signature": 1, "replayed": 1, "malformed": 2, "too_large": 1}
        await until(
            lambda: run.store.reject_counts().get("a1") == expected, timeout=5, what=f"a1 rejects {expected}"
        )
        await until(
            lambda: run.store.reject_counts().get("(unenrolled)") == {"unknown_sender": 1},
            timeout=5,
            what="unknown sender counted",
        )
        # Still alive and accepting: the next good message goes through.
        await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture("a1", denied=("scrot",))))
        await until(
            lambda: run.store.endpoint("a1").compliant is False, timeout=5, what="next posture accepted"
        )
        assert run.store.endpoint("a1").reasons == ("denied_process:scrot",)
        assert summaries(run.store, "a1") == []  # its window is still open (10 s)
    # Audited on shutdown: one summary per sender, counts by reason, the first of each reason in detail.
    store = reopened(tmp_path / "c")
    (a1_summary,) = summaries(store, "a1")
    assert a1_summary["counts"] == expected and a1_summary["total"] == 5
    assert a1_summary["first"]["bad_signature"]["detail"] == "signature does not verify"
    assert a1_summary["first"]["too_large"]["bytes"] == 65 * 1024
    (stranger,) = summaries(store, "(unenrolled)")
    assert stranger["counts"] == {"unknown_sender": 1}
    assert stranger["first"]["unknown_sender"]["topic"].endswith("/mallory/posture")
    # Exactly the two good postures (seq 1 and 3) are covered by a batch; none of the refused ones.
    assert sorted(covered(store)) == [("a1", 1, "posture"), ("a1", 3, "posture")]
    assert verify_chain(list(store.audit_entries()), store.audit_head()) is None


async def test_duplicates_are_stored_once(mosquitto: Mosquitto, tmp_path: Path) -> None:
    a1 = Sender("a1")
    async with (
        running_controller(mosquitto, tmp_path / "c", senders=(a1,)) as run,
        agent_client(mosquitto) as c,
    ):
        event = a1.seal(Kind.EVENT, Event(kind="clipboard.blocked", at=time.time(), blocked=True))
        for _ in range(3):  # what a QoS 1 redelivery looks like: the same bytes again
            await publish(c, "a1", Channel.EVENTS, event)
        await until(
            lambda: run.controller.ingest.counts["duplicate"] == 2, timeout=5, what="two duplicates seen"
        )
        assert [(e["agent"], e["seq"]) for e in run.store.events()] == [("a1", 1)]
        assert run.store.reject_counts() == {}
    store = reopened(tmp_path / "c")
    assert summed(store, "a1") == {"duplicate": 2}  # summed up, not counted as rejects
    assert covered(store) == [("a1", 1, "event")]  # the audit covers it once


async def test_will_and_retained_status_after_restart(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The Will is published here by the test (same signed bytes the broker would deliver on a crash)."""
    a1 = Sender("a1")
    will_seq = 1
    a1.seq = 1
    will = a1.seal(Kind.STATUS, Status(state=AgentState.OFFLINE, reason="will"), seq=will_seq)
    data = tmp_path / "c"
    async with running_controller(mosquitto, data, senders=(a1,)) as run, agent_client(mosquitto) as c:
        online = a1.seal(Kind.STATUS, Status(state=AgentState.ONLINE, will_seq=will_seq))
        await publish(c, "a1", Channel.STATUS, online, retain=True)
        await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture("a1")))
        await until(
            lambda: run.store.endpoint("a1").compliant is True, timeout=5, what="online and compliant"
        )
        assert run.store.endpoint("a1").will_seq == will_seq
        await publish(c, "a1", Channel.STATUS, will, retain=True)
        await until(
            lambda: run.store.endpoint("a1").condition.value == "offline", timeout=5, what="offline by will"
        )
        assert run.store.endpoint("a1").last_seq == 3
    # Restart: the broker replays the retained Will; it is recognised, recorded, not counted.
    async with running_controller(mosquitto, data) as run:
        await until(
            lambda: run.controller.ingest.counts["duplicate"], timeout=5, what="retained will seen again"
        )
        assert run.store.reject_counts() == {}
        assert run.store.endpoint("a1").condition.value == "offline"
    store = reopened(data)
    (summary,) = summaries(store, "a1")
    assert summary["counts"] == {"duplicate": 1}
    assert summary["first"]["duplicate"]["retained"] is True
    assert summary["first"]["duplicate"]["seq"] == will_seq


async def test_retained_status_replayed_after_restart_is_expected(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    a1 = Sender("a1")
    data = tmp_path / "c"
    async with running_controller(mosquitto, data, senders=(a1,)) as run, agent_client(mosquitto) as c:
        online = a1.seal(Kind.STATUS, Status(state=AgentState.ONLINE, will_seq=None))
        await publish(c, "a1", Channel.STATUS, online, retain=True)
        await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture("a1")))
        await until(lambda: run.store.endpoint("a1").last_seq == 2, timeout=5, what="both accepted")
    # The broker hands the retained online status (seq 1 < last accepted 2) to the restarted controller:
    # the same bytes it accepted before, so a duplicate, recorded and not counted.
    async with running_controller(mosquitto, data) as run:
        await until(
            lambda: run.controller.ingest.counts["duplicate"],
            timeout=5,
            what="retained status seen as a duplicate",
        )
        assert run.store.reject_counts() == {}
    store = reopened(data)
    (summary,) = summaries(store, "a1")
    assert summary["counts"] == {"duplicate": 1} and summary["first"]["duplicate"]["retained"] is True


def test_retained_status_never_seen_but_older_is_recorded_not_counted(tmp_path: Path) -> None:
    """E.g. accepted by another controller of a shared-subscription group, or before a database restore."""
    store = Store.open(tmp_path)
    a1 = Sender("a1")
    enrol(store, "a1", a1.key)
    ingest = wired_ingest(store)
    old_status = a1.seal(Kind.STATUS, Status(state=AgentState.ONLINE))
    topic = "cleanroom/v1/agents/a1/"
    assert ingest.handle(topic + "posture", a1.seal(Kind.POSTURE, posture("a1"))) is Outcome.ACCEPTED
    assert ingest.handle(topic + "status", old_status, retained=True) is Outcome.OLD_STATUS
    assert store.reject_counts() == {}
    assert ingest.handle(topic + "status", old_status, retained=False) is Outcome.REJECTED
    assert store.reject_counts() == {"a1": {"replayed": 1}}
    # A Will of an earlier connection arriving late (its seq is not the announced one) is not an attack.
    superseded = a1.seal(Kind.STATUS, Status(state=AgentState.OFFLINE, reason="will"), seq=0)
    assert ingest.handle(topic + "status", superseded) is Outcome.OLD_STATUS
    assert store.reject_counts() == {"a1": {"replayed": 1}}
    assert store.endpoint("a1").condition.value == "compliant"
    # Garbage never raises.
    for junk in (b"", b"\xff\xfe", b"[]", b'{"v":1}', b"null"):
        assert ingest.handle(topic + "events", junk) is Outcome.REJECTED
    assert ingest.handle("cleanroom/v1/agents/a1/commands", b"{}") is Outcome.REJECTED
    assert ingest.handle("elsewhere", b"{}") is Outcome.REJECTED
    ingest.close()
    (summary,) = summaries(store, "a1")
    assert summary["counts"] == {"old_status": 2, "replayed": 1, "malformed": 5}
    assert summary["first"]["old_status"]["expected"] == "retained"
    assert summaries(store, "(topic)")[0]["counts"] == {"malformed": 2}


def _ingest(store: Store, *, shared: bool = False, acts: list | None = None) -> tuple[Ingest, Tracker]:
    recorder = Recorder(store, "controller:test")
    policy = shipped_policy()
    sink = acts.append if acts is not None else (lambda _: None)
    tracker = Tracker(store=store, recorder=recorder, policy=lambda: policy, act=sink)
    keys = KeyCache(store)
    return Ingest(
        store=store, recorder=recorder, tracker=tracker, keys=keys, max_skew_s=300, shared=shared
    ), tracker


def test_a_batch_is_one_transaction_and_a_bug_rolls_back_only_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(tmp_path)
    a1, a2 = Sender("a1"), Sender("a2")
    enrol(store, "a1", a1.key)
    enrol(store, "a2", a2.key)
    acts: list = []
    ingest, tracker = _ingest(store, acts=acts)
    reader = Store.open(tmp_path)  # another connection sees nothing until the batch commits
    real_on_event = tracker.on_event

    def buggy_on_event(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(tracker, "on_event", buggy_on_event)
    items = [
        (
            "cleanroom/v1/agents/a1/posture",
            a1.seal(Kind.POSTURE, posture("a1", sessions=(session(),))),
            False,
        ),
        ("cleanroom/v1/agents/a2/events", a2.seal(Kind.EVENT, Event(kind="x", at=time.time())), False),
        (
            "cleanroom/v1/agents/a1/posture",
            a1.seal(Kind.POSTURE, posture("a1", denied=("scrot",), sessions=(session(),))),
            False,
        ),
    ]
    seen_mid_batch: list[int] = []

    def watched():
        for i, item in enumerate(items):
            if i == 2:
                seen_mid_batch.append(len(list(reader.audit_entries())))
            yield item

    outcomes = ingest.handle_batch(watched())
    monkeypatch.setattr(tracker, "on_event", real_on_event)
    assert outcomes == [Outcome.ACCEPTED, Outcome.REJECTED, Outcome.ACCEPTED]
    assert seen_mid_batch == [0]  # the batch was not committed yet
    kinds = [e.kind for e in reader.audit_entries()]
    assert kinds == ["session", "decision", "ingest.error", "decision"]
    ingest.sealer.seal()  # what the next batch or tick does: one entry covers both accepted postures
    assert covered(reader) == [("a1", 1, "posture"), ("a1", 2, "posture")]  # not the rolled-back event
    assert reader.events() == []  # the buggy message left nothing behind
    assert [a.session_id for a in acts] == ["s-100-1"]
    assert reader.endpoint("a1").reasons == ("denied_process:scrot",)
    assert verify_chain(list(reader.audit_entries()), reader.audit_head()) is None


def test_shared_group_replay_rule_is_per_process_and_state_only_moves_forward(tmp_path: Path) -> None:
    """Two ingests on one database, as two processes of a share group: the broker deals a1's seqs 1..4
    round-robin, and each process finishes its share in its own time."""
    a1 = Sender("a1")
    store_p, store_q = Store.open(tmp_path), Store.open(tmp_path)
    enrol(store_p, "a1", a1.key)
    p, _ = _ingest(store_p, shared=True)
    q, _ = _ingest(store_q, shared=True)
    topic = "cleanroom/v1/agents/a1/posture"
    m1 = a1.seal(Kind.POSTURE, posture("a1"))
    m2 = a1.seal(Kind.POSTURE, posture("a1", denied=("scrot",)))
    m3 = a1.seal(Kind.POSTURE, posture("a1", denied=("obs",)))
    m4 = a1.seal(Kind.POSTURE, posture("a1"))
    assert q.handle(topic, m2) is Outcome.ACCEPTED
    assert q.handle(topic, m4) is Outcome.ACCEPTED
    # p lags: its seqs 1 and 3 are below what q accepted, but above what p accepted: not replays.
    assert p.handle(topic, m1) is Outcome.ACCEPTED
    assert p.handle(topic, m3) is Outcome.ACCEPTED
    ep = store_p.endpoint("a1")
    assert (ep.last_seq, ep.condition.value, ep.reasons) == (4, "compliant", ())  # m4 stands
    # A redelivery of what the other process accepted is a duplicate; other bytes with that seq a replay.
    assert p.handle(topic, m2) is Outcome.DUPLICATE
    forged_reuse = a1.seal(Kind.POSTURE, posture("a1", denied=("anydesk",)), seq=4)
    assert p.handle(topic, forged_reuse) is Outcome.REJECTED
    # Within one process the usual rule holds.
    assert p.handle(topic, a1.seal(Kind.POSTURE, posture("a1"), seq=2)) is Outcome.REJECTED
    assert store_p.reject_counts() == {"a1": {"replayed": 2}}
    assert store_p.endpoint("a1").reasons == ()


def test_signature_first_then_sequence_equals_protocol_verify() -> None:
    """Ingest splits verify: signature before the write lock, seq/ts/will under it. Same verdicts."""
    from cleanroom_protocol import check_sequence, verify

    a1 = Sender("a1")
    now = time.time()
    messages = [
        a1.seal(Kind.POSTURE, posture("a1"), seq=5),
        a1.seal(Kind.POSTURE, posture("a1"), seq=5, ts=now - 3600),
        a1.seal(Kind.STATUS, Status(state=AgentState.OFFLINE, reason="will"), seq=3, ts=now - 3600),
        a1.seal(Kind.STATUS, Status(state=AgentState.ONLINE), seq=3),
        Sender("a1").seal(Kind.POSTURE, posture("a1"), seq=9),  # another key: bad signature
        b"{}",
    ]
    for raw in messages:
        for last_seq in (None, 2, 5, 7):
            for will_seq in (None, 3):
                full = verify(
                    raw,
                    public_key_for=lambda _: a1.key.public_key(),
                    last_seq=last_seq,
                    now=now,
                    max_skew_s=300,
                    will_seq=will_seq,
                    expected_sender="a1",
                )
                signed = verify(
                    raw,
                    public_key_for=lambda _: a1.key.public_key(),
                    max_skew_s=None,
                    expected_sender="a1",
                )
                split = check_sequence(signed, last_seq=last_seq, will_seq=will_seq, now=now, max_skew_s=300)
                assert (split.status, split.is_will, split.detail) == (full.status, full.is_will, full.detail)
