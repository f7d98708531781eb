"""Property-based fuzzing of the controller's ingest (hypothesis) on a real SQLite file.

Each run generates at least 10,000 messages in batches: truncated, deeply nested, huge, wrong types, wrong
encodings, valid, valid-but-replayed, valid-but-for-another-sender, valid-but-expired, forged, from nobody
enrolled, on random topics. Every message has one expected outcome and reason; per batch the ingest's
outcomes and its counts by reason must be exactly those, no batch may take long (a stall), and at the end
the counts must add up everywhere: accepted + rejected (by reason) + duplicates == inputs, in memory, in the
``rejects`` table and in the audit trail (``verdict`` entries and ``verdict.summary`` windows).
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanroom_controller import Store, Tracker, verify_chain
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.ingest.budgets import Limits
from cleanroom_controller.ingest.pipeline import Ingest, KeyCache, Outcome
from cleanroom_controller.ingest.rejects import REJECTS
from cleanroom_protocol import (
    MAX_MESSAGE_BYTES,
    Ack,
    AckResult,
    AgentState,
    Channel,
    Event,
    Kind,
    ProcessInfo,
    SessionInfo,
    Status,
    agent_topic,
    canonical_json,
)
from tests.controller.helpers import Sender, covered, enrol, posture, shipped_policy

EXAMPLES = 950  # batches of 10..16: ≥ 10,000 messages (asserted)
MIN_INPUTS = 10_000
BATCH_STALL_S = 2.0  # a batch of ≤ 16 takes milliseconds; a stall would take far longer

SENDERS = ("a1", "a2", "a3")
TOPIC_OF = {Kind.POSTURE: Channel.POSTURE, Kind.EVENT: Channel.EVENTS, Kind.STATUS: Channel.STATUS}
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
not_scalars = st.none() | st.lists(json_values, max_size=3) | st.dictionaries(names, json_values, max_size=3)


@dataclass
class Expect:
    outcome: Outcome
    reason: str  # "accepted" or the reason it is counted under


ACCEPTED = Expect(Outcome.ACCEPTED, "accepted")


def rejected(reason: str) -> Expect:
    return Expect(Outcome.REJECTED, reason)


@dataclass
class World:
    store: Store
    ingest: Ingest
    senders: dict[str, Sender]
    accepted: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, bytes) for replays
    inputs: int = 0
    slowest: float = 0.0

    def seal(self, agent: str, kind: Kind, body: Any, *, ts: float | None = None) -> bytes:
        return self.senders[agent].seal(kind, body, ts=ts)

    def feed(self, batch: list[tuple[tuple[str, bytes, bool], Expect]]) -> None:
        before = Counter(self.ingest.counts)
        started = time.monotonic()
        outcomes = self.ingest.handle_batch([item for item, _ in batch])
        took = time.monotonic() - started
        self.slowest = max(self.slowest, took)
        assert took < BATCH_STALL_S, f"a batch of {len(batch)} took {took:.2f} s"
        assert outcomes == [e.outcome for _, e in batch], [
            (item[0][:60], item[1][:80], e, o)
            for (item, e), o in zip(batch, outcomes, strict=True)
            if e.outcome != o
        ]
        delta = Counter(self.ingest.counts)
        delta.subtract(before)
        assert +delta == Counter(e.reason for _, e in batch)
        self.inputs += len(batch)
        for (item, e), o in zip(batch, outcomes, strict=True):
            if o is Outcome.ACCEPTED and e.reason == "accepted":
                self.accepted.append((item[0], item[1]))


def sign_raw(
    sender: Sender, kind: str, body: Any, *, seq: int | None = None, ts: float | None = None
) -> bytes:
    """An envelope around any body, signed as the protocol signs (for bodies no model would produce)."""
    if seq is None:
        sender.seq += 1
        seq = sender.seq
    unsigned = {
        "v": 1,
        "kind": kind,
        "sender": sender.agent,
        "seq": seq,
        "ts": time.time() if ts is None else ts,
    }
    unsigned["body"] = body
    sig = sender.key.sign(canonical_json(unsigned))
    return canonical_json({**unsigned, "sig": base64.b64encode(sig).decode("ascii")})


# -- recipes: each draws one message and says what must become of it -------------------------------------
Draw = Callable[[Any], Any]


def valid_body(draw: Draw, agent: str) -> tuple[Kind, Any]:
    kind = draw(st.sampled_from([Kind.POSTURE, Kind.EVENT, Kind.EVENT, Kind.STATUS]))
    if kind is Kind.POSTURE:
        sessions = tuple(
            SessionInfo(id=sid, client="xfreerdp", pid=100 + i, pids=[100 + i], started=1.0)
            for i, sid in enumerate(draw(st.lists(names, max_size=4, unique=True)))
        )
        body = posture(agent, denied=tuple(draw(st.lists(st.sampled_from(["scrot", "obs"]), max_size=2))))
        body = body.model_copy(
            update={
                "sessions": list(sessions),
                "denied_processes": [ProcessInfo(name=p.name, pid=p.pid) for p in body.denied_processes],
            }
        )
        return kind, body
    if kind is Kind.EVENT:
        what = draw(st.sampled_from(["session.started", "session.ended", "clipboard.blocked", "exec.denied"]))
        details = {
            "session": draw(names),
            "path": draw(st.text(max_size=40)),
            "pid": draw(st.integers(0, 2**31)),
        }
        return kind, Event(kind=what, at=time.time(), details=details)
    state = draw(st.sampled_from([AgentState.ONLINE, AgentState.OFFLINE]))
    return kind, Status(state=state, reason="connected" if state is AgentState.ONLINE else "shutdown")


def r_valid(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    agent = draw(st.sampled_from(SENDERS))
    if draw(st.integers(0, 9)) == 0:
        ack = Ack(command_id=draw(names), result=draw(st.sampled_from(list(AckResult))))
        return (agent_topic(agent, Channel.ACKS), w.seal(agent, Kind.ACK, ack), False), ACCEPTED
    kind, body = valid_body(draw, agent)
    return (agent_topic(agent, TOPIC_OF[kind]), w.seal(agent, kind, body), False), ACCEPTED


def r_truncated(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    (topic, raw, _), _ = r_valid(draw, w)
    cut = draw(st.integers(0, 9_999)) * len(raw) // 10_000  # draws must not depend on the world's state
    return (topic, raw[:cut], False), rejected("malformed")


def r_deep(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    agent = draw(st.sampled_from(SENDERS))
    depth = draw(st.integers(2_000, 30_000))
    nest = b"[" * depth + b"]" * depth
    if draw(st.booleans()):  # inside an envelope's body: the signature is never reached
        nest = (
            b'{"v":1,"kind":"event","sender":"'
            + agent.encode()
            + b'","seq":1,"ts":1,"body":{"x":'
            + nest
            + b"}}"
        )
    expect = rejected("too_large" if len(nest) > MAX_MESSAGE_BYTES else "malformed")
    return (agent_topic(agent, Channel.EVENTS), nest, False), expect


def r_huge(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    agent = draw(st.sampled_from(SENDERS))
    size = draw(st.integers(MAX_MESSAGE_BYTES + 1, 4 * MAX_MESSAGE_BYTES))
    return (agent_topic(agent, Channel.POSTURE), b'{"v":1,"pad":"' + b"x" * size + b'"}', False), rejected(
        "too_large"
    )


def r_wrong_type(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    """An envelope field replaced by a value no coercion turns into its type (after signing)."""
    (topic, raw, _), _ = r_valid(draw, w)
    env = json.loads(raw)
    name = draw(st.sampled_from(["v", "kind", "sender", "seq", "ts", "body", "sig"]))
    env[name] = draw(
        not_scalars if name != "body" else st.none() | st.lists(json_values, max_size=3) | st.text()
    )
    return (topic, canonical_json(env), False), rejected("malformed")


def r_signed_bad_body(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    """Signed by the sender's own key, but the body is not a posture/event/status: refused after the
    signature, before anything trusts it."""
    agent = draw(st.sampled_from(SENDERS))
    kind = draw(st.sampled_from([Kind.POSTURE, Kind.EVENT, Kind.STATUS]))
    body = draw(
        st.dictionaries(st.sampled_from(["kind", "at", "state", "agent_id", "x"]), not_scalars, max_size=3)
    )
    raw = sign_raw(w.senders[agent], kind.value, body)
    return (agent_topic(agent, TOPIC_OF[kind]), raw, False), rejected("malformed")


def r_tampered(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    """Signed, then a body value changed in transit."""
    (topic, raw, _), _ = r_valid(draw, w)
    env = json.loads(raw)
    env["body"]["zz-" + draw(st.text(max_size=8))] = draw(json_values)
    return (topic, canonical_json(env), False), rejected("bad_signature")


def r_encoding(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    agent = draw(st.sampled_from(SENDERS))
    event = Event(
        kind="clipboard.blocked",
        at=time.time(),
        details={"path": "/home/é/ß" + draw(st.text(st.characters(max_codepoint=255), max_size=5))},
    )
    raw = w.seal(agent, Kind.EVENT, event)
    topic = agent_topic(agent, Channel.EVENTS)
    codec = draw(st.sampled_from(["utf-16", "utf-32", "utf-16-le", "latin-1", "cut-utf8"]))
    if codec == "latin-1":  # é and ß are not UTF-8 in latin-1: not decodable as JSON text
        return (topic, raw.decode().encode("latin-1"), False), rejected("malformed")
    if codec == "cut-utf8":  # half of a two-byte character
        at = raw.index("é".encode())
        return (topic, raw[: at + 1] + raw[at + 2 :], False), rejected("malformed")
    # Another Unicode encoding of the same signed content (json tells UTF-16/32 by their NULs, with or
    # without a BOM): the signature covers the canonical form of what was parsed, so it is the genuine
    # message, accepted once like its UTF-8 form would be.
    return (topic, raw.decode().encode(codec), False), ACCEPTED


def r_replayed(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    pick, retained, exact = draw(st.integers(0, 2**31)), draw(st.booleans()), draw(st.booleans())
    if not w.accepted:  # (the same draws either way: hypothesis replays choice sequences)
        return (agent_topic("a1", Channel.EVENTS), b"{", False), rejected("malformed")
    topic, raw = w.accepted[pick % len(w.accepted)]
    if exact:
        return (topic, raw, retained), Expect(Outcome.DUPLICATE, "duplicate")  # a QoS 1 redelivery
    # The same seq with other content (a stolen key's replay, a counter gone backwards): signed, refused.
    env = json.loads(raw)
    agent = env["sender"]
    other = sign_raw(w.senders[agent], "event", {"kind": "clipboard.blocked", "at": 1.0}, seq=env["seq"])
    return (agent_topic(agent, Channel.EVENTS), other, False), rejected("replayed")


def r_other_sender(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    a, b = draw(st.permutations(SENDERS))[:2]
    if draw(st.booleans()):  # a's genuine message on b's topic
        kind, body = valid_body(draw, a)
        return (agent_topic(b, TOPIC_OF[kind]), w.seal(a, kind, body), False), rejected("malformed")
    # On b's topic, saying it is b, signed with a's key
    impostor = Sender(b, w.senders[a].key)
    impostor.seq = 10**9
    event = Event(kind="clipboard.blocked", at=time.time())
    return (agent_topic(b, Channel.EVENTS), impostor.seal(Kind.EVENT, event), False), rejected(
        "bad_signature"
    )


def r_late(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    """Signed long ago (or far ahead of our clock): history, stored and marked late, never refused."""
    agent = draw(st.sampled_from(SENDERS))
    skew = draw(st.sampled_from([-1, 1])) * draw(st.floats(301, 10**7))
    raw = w.seal(agent, Kind.EVENT, Event(kind="clipboard.blocked", at=time.time()), ts=time.time() + skew)
    return (agent_topic(agent, Channel.EVENTS), raw, False), ACCEPTED


def r_forged(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    agent = draw(st.sampled_from([*SENDERS, "ghost", "ghost-2"]))
    forger = Sender(agent, Ed25519PrivateKey.generate())
    forger.seq = draw(st.integers(0, 2**40))
    raw = forger.seal(Kind.EVENT, Event(kind="clipboard.blocked", at=time.time()))
    reason = "bad_signature" if agent in SENDERS else "unknown_sender"
    return (agent_topic(agent, Channel.EVENTS), raw, False), rejected(reason)


def r_random_topic(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    topic = draw(
        st.text(max_size=40)
        | st.sampled_from(
            ["cleanroom/v1/agents/a1/commands", "cleanroom/v1/policy", "cleanroom/v1/agents//posture"]
        )
        | st.builds(
            lambda s: f"cleanroom/v1/agents/{s}/posture",
            st.text(alphabet="+#/ é\x00", min_size=1, max_size=5),
        )
    )
    return (topic, draw(st.binary(max_size=64)), draw(st.booleans())), rejected("malformed")


def r_random_bytes(draw: Draw, w: World) -> tuple[tuple[str, bytes, bool], Expect]:
    agent = draw(st.sampled_from(SENDERS))
    channel = draw(st.sampled_from([Channel.POSTURE, Channel.EVENTS, Channel.STATUS, Channel.ACKS]))
    raw = draw(st.binary(max_size=200) | st.builds(lambda v: json.dumps(v).encode(), json_values))
    return (agent_topic(agent, channel), raw, draw(st.booleans())), rejected("malformed")


RECIPES = [
    r_valid,
    r_valid,
    r_truncated,
    r_deep,
    r_huge,
    r_wrong_type,
    r_signed_bad_body,
    r_tampered,
    r_encoding,
    r_replayed,
    r_replayed,
    r_other_sender,
    r_late,
    r_forged,
    r_random_topic,
    r_random_bytes,
]


def test_no_input_crashes_or_stalls_ingest_and_every_one_is_counted_with_its_reason(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    senders = {a: Sender(a) for a in SENDERS}
    for a, s in senders.items():
        enrol(store, a, s.key)
    recorder = Recorder(store, "controller:fuzz")
    policy = shipped_policy()
    tracker = Tracker(store=store, recorder=recorder, policy=lambda: policy, act=lambda _: None)
    limits = Limits()
    ingest = Ingest(
        store=store, recorder=recorder, tracker=tracker, keys=KeyCache(store), max_skew_s=300, limits=limits
    )
    world = World(store, ingest, senders)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(st.data())
    def feed(data: st.DataObject) -> None:
        size = data.draw(st.integers(10, 16))
        batch = [data.draw(st.sampled_from(RECIPES))(data.draw, world) for _ in range(size)]
        world.feed(batch)

    feed()
    ingest.close()

    counts = ingest.counts
    assert world.inputs >= MIN_INPUTS, world.inputs
    assert ingest.internal_errors == 0  # no exception caught on the way (verify or apply)
    assert sum(counts.values()) == world.inputs  # accepted + rejected (by reason) + duplicates
    # The same in the database: ok verdicts, the rejects table, and the audited windows.
    assert len(covered(store)) == counts["accepted"]  # every accepted message covered by a batch, once
    table = Counter[str]()
    for by_reason in store.reject_counts().values():
        table.update(by_reason)
    assert table == Counter({r: n for r, n in counts.items() if r in REJECTS})
    audited = Counter[str]()
    for e in store.audit_entries():
        if e.kind == "verdict.summary":
            audited.update(e.data["counts"])
    assert audited == Counter({r: n for r, n in counts.items() if r != "accepted"})
    assert counts["accepted"] + sum(audited.values()) == world.inputs
    assert {r for r, n in counts.items() if n} >= {
        "accepted",
        "malformed",
        "too_large",
        "bad_signature",
        "unknown_sender",
        "replayed",
        "duplicate",
    }
    assert ingest.late > 0, "no late message was generated: the fuzzer no longer tries history"
    assert verify_chain(list(store.audit_entries()), store.audit_head()) is None
