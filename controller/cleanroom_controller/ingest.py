"""Every message from the agents: verify → de-duplicate → record the verdict → hand facts to the tracker.

Subscribes (QoS 1) to ``cleanroom/v1/agents/+/{posture,events,status,acks}``, optionally as a shared
subscription. The topic names who the sender must be and what kind; verification uses the sender's enrolled
key, its last accepted seq and the seq it announced for its Last Will. A message redelivered by QoS 1 (same
agent, seq and bytes) is a duplicate, stored once and not counted as a reject; a retained status replayed to
a restarted controller is expected and recorded, not counted. Everything else that fails is counted per
status and audited. Nothing here raises on bad input.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cleanroom_protocol import (
    AGENT_TO_CONTROLLER,
    Ack,
    Channel,
    Event,
    KeyFileError,
    Kind,
    Posture,
    Status,
    Verdict,
    VerdictStatus,
    agent_filter,
    check_sequence,
    parse_agent_topic,
    parse_public_key,
    verify,
)

from .recorder import Recorder
from .store import Store
from .tracker import Tracker

log = structlog.get_logger("cleanroom.controller.ingest")

KIND_OF_CHANNEL = {
    Channel.POSTURE: Kind.POSTURE,
    Channel.EVENTS: Kind.EVENT,
    Channel.STATUS: Kind.STATUS,
    Channel.ACKS: Kind.ACK,
}
UNENROLLED = "(unenrolled)"  # rejects from ids nobody enrolled are counted together: bounded rows
UNKNOWN_TOPIC = "(topic)"
_NEGATIVE_TTL_S = 5.0


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    OLD_STATUS = "old_status"  # retained replay or superseded Will: recorded, not counted
    REJECTED = "rejected"


def _expected_old_status(channel: Channel, verdict: Verdict, retained: bool) -> str | None:
    if channel is not Channel.STATUS or verdict.status not in (VerdictStatus.REPLAYED, VerdictStatus.STALE):
        return None
    if retained:
        return "retained"
    body = verdict.envelope.body if verdict.envelope is not None else {}
    if body.get("state") == "offline" and body.get("reason") == "will":
        return "superseded_will"
    return None


def subscriptions(share_group: str | None) -> list[str]:
    return [agent_filter(channel, share_group=share_group) for channel in AGENT_TO_CONTROLLER]


class KeyCache:
    """Enrolled public keys by agent id; misses go to the store (enrolment happens from the CLI)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._missing: dict[str, float] = {}

    def __call__(self, agent: str) -> Ed25519PublicKey | None:
        key = self._keys.get(agent)
        if key is not None:
            return key
        if self._clock() - self._missing.get(agent, -_NEGATIVE_TTL_S) < _NEGATIVE_TTL_S:
            return None
        pem = self._store.public_key_pem(agent)
        if pem is None:
            if len(self._missing) > 10_000:
                self._missing.clear()
            self._missing[agent] = self._clock()
            return None
        try:
            key = parse_public_key(pem.encode("ascii"), source=f"enrolled key of {agent}")
        except KeyFileError:
            log.error("enrolled_key_unreadable", agent=agent)
            return None
        self._keys[agent] = key
        return key

    def is_enrolled(self, agent: str) -> bool:
        return self(agent) is not None


Item = tuple[str, bytes, bool]  # topic, payload, retained


