"""Envelope sealing and verification: every verdict the contract names, and the Last Will exemption."""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_protocol import (
    MAX_MESSAGE_BYTES,
    AgentState,
    Event,
    Kind,
    Posture,
    Status,
    VerdictStatus,
    canonical_json,
    seal,
    verify,
)

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def keys(sender: str):  # type: ignore[no-untyped-def]
    return KEY.public_key() if sender == "agent-1" else None


def event(
    seq: int = 1, ts: float | None = None, key: Ed25519PrivateKey = KEY, sender: str = "agent-1"
) -> bytes:
    body = Event(kind="session.started", at=time.time(), details={"session": "s-1"})
    return seal(Kind.EVENT, body, sender=sender, seq=seq, key=key, ts=ts)


def test_sealed_message_verifies_and_parses_body() -> None:
    verdict = verify(event(seq=7), public_key_for=keys, last_seq=6)
    assert verdict.status is VerdictStatus.OK
    assert isinstance(verdict.body, Event)
    assert verdict.body.details["session"] == "s-1"
    assert (verdict.sender, verdict.seq) == ("agent-1", 7)


def test_wire_form_is_canonical_json() -> None:
    raw = event()
    assert raw == canonical_json(json.loads(raw))
    assert set(json.loads(raw)) == {"v", "kind", "sender", "seq", "ts", "body", "sig"}


def test_canonical_json_sorts_keys_and_drops_whitespace() -> None:
    assert (
        canonical_json({"b": 1, "a": [1, {"d": "é", "c": None}]})
        == '{"a":[1,{"c":null,"d":"é"}],"b":1}'.encode()
    )


def test_any_edit_breaks_the_signature() -> None:
    data = json.loads(event())
    data["body"]["details"]["session"] = "s-2"
    verdict = verify(canonical_json(data), public_key_for=keys)
    assert verdict.status is VerdictStatus.BAD_SIGNATURE


def test_signature_by_another_key_is_bad() -> None:
    assert verify(event(key=OTHER), public_key_for=keys).status is VerdictStatus.BAD_SIGNATURE


def test_garbage_signature_is_bad() -> None:
    data = json.loads(event())
    data["sig"] = "!!not base64!!"
    assert verify(canonical_json(data), public_key_for=keys).status is VerdictStatus.BAD_SIGNATURE
    data["sig"] = base64.b64encode(b"short").decode()
    assert verify(canonical_json(data), public_key_for=keys).status is VerdictStatus.BAD_SIGNATURE


def test_unknown_sender() -> None:
    verdict = verify(event(sender="stranger"), public_key_for=keys)
    assert verdict.status is VerdictStatus.UNKNOWN_SENDER
    assert "stranger" in verdict.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1,2]",
        b'{"v":1}',
        b"\xff\xfe",
        b'{"v":1,"kind":"nope","sender":"a","seq":1,"ts":1,"body":{},"sig":"x"}',
    ],
)
def test_malformed(raw: bytes) -> None:
    assert verify(raw, public_key_for=keys).status is VerdictStatus.MALFORMED


def test_signed_but_invalid_body_is_malformed() -> None:
    unsigned = {
        "v": 1,
        "kind": "event",
        "sender": "agent-1",
        "seq": 1,
        "ts": time.time(),
        "body": {"kind": 5},
    }
    sig = base64.b64encode(KEY.sign(canonical_json(unsigned))).decode()
    verdict = verify(canonical_json({**unsigned, "sig": sig}), public_key_for=keys)
    assert verdict.status is VerdictStatus.MALFORMED
    assert "event body" in verdict.detail


def test_too_large_is_rejected_before_parsing() -> None:
    verdict = verify(b"{" + b" " * MAX_MESSAGE_BYTES + b"}", public_key_for=keys)
    assert verdict.status is VerdictStatus.TOO_LARGE


