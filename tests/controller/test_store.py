"""The SQLite store: WAL, durable seq, enrolment, events once per (agent, seq), reject counts."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import (
    AgentExistsError,
    CommandRecord,
    CommandState,
    Condition,
    EndpointState,
    Store,
)
from cleanroom_protocol import fingerprint, public_key_pem


def test_wal_and_durable_seq(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [store.next_seq() for _ in range(3)] == [1, 2, 3]
    store.close()
    assert Store.open(tmp_path).next_seq() == 4


def test_enrolment_is_idempotent_and_refuses_another_key(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    key = Ed25519PrivateKey.generate()
    assert store.add_agent("a1", public_key_pem(key), fingerprint(key), time.time())
    assert not store.add_agent("a1", public_key_pem(key), fingerprint(key), time.time())
    other = Ed25519PrivateKey.generate()
    with pytest.raises(AgentExistsError):
        store.add_agent("a1", public_key_pem(other), fingerprint(other), time.time())
    assert [e.agent for e in store.endpoints()] == ["a1"]


def test_events_are_stored_once(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    args = {"kind": "session.started", "ts": 1.0, "at": 1.0, "severity": "info", "blocked": False, "now": 2.0}
    assert store.add_event("a1", 7, details={"session": "s"}, **args)
    assert not store.add_event("a1", 7, details={"session": "s"}, **args)
    assert [(e["agent"], e["seq"], e["kind"]) for e in store.events()] == [("a1", 7, "session.started")]


def test_endpoint_roundtrip_and_reject_counts(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ep = EndpointState(
        "a1", Condition.VIOLATION, True, False, ("denied_process:scrot",), 5.0, 9, 4, "enforce"
    )
    store.save_endpoint(ep, posture='{"x": 1}')
    assert store.endpoint("a1") == ep
    store.count_reject("a1", "bad_signature", 1.0)
    store.count_reject("a1", "bad_signature", 2.0)
    store.count_reject("a1", "replayed", 2.0)
    assert store.reject_counts() == {"a1": {"bad_signature": 2, "replayed": 1}}


def test_commands_roundtrip(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    c = CommandRecord("c1", "a1", "s1", "end_session", "violation", CommandState.PENDING, created=1.0)
    store.save_command(c)
    assert store.commands(CommandState.PENDING) == [c]
    assert store.command("c1") == c


def test_second_connection_sees_committed_state(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.append_audit("k", "x", "s", {"a": 1})
    other = sqlite3.connect(tmp_path / "controller.db")
    assert other.execute("SELECT count(*) FROM audit").fetchone()[0] == 1


def test_dedup_digests_are_pruned_by_age(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    assert store.record_message("a1", 1, "posture", "d1", now=100.0)
    assert not store.record_message("a1", 1, "posture", "d1", now=101.0)
    assert store.record_message("a1", 2, "posture", "d2", now=200.0)
    assert store.prune_messages(before=150.0) == 1
    assert store.message_digest("a1", 1) is None
    assert store.message_digest("a1", 2) == "d2"