class Ingest:
    """Verifies and applies messages in batches: one SQLite transaction per batch (each message in its own
    savepoint, so a bug on one rolls back only that one), audit entries chained per message in arrival order.

    ``shared``: this process is one of a ``--share-group``. The broker then deals one agent's messages over
    the group's processes, each of which sees an increasing subsequence (the broker keeps per-publisher order),
    so the replay rule is per process: *replayed = seq not above the last seq this process accepted from
    that sender*. The database's UNIQUE (agent, seq) stops a message from being acted on twice across the
    group, endpoint state only moves forward (the tracker ignores older seqs) and the stale window bounds the
    rest. Without a share group the stored last_seq is the rule (one writer).
    """

    def __init__(
        self,
        *,
        store: Store,
        recorder: Recorder,
        tracker: Tracker,
        keys: KeyCache,
        max_skew_s: float,
        on_ack: Callable[[str, Ack], None] | None = None,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ) -> None:
        self._store = store
        self._recorder = recorder
        self._tracker = tracker
        self._keys = keys
        self._max_skew_s = max_skew_s
        self._on_ack = on_ack
        self._clock = clock
        self._shared = shared
        self._accepted: dict[str, int] = {}  # shared: last seq accepted by this process, per sender

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> Outcome:
        return self.handle_batch([(topic, payload, retained)])[0]

    def handle_batch(self, items: Iterable[Item]) -> list[Outcome]:
        """Apply ``items`` in order in one transaction. Signatures (the costly part) are checked first,
        without the write lock, so that processes of a share group verify in parallel and hold the lock only
        to apply. Raises only when the transaction itself cannot commit (then none of the batch is stored)."""
        checked = [
            (topic, payload, retained, self._check_signature(topic, payload))
            for topic, payload, retained in items
        ]
        outcomes: list[Outcome] = []
        with self._store.transaction():
            for topic, payload, retained, signed in checked:
                outcomes.append(self._handle_one(topic, payload, retained, signed))
        return outcomes

    def _check_signature(self, topic: str, payload: bytes) -> Verdict | None:
        """Everything ``verify`` checks except seq and ts; ``None`` for a topic that is not an agent's."""
        try:
            parsed = parse_agent_topic(topic)
            if parsed is None or parsed[1] not in KIND_OF_CHANNEL:
                return None
            agent, channel = parsed
            return verify(
                payload,
                public_key_for=self._keys,
                last_seq=None,
                max_skew_s=None,
                will_seq=None,
                expected_sender=agent,
                expected_kind=KIND_OF_CHANNEL[channel],
            )
        except Exception:  # a bug must not lose the batch; the apply step records it per message
            log.exception("verify_error", topic=topic[:200])
            return Verdict(VerdictStatus.MALFORMED, "internal error while verifying")

    def _handle_one(self, topic: str, payload: bytes, retained: bool, signed: Verdict | None) -> Outcome:
        try:
            # Verdict, state, decision and audit of one message land together or not at all.
            with self._store.savepoint():
                return self._handle(topic, payload, retained, signed)
        except Exception:  # a bug on one message must not stop ingest; it is logged and audited
            log.exception("ingest_error", topic=topic[:200])
            try:
                with self._store.savepoint():
                    self._recorder.record("ingest.error", topic[:200], {"bytes": len(payload)})
            except Exception:
                log.exception("audit_failed")
            return Outcome.REJECTED

    def _handle(self, topic: str, payload: bytes, retained: bool, signed: Verdict | None) -> Outcome:
        now = self._clock()
        parsed = parse_agent_topic(topic)
        if signed is None or parsed is None:
            return self._reject(
                UNKNOWN_TOPIC, topic, VerdictStatus.MALFORMED, "not an agent-to-controller topic", now
            )
        agent, channel = parsed
        ep = self._store.endpoint(agent)
        verdict = check_sequence(
            signed,
            last_seq=self._accepted.get(agent) if self._shared else ep.last_seq,
            will_seq=ep.will_seq,
            now=now,
            max_skew_s=self._max_skew_s,
        )
        digest = hashlib.sha256(payload).hexdigest()
        base = {"topic": topic, "seq": verdict.seq, "retained": retained, "bytes": len(payload)}
        if not verdict.ok:
            seq = verdict.seq
            if (
                verdict.status is VerdictStatus.REPLAYED
                and seq is not None
                and self._store.message_digest(agent, seq) == digest
            ):
                self._recorder.record("verdict", agent, {**base, "status": "duplicate"}, actor=agent)
                return Outcome.DUPLICATE
            expected = _expected_old_status(channel, verdict, retained)
            if expected is not None:
                # Signed by the agent (the signature is checked before seq and ts), only old: the broker
                # replays the retained status to each new subscription, and a Will superseded by a newer
                # connection can arrive late. Recorded, not counted as an attack.
                self._recorder.record(
                    "verdict",
                    agent,
                    {**base, "status": verdict.status.value, "detail": verdict.detail, "expected": expected},
                    actor=agent,
                )
                return Outcome.OLD_STATUS
            counted_as = agent if self._keys.is_enrolled(agent) else UNENROLLED
            return self._reject(counted_as, topic, verdict.status, verdict.detail, now, base)

        envelope = verdict.envelope
        assert envelope is not None  # ok verdicts carry both
        seq = envelope.seq
        kind = envelope.kind.value
        if not self._store.record_message(agent, seq, kind, digest, now):
            if self._store.message_digest(agent, seq) == digest:
                # A Last Will (exempt from the replay check) again, or with a share group a redelivery
                # another process of the group already accepted.
                self._recorder.record("verdict", agent, {**base, "status": "duplicate"}, actor=agent)
                return Outcome.DUPLICATE
            # Same (agent, seq), other bytes: accepted once already (by this or another process).
            return self._reject(
                agent,
                topic,
                VerdictStatus.REPLAYED,
                f"seq {seq} already accepted with other content",
                now,
                base,
            )
        if self._shared and not verdict.is_will:
            self._accepted[agent] = max(seq, self._accepted.get(agent, seq))
        self._recorder.record(
            "verdict",
            agent,
            {**base, "status": "ok", "kind": kind, "will": verdict.is_will},
            actor=agent,
        )
        body = verdict.body
        if isinstance(body, Posture):
            posture_json = json.dumps(envelope.body, separators=(",", ":"), ensure_ascii=False)
            self._tracker.on_posture(agent, body, seq=seq, now=now, before=ep, posture_json=posture_json)
        elif isinstance(body, Status):
            self._tracker.on_status(agent, body, seq=seq, now=now, is_will=verdict.is_will, before=ep)
        elif isinstance(body, Event):
            self._store.add_event(
                agent,
                seq,
                kind=body.kind,
                ts=envelope.ts,
                at=body.at,
                severity=body.severity.value,
                blocked=body.blocked,
                details=dict(body.details),
                now=now,
            )
            self._tracker.on_event(agent, body, seq=seq, now=now, before=ep)
        elif isinstance(body, Ack):
            self._tracker.on_ack(agent, body, seq=seq, now=now, before=ep)
            if self._on_ack is not None:
                self._on_ack(agent, body)
        return Outcome.ACCEPTED

    def _reject(
        self,
        counted_as: str,
        topic: str,
        status: VerdictStatus,
        detail: str,
        now: float,
        base: Mapping[str, object] | None = None,
    ) -> Outcome:
        self._store.count_reject(counted_as, status.value, now)
        data = {**(base or {"topic": topic[:200]}), "status": status.value, "detail": detail[:500]}
        self._recorder.record("verdict", counted_as, data, actor=counted_as)
        log.warning(
            "message_rejected", sender=counted_as, topic=topic[:200], status=status.value, detail=detail[:200]
        )
        return Outcome.REJECTED