def test_seal_refuses_to_produce_an_oversized_message() -> None:
    body = Event(kind="x", at=0, details={f"k{i}": "v" * 4000 for i in range(64)})
    with pytest.raises(ValueError, match="over the"):
        seal(Kind.EVENT, body, sender="agent-1", seq=1, key=KEY)
    # a legal but large body still seals
    seal(Kind.EVENT, Event(kind="x", at=0, details={"k": "v" * 250}), sender="agent-1", seq=1, key=KEY)


def test_replayed_seq_not_above_last_accepted() -> None:
    raw = event(seq=5)
    assert verify(raw, public_key_for=keys, last_seq=4).ok
    assert verify(raw, public_key_for=keys, last_seq=5).status is VerdictStatus.REPLAYED
    assert verify(raw, public_key_for=keys, last_seq=9).status is VerdictStatus.REPLAYED
    assert verify(raw, public_key_for=keys, last_seq=None).ok


def test_stale_outside_window_both_directions() -> None:
    now = time.time()
    assert (
        verify(event(ts=now - 301), public_key_for=keys, now=now, max_skew_s=300).status
        is VerdictStatus.STALE
    )
    assert (
        verify(event(ts=now + 301), public_key_for=keys, now=now, max_skew_s=300).status
        is VerdictStatus.STALE
    )
    assert verify(event(ts=now - 299), public_key_for=keys, now=now, max_skew_s=300).ok
    assert verify(event(ts=now - 10_000), public_key_for=keys, now=now, max_skew_s=None).ok


def test_topic_mismatch_is_malformed() -> None:
    raw = event()
    assert verify(raw, public_key_for=keys, expected_sender="agent-2").status is VerdictStatus.MALFORMED
    assert verify(raw, public_key_for=keys, expected_kind=Kind.POSTURE).status is VerdictStatus.MALFORMED


def test_last_will_is_accepted_by_its_reserved_seq_only() -> None:
    connected_at = time.time() - 3600  # the Will was signed at connect time, an hour ago
    will = seal(
        Kind.STATUS,
        Status(state=AgentState.OFFLINE, reason="will"),
        sender="agent-1",
        seq=10,
        key=KEY,
        ts=connected_at,
    )
    verdict = verify(will, public_key_for=keys, last_seq=42, will_seq=10)
    assert verdict.ok and verdict.is_will
    # without the announcement, or with another connection's will_seq, it is an old message
    assert verify(will, public_key_for=keys, last_seq=42).status is VerdictStatus.STALE
    assert (
        verify(will, public_key_for=keys, last_seq=42, will_seq=11, max_skew_s=None).status
        is VerdictStatus.REPLAYED
    )


def test_online_status_with_the_will_seq_is_not_a_will() -> None:
    online = seal(
        Kind.STATUS, Status(state=AgentState.ONLINE, will_seq=10), sender="agent-1", seq=10, key=KEY
    )
    assert verify(online, public_key_for=keys, last_seq=42, will_seq=10).status is VerdictStatus.REPLAYED


def test_unknown_fields_in_a_body_are_signed_and_tolerated() -> None:
    unsigned = {
        "v": 1, "kind": "event", "sender": "agent-1", "seq": 1, "ts": time.time(),
        "body": {"kind": "session.started", "at": 1.0, "added_by_newer_agent": True},
    }  # fmt: skip
    sig = base64.b64encode(KEY.sign(canonical_json(unsigned))).decode()
    assert verify(canonical_json({**unsigned, "sig": sig}), public_key_for=keys).ok
    unsigned["body"]["added_by_newer_agent"] = False  # type: ignore[index]
    assert (
        verify(canonical_json({**unsigned, "sig": sig}), public_key_for=keys).status
        is VerdictStatus.BAD_SIGNATURE
    )


def test_posture_round_trip() -> None:
    posture = Posture(
        agent_id="agent-1", agent_version="0.1.0", mode="enforce", policy=None, hostname="h", os="Debian 12",
        kernel="6.1", display_server="x11", boot_time=1.0, users=["ana"], mounts=[], denied_processes=[],
        sessions=[], enforcers=[],
    )  # fmt: skip
    verdict = verify(seal(Kind.POSTURE, posture, sender="agent-1", seq=1, key=KEY), public_key_for=keys)
    assert verdict.body == posture
