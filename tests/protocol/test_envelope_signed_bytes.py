"""The receiver checks a signature over the wire bytes without their ``sig`` member instead of re-encoding the
parsed envelope (``signed_bytes_as_sent``): these bytes must be exactly the canonical JSON the protocol
signs, and no rearrangement of a signed message may pass with content other than what was signed."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom_protocol import Event, Kind, VerdictStatus, canonical_json, seal, verify
from cleanroom_protocol.envelope import signed_bytes_as_sent

KEY = Ed25519PrivateKey.generate()


def keys(sender: str):  # type: ignore[no-untyped-def]
    return KEY.public_key() if sender == "agent-1" else None


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
KEYS = st.text(max_size=8) | st.sampled_from(["sig", "ts", "v", "seq", "body", ',"sig":"'])
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=24,
)


def signed(body: dict[str, Any], ts: float, seq: int = 1) -> tuple[dict[str, Any], bytes]:
    unsigned = {"v": 1, "kind": "event", "sender": "agent-1", "seq": seq, "ts": ts, "body": body}
    sig = base64.b64encode(KEY.sign(canonical_json(unsigned))).decode()
    return unsigned, canonical_json({**unsigned, "sig": sig})


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(KEYS, JSON, max_size=6),
    ts=st.floats(allow_nan=False, allow_infinity=False),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_the_bytes_as_sent_are_the_canonical_bytes_signed(body: dict[str, Any], ts: float, seq: int) -> None:
    """Any JSON in the body (nested ``sig`` keys, strings that look like the member, any float) and any ts."""
    unsigned, raw = signed(body, ts, seq)
    assert signed_bytes_as_sent(raw) == canonical_json(unsigned)
    assert verify(raw, public_key_for=keys, max_skew_s=None).status is not VerdictStatus.BAD_SIGNATURE


def test_a_non_canonical_form_of_a_signed_message_still_verifies() -> None:
    """The protocol lets a peer send any JSON form of the signed value: the receiver re-encodes that one."""
    body = Event(kind="session.started", at=1.0, details={"sig": "x"})
    raw = seal(Kind.EVENT, body, sender="agent-1", seq=3, key=KEY)
    data = json.loads(raw)
    for form in (
        json.dumps(data, indent=2).encode(),  # whitespace
        json.dumps(dict(reversed(list(data.items())))).encode(),  # another key order
        json.dumps(data, ensure_ascii=True).encode(),
    ):
        assert form != raw
        verdict = verify(form, public_key_for=keys)
        assert verdict.ok and verdict.envelope is not None and verdict.envelope.seq == 3


def test_moving_the_signature_member_anywhere_else_never_passes_other_content() -> None:
    """The signature member cut out and put back at every byte of the signed bytes: each result is refused,
    or is the very message that was signed. A ``sig`` key inside the body is there to be confused with."""
    body = Event(kind="usb.blocked", at=1.0, details={"sig": "AAAA", "device": "1234:5678"})
    raw = seal(Kind.EVENT, body, sender="agent-1", seq=7, key=KEY, ts=time.time())
    original = verify(raw, public_key_for=keys)
    assert original.ok and original.envelope is not None
    as_sent = signed_bytes_as_sent(raw)
    assert as_sent is not None
    member = raw[raw.rfind(b',"sig":"') :]
    member = member[: member.index(b'"', len(b',"sig":"')) + 1]
    passed = 0
    for at in range(len(as_sent) + 1):
        moved = as_sent[:at] + member + as_sent[at:]
        verdict = verify(moved, public_key_for=keys)
        if verdict.ok:
            passed += 1
            assert verdict.envelope == original.envelope and verdict.body == original.body
        else:
            assert verdict.status in (VerdictStatus.MALFORMED, VerdictStatus.BAD_SIGNATURE)
    assert passed >= 1  # where seal put it, at least


def test_no_signature_member_where_one_belongs() -> None:
    assert signed_bytes_as_sent(b'{"v":1}') is None
    assert signed_bytes_as_sent(b'{"seq":1,"sig":"not base64!","ts":1}') is None
    assert signed_bytes_as_sent(b'{"seq":1,"sig":"AAAA') is None
    assert signed_bytes_as_sent(b'{"seq":1,"sig":"AAAA","ts":1}') == b'{"seq":1,"ts":1}'
