"""The store on both backends (every test runs on SQLite and on a real PostgreSQL: ``open_store``): durable
seq, enrolment, events once per (agent, seq), reject counts, upserts, the append-only audit table, and one
audit chain when two processes append at once."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import (
    AgentExistsError,
    CommandRecord,
    CommandState,
    Condition,
    EndpointState,
    SessionRecord,
    SessionState,
    verify_chain,
)
from cleanroom_protocol import fingerprint, public_key_pem
from tests.conftest import StoreOpener
from tests.support.wait import wait_for


def test_wal_and_durable_seq(open_store: StoreOpener) -> None:
    store = open_store()
    if store.dialect == "sqlite":
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [store.next_seq() for _ in range(3)] == [1, 2, 3]
    store.close()
    assert open_store().next_seq() == 4


def test_enrolment_is_idempotent_and_refuses_another_key(open_store: StoreOpener) -> None:
    store = open_store()
    key = Ed25519PrivateKey.generate()
    assert store.add_agent("a1", public_key_pem(key), fingerprint(key), time.time())
    assert not store.add_agent("a1", public_key_pem(key), fingerprint(key), time.time())
    other = Ed25519PrivateKey.generate()
    with pytest.raises(AgentExistsError):
        store.add_agent("a1", public_key_pem(other), fingerprint(other), time.time())
    assert [e.agent for e in store.endpoints()] == ["a1"]


def test_events_are_stored_once(open_store: StoreOpener) -> None:
    store = open_store()
    args = {"kind": "session.started", "ts": 1.0, "at": 1.0, "severity": "info", "blocked": False, "now": 2.0}
    assert store.add_event("a1", 7, details={"session": "s"}, **args)
    assert not store.add_event("a1", 7, details={"session": "s"}, **args)
    assert [(e["agent"], e["seq"], e["kind"]) for e in store.events()] == [("a1", 7, "session.started")]


def test_endpoint_roundtrip_and_reject_counts(open_store: StoreOpener) -> None:
    store = open_store()
    ep = EndpointState(
        "a1", Condition.VIOLATION, True, False, ("denied_process:scrot",), 5.0, 9, 4, "enforce"
    )
    store.save_endpoint(ep, posture='{"x": 1}')
    assert store.endpoint("a1") == ep
    store.count_reject("a1", "bad_signature", 1.0)
    store.count_reject("a1", "bad_signature", 2.0)
    store.count_reject("a1", "replayed", 2.0)
    assert store.reject_counts() == {"a1": {"bad_signature": 2, "replayed": 1}}


def test_commands_roundtrip(open_store: StoreOpener) -> None:
    store = open_store()
    c = CommandRecord("c1", "a1", "s1", "end_session", "violation", CommandState.PENDING, created=1.0)
    store.save_command(c)
    assert store.commands(CommandState.PENDING) == [c]
    assert store.command("c1") == c


def test_second_connection_sees_committed_state(open_store: StoreOpener) -> None:
    store = open_store()
    store.append_audit("k", "x", "s", {"a": 1})
    other = open_store()
    assert [e.kind for e in other.audit_entries()] == ["k"]
    assert other.audit_head() == store.audit_head()


def test_dedup_digests_are_pruned_by_age(open_store: StoreOpener) -> None:
    store = open_store()
    assert store.record_message("a1", 1, "posture", "d1", now=100.0)
    assert not store.record_message("a1", 1, "posture", "d1", now=101.0)
    assert store.record_message("a1", 2, "posture", "d2", now=200.0)
    assert store.prune_messages(before=150.0) == 0  # not sealed yet: the audit does not cover it
    store.mark_sealed(1, [("a1", 1), ("a1", 2)])
    assert store.prune_messages(before=150.0) == 1
    assert store.message_digest("a1", 1) is None
    assert store.message_digest("a1", 2) == "d2"


def test_sessions_decisions_and_reject_windows_upsert(open_store: StoreOpener) -> None:
    store = open_store()
    s = SessionRecord("a1", "s1", SessionState.RUNNING, client="vdi", pid=7, user="alice", started=1.0)
    store.save_session(s)
    ending = SessionRecord("a1", "s1", SessionState.ENDING, client="vdi", pid=7, user="alice", started=1.0,
                           ending_reason="violation", command_id="c1")  # fmt: skip
    store.save_session(ending)
    assert store.sessions("a1") == [ending] and store.session("a1", "s1") == ending
    assert store.open_sessions("a1") == [ending] and store.count_open_sessions("a1") == 1
    assert store.sessions_among("a1", ["s1", "s9"]) == {"s1": ending}
    assert store.sessions_among("a1", []) == {}
    assert [store.add_decision("a1", 1.0, "violation", ["x"], [{"a": 1}]) for _ in range(2)] == [1, 2]
    assert [d["id"] for d in store.decisions()] == [2, 1]
    store.save_reject_window("p1", "a1", 1.0, 2.0, '{"n": 1}')
    store.save_reject_window("p1", "a1", 1.0, 3.0, '{"n": 2}')
    assert store.reject_windows(updated_before=10.0, other_than="p2") == [("p1", "a1", 1.0, 3.0, '{"n": 2}')]
    assert not store.delete_reject_window("p1", "a1", updated_before=2.5)
    assert store.delete_reject_window("p1", "a1")
    store.count_reject("a1", "stale", 5.0)
    store.count_reject("a1", "stale", 3.0)  # an older report does not move last_at back
    assert store._db.execute("SELECT last_at FROM rejects").fetchone()[0] == 5.0


def test_events_newest_first_and_paged_by_seq(open_store: StoreOpener) -> None:
    store = open_store()
    args = {"kind": "k", "ts": 1.0, "at": 1.0, "severity": "info", "blocked": True, "details": {}}
    for seq, agent in ((1, "b"), (2, "a"), (3, "b")):  # one batch: same received time, insertion order kept
        store.add_event(agent, seq, now=5.0, **args)
    assert [(e["agent"], e["seq"]) for e in store.events()] == [("b", 3), ("a", 2), ("b", 1)]
    assert [e["seq"] for e in store.events(agent="b", before_seq=3)] == [1]
    assert store.events(limit=1)[0]["blocked"] is True


def test_audit_rows_cannot_be_updated_or_deleted(open_store: StoreOpener) -> None:
    store = open_store()
    store.append_audit("k", "x", "s", {"a": 1})
    for statement in ("UPDATE audit SET kind = 'other'", "DELETE FROM audit"):
        with pytest.raises(Exception, match="append-only"):
            store._db.execute(statement)
    assert verify_chain(store.audit_entries(), store.audit_head()) is None


def test_a_failed_transaction_leaves_nothing_and_the_chain_continues(open_store: StoreOpener) -> None:
    store = open_store()
    store.append_audit("k", "x", "s", {"n": 1})

    def failing(unit: AbstractContextManager[object], n: int) -> None:
        with unit:
            store.append_audit("k", "x", "s", {"n": n})
            raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        failing(store.transaction(), 2)
    with store.transaction():
        with pytest.raises(RuntimeError):
            failing(store.savepoint(), 3)  # one message of a batch
        store.append_audit("k", "x", "s", {"n": 4})
    assert [e.data["n"] for e in store.audit_entries()] == [1, 4]
    assert verify_chain(store.audit_entries(), store.audit_head()) is None


def test_two_processes_appending_at_once_make_one_chain(open_store: StoreOpener, tmp_path: Path) -> None:
    """Two real processes append 300 entries each, one transaction per entry, started together. The chain must
    verify (no fork: every entry chains to the one stored before it), hold all 600 with ids 1..600, and the two
    writers must have interleaved (else the test proved nothing about concurrency)."""
    store = open_store()
    database = "" if store.dialect == "sqlite" else store.location  # the test server's URL has no password
    go = tmp_path / "go"
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.audit_appender",
                str(tmp_path),
                database,
                actor,
                "300",
                str(go),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for actor in ("w1", "w2")
    ]
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        go.touch()
        for w in writers:
            assert w.wait(timeout=60) == 0
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    entries = list(store.audit_entries())
    assert verify_chain(entries, store.audit_head()) is None
    assert [e.id for e in entries] == list(range(1, 601))
    actors = [e.actor for e in entries]
    assert actors.count("w1") == actors.count("w2") == 300
    switches = sum(1 for a, b in itertools.pairwise(actors) if a != b)
    assert switches > 2, f"the writers did not interleave ({switches} switches): no concurrency was tested"


def test_controllers_starting_together_create_the_schema_once(open_store: StoreOpener) -> None:
    """Two connections opening a fresh database: the second finds the schema (on PostgreSQL, creating it
    takes the writer lock; without it concurrent CREATE ... IF NOT EXISTS can fail)."""
    first, second = open_store(), open_store()
    first.append_audit("k", "x", "s", {})
    second.append_audit("k", "y", "s", {})
    assert wait_for(lambda: len(list(first.audit_entries())) == 2, timeout=5, what="both entries")
