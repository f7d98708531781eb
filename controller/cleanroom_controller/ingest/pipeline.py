"""Every message from the agents: verify → de-duplicate → record the verdict → hand facts to the tracker.

Subscribes (QoS 1) to ``cleanroom/v1/agents/+/{posture,events,status,acks}``, optionally as a shared
subscription. The topic names who the sender must be and what kind; verification uses the sender's enrolled
key, its last accepted seq and the seq it announced for its Last Will. Nothing here raises on bad input.

Accepted messages are audited by the batch: one ``verdict.batch`` entry holds the Merkle root over the
messages stored since the previous one (:mod:`.audit.sealer`). Everything else is counted per sender and reason
(:mod:`.rejects`): the ``rejects`` table (what ``agents list`` shows) per batch, and one ``verdict.summary``
audit entry per sender per window, so a flood of forgeries writes a handful of rows, not one per message. A
message redelivered by QoS 1 (same agent, seq and bytes) is a ``duplicate`` and a retained status replayed to
a restarted controller is an ``old_status``: both summed up, neither counted as a reject.

Budgets (:mod:`.budgets`), spent only after the signature is checked: a message that is not accepted spends
the junk budget of the topic it came on, which only makes that topic noisy (served last by the inbox,
:mod:`.inbox`). A message that verifies is never refused for its rate (it was acknowledged: refusing it would
lose it). Per-message work does not depend on an agent's history: one endpoint row, one digest lookup,
indexed reads of the agent's *open* sessions (bounded, see ``decide.MAX_OPEN_SESSIONS``).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
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

from ..audit.recorder import Recorder
from ..audit.sealer import Sealer, SealPolicy
from ..store import DatabaseUnavailable, Store
from ..tracker import Tracker
from .budgets import Budgets, Limits
from .inbox import CAPACITY, FairInbox
from .inbox import Item as Item
from .rejects import WINDOW_S, Flush, Reason, RejectWindows, Window
from .watermarks import WatermarkBook

log = structlog.get_logger("cleanroom.controller.ingest")

KIND_OF_CHANNEL = {
    Channel.POSTURE: Kind.POSTURE,
    Channel.EVENTS: Kind.EVENT,
    Channel.STATUS: Kind.STATUS,
    Channel.ACKS: Kind.ACK,
}
UNENROLLED = "(unenrolled)"  # rejects from ids nobody enrolled are counted together: bounded rows
UNKNOWN_TOPIC = "(topic)"
# How long accepted messages' digests are kept (the daemon prunes older ones): within it a seq below the last
# accepted one that has no row was never stored (a resent gap), beyond it it may be a replay.
DEDUP_WINDOW_S = 24 * 3600.0
SUMMARY_KIND = "verdict.summary"
_NEGATIVE_TTL_S = 5.0
# A window persisted by a process that has not touched it for this long is an orphan (that process
# crashed): whoever finds it writes it to the audit trail. Live processes close theirs after WINDOW_S.
_ORPHAN_AFTER_WINDOWS = 3.0


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


def late_by(verdict: Verdict, *, now: float, max_skew_s: float) -> float | None:
    """How late (s; negative: ahead of our clock) a verified message is, when its ``ts`` is outside the
    freshness window; ``None`` when it is fresh (or a recognised Last Will, signed long before it is sent).

    A late message is history, not a replay (the seq check stands for that): an event or an ack spooled
    during a long outage is stored and acted on in order; a late posture or status is stored as evidence but
    never judged as the endpoint's current state."""
    if not verdict.ok or verdict.envelope is None or verdict.is_will:
        return None
    skew = now - verdict.envelope.ts
    return round(skew, 3) if abs(skew) > max_skew_s else None


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

    def forget(self, agent: str) -> None:
        """The agent was revoked: its cached key goes, and the store no longer returns it."""
        self._keys.pop(agent, None)
        self._missing.pop(agent, None)


class Ingest:
    """Verifies and applies messages in batches: one SQLite transaction per batch (each message that passed
    its signature check in its own savepoint, so a bug on one rolls back only that one), audit entries
    chained per message in arrival order; the batch's reject counts and due summaries in the same
    transaction.

    ``shared``: this process is one of a ``--share-group``. The broker then deals one agent's messages over
    the group's processes, each of which sees an increasing subsequence (the broker keeps per-publisher order),
    so the replay rule is per process: *replayed = seq not above the last seq this process accepted from
    that sender*. The database's UNIQUE (agent, seq) stops a message from being acted on twice across the
    group, endpoint state only moves forward (the tracker ignores older seqs) and the stale window bounds the
    rest. Without a share group the stored last_seq is the rule (one writer). Budgets and windows are per
    process.
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
        limits: Limits | None = None,
        window_s: float = WINDOW_S,
        dedup_window_s: float = DEDUP_WINDOW_S,
        seal: SealPolicy | None = None,
    ) -> None:
        self._store = store
        self._recorder = recorder
        # Accepted messages are audited by the batch: one Merkle root over many (audit/sealer.py).
        self.sealer = Sealer(store, recorder, seal)
        self._tracker = tracker
        self._keys = keys
        self._max_skew_s = max_skew_s
        self._dedup_window_s = dedup_window_s
        self._on_ack = on_ack
        self._clock = clock
        self._shared = shared
        self._accepted: dict[str, int] = {}  # shared: last seq accepted by this process, per sender
        # Seqs whose batch committed, told back to their agents (watermarks.py; the daemon publishes them).
        self.watermarks = WatermarkBook()
        self.budgets = Budgets(limits)
        self._junk_in_batch: list[tuple[str, float]] | None = None  # inside handle_batch: junk to charge
        self.windows = RejectWindows(window_s)
        self._owner = uuid.uuid4().hex  # whose persisted windows are whose (share groups, restarts)
        self._next_orphan_check = 0.0
        # What this process did with each message it was handed, by outcome or reason (tests, bench), and
        # how many times a bug (an exception) was caught on the way: zero, or something is wrong.
        self.counts: Counter[str] = Counter()
        self.late = 0  # accepted messages whose ts was outside the freshness window (history)
        self.internal_errors = 0

    # -- the link's side: which queue a message goes to -----------------------------------------------------
    def sender_key(self, topic: str) -> str:
        """Who a topic speaks for, before anything is verified: the enrolled agent it names, else
        ``(unenrolled)`` or ``(topic)``. Rejects are counted and budgets kept under this key."""
        parsed = parse_agent_topic(topic)
        if parsed is None or parsed[1] not in KIND_OF_CHANNEL:
            return UNKNOWN_TOPIC
        try:
            return parsed[0] if self._keys.is_enrolled(parsed[0]) else UNENROLLED
        except DatabaseUnavailable:
            # Only the queue it waits in (fairness), nothing judged: an agent whose key is not cached yet
            # waits with the unenrolled until the database is back and verification decides.
            return UNENROLLED

    def inbox(self, capacity: int = CAPACITY) -> FairInbox:
        """The queue between the broker link and :meth:`handle_batch`, fed by this ingest's budgets."""
        return FairInbox(
            key_of=self.sender_key,
            noisy=lambda key: self.budgets.noisy(key, self._clock()),
            admit_noisy=lambda key: self.budgets.admit_noisy(key, self._clock()),
            on_overflow=self.overflowed,
            capacity=capacity,
        )

    def overflowed(self, key: str, item: Item) -> None:
        """The inbox dropped ``item`` unread (its sender is noisy and its queue full): count it."""
        topic, payload, retained = item
        self._count(
            key,
            Reason.OVERFLOW,
            "dropped unread: the sender is over its budget and its queue is full",
            self._clock(),
            {"topic": topic, "retained": retained, "bytes": len(payload)},
        )

    # -- batches ---------------------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> Outcome:
        return self.handle_batch([(topic, payload, retained)])[0]

    def handle_batch(self, items: Iterable[Item]) -> list[Outcome]:
        """Apply ``items`` in order in one transaction. Signatures (the costly part) are checked first,
        without the write lock, so that processes of a share group verify in parallel and hold the lock only
        to apply. Raises only when the transaction itself cannot commit (then none of the batch is stored,
        and its counts stay for the next batch)."""
        checked = [
            (topic, payload, retained, self._check_signature(topic, payload))
            for topic, payload, retained in items
        ]
        outcomes: list[Outcome] = []
        # A failed commit is retried with the same messages: what this process counted and keeps in memory
        # goes back with the transaction, so that the retry counts each message once. Its replay rule, what
        # the sealer counts as waiting (audit/sealer.py), the reject windows and the tallies.
        accepted = dict(self._accepted)
        waiting = self.sealer.waiting
        windows = self.windows.snapshot()
        counts = self.counts.copy()
        late = self.late
        # A retried batch meets its junk again: charged once it commits, so that a retry does not charge
        # it twice (the budgets are not part of what the transaction undoes).
        self._junk_in_batch = []
        try:
            with self._store.transaction():
                # The senders' endpoint rows in one query, not one per message (store.prefetch_endpoints).
                self._store.prefetch_endpoints(
                    signed.envelope.sender
                    for *_, signed in checked
                    if signed is not None and signed.ok and signed.envelope is not None
                )
                for topic, payload, retained, signed in checked:
                    outcomes.append(self._handle_one(topic, payload, retained, signed))
                self.sealer.after_batch(self._clock())
                self._write(self.windows.flush(self._clock()))
        except BaseException:
            self._accepted = accepted
            self.sealer.undo(waiting)
            self.windows.restore(windows)
            self.counts = counts
            self.late = late
            raise
        finally:
            charges, self._junk_in_batch = self._junk_in_batch or [], None
        for key, at in charges:
            self.budgets.charge_junk(key, at)
        for *_, signed in checked:
            # Committed: whatever became of a message the agent signed, it need not send it again.
            if signed is not None and signed.ok and signed.envelope is not None:
                self.watermarks.stored(signed.envelope.sender, signed.envelope.seq)
        return outcomes

    def tick(self, now: float | None = None) -> None:
        """Close due windows when no batch comes to do it, store counts of messages the inbox dropped, and
        write windows that a crashed process left behind. Called every second or so by the daemon."""
        now = self._clock() if now is None else now
        if now >= self._next_orphan_check:
            self._next_orphan_check = now + self.windows.window_s
            self._recover_orphans(now)
        if self.windows.pending() or self.windows.due(now):
            self._flush(now, close_all=False)
        self.sealer.tick(now)

    def close(self) -> None:
        """Shutdown: every open window is written now (nothing counted is left unaudited), and every stored
        message is covered by a batch."""
        self._flush(self._clock(), close_all=True)
        self.sealer.seal_all()

    def _flush(self, now: float, *, close_all: bool) -> None:
        flush = self.windows.flush(now, close_all=close_all)
        try:
            with self._store.transaction():
                self._write(flush)
        except BaseException:
            self.windows.undo(flush)
            raise

    def _write(self, flush: Flush) -> None:
        for (sender, reason), (n, at) in flush.counts.items():
            self._store.count_reject(sender, reason, at, n)
        for w in flush.touched:
            self._store.save_reject_window(self._owner, w.sender, w.opened, w.last, self._summary(w))
        for w in flush.closed:
            self._audit_window(w, self._summary(w))
            self._store.delete_reject_window(self._owner, w.sender)

    def _summary(self, w: Window) -> str:
        return json.dumps(w.summary(self.windows.window_s), separators=(",", ":"), sort_keys=True)

    def _audit_window(self, w: Window, summary_json: str, *, recovered: bool = False) -> None:
        data = json.loads(summary_json)
        if recovered:
            data["recovered"] = True  # written by another start than the one that counted it
        self._recorder.record(SUMMARY_KIND, w.sender, data, actor=w.sender)
        log.warning(
            "messages_not_accepted",
            sender=w.sender,
            counts=data["counts"],
            window_s=data["window_s"],
            recovered=recovered,
        )

    def _recover_orphans(self, now: float) -> None:
        before = now - _ORPHAN_AFTER_WINDOWS * self.windows.window_s
        orphans = self._store.reject_windows(updated_before=before, other_than=self._owner)
        if not orphans:
            return
        with self._store.transaction():
            for owner, sender, opened, last, summary_json in orphans:
                # The delete decides who writes it: one process of a share group, once.
                if self._store.delete_reject_window(owner, sender, updated_before=before):
                    self._audit_window(Window(sender, opened, last), summary_json, recovered=True)

    # -- one message -------------------------------------------------------------------------------------------
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
        except RecursionError:  # json.loads on a deeply nested document
            return Verdict(VerdictStatus.MALFORMED, "not JSON: nested too deeply")
        except DatabaseUnavailable:
            raise  # the key could not be read: the batch waits (unacknowledged), nothing is judged
        except Exception:  # a bug must not lose the batch; the apply step records it per message
            log.exception("verify_error", topic=topic[:200])
            self.internal_errors += 1
            return Verdict(VerdictStatus.MALFORMED, "internal error while verifying")

    def _handle_one(self, topic: str, payload: bytes, retained: bool, signed: Verdict | None) -> Outcome:
        try:
            if signed is None or not signed.ok:
                # Refused on its form or signature: nothing to store but a count, no savepoint needed.
                return self._refused_unsigned(topic, payload, retained, signed)
            # Verdict, state, decision and audit of one message land together or not at all.
            with self._store.savepoint():
                return self._handle(topic, payload, retained, signed)
        except DatabaseUnavailable:
            raise  # not this message's fault: the whole batch is retried once the database is back
        except Exception:  # a bug on one message must not stop ingest; it is logged and audited
            log.exception("ingest_error", topic=topic[:200])
            self.internal_errors += 1
            try:
                with self._store.savepoint():
                    self._recorder.record("ingest.error", topic[:200], {"bytes": len(payload)})
                self._count(
                    self.sender_key(topic),
                    Reason.MALFORMED,
                    "internal error while applying (see the ingest.error entry)",
                    self._clock(),
                    {"topic": topic, "retained": retained, "bytes": len(payload)},
                )
            except Exception:
                log.exception("audit_failed")
            return Outcome.REJECTED

    def _refused_unsigned(
        self, topic: str, payload: bytes, retained: bool, signed: Verdict | None
    ) -> Outcome:
        now = self._clock()
        base = {"topic": topic, "retained": retained, "bytes": len(payload)}
        if signed is None:
            self._count(UNKNOWN_TOPIC, Reason.MALFORMED, "not an agent-to-controller topic", now, base)
            return Outcome.REJECTED
        key = self.sender_key(topic)
        self._count(key, Reason(signed.status.value), signed.detail, now, {**base, "seq": signed.seq})
        return Outcome.REJECTED

    def _handle(self, topic: str, payload: bytes, retained: bool, signed: Verdict) -> Outcome:
        now = self._clock()
        parsed = parse_agent_topic(topic)
        assert parsed is not None  # signed is not None only for an agent topic
        agent, channel = parsed  # the verified sender: verify checked the envelope's against the topic's
        ep = self._store.endpoint(agent)
        verdict = check_sequence(
            signed,
            last_seq=self._accepted.get(agent) if self._shared else ep.last_seq,
            will_seq=ep.will_seq,
            now=now,
            max_skew_s=None,  # history is not refused for its age: see late_by
        )
        digest = hashlib.sha256(payload).hexdigest()
        base: dict[str, object] = {
            "topic": topic,
            "seq": verdict.seq,
            "retained": retained,
            "bytes": len(payload),
        }
        if (
            verdict.status is VerdictStatus.REPLAYED
            and signed.envelope is not None
            and isinstance(signed.body, Event | Ack)  # an older posture or status is merely superseded
            and now - signed.envelope.ts < self._dedup_window_s
            and self._store.message_digest(agent, signed.envelope.seq) is None
        ):
            # Below the last accepted seq, yet never stored, and recent enough that a stored one would still
            # have its row: a message that was skipped (lost at the broker, dropped unread by a noisy inbox,
            # dealt to a share-group member that died) and is now resent by the agent's spool. History, not a
            # replay; the tracker never moves endpoint state back for an older seq.
            verdict = signed
        late = late_by(verdict, now=now, max_skew_s=self._max_skew_s)
        if late is not None:
            base["late_s"] = late
        if not verdict.ok:
            seq = verdict.seq
            if (
                verdict.status is VerdictStatus.REPLAYED
                and seq is not None
                and self._store.message_digest(agent, seq) == digest
            ):
                # Genuine (signed, stored before): a redelivery after a restart is no junk. Charging it would
                # make the agent noisy and have the inbox drop its next messages unread.
                self._count(
                    agent, Reason.DUPLICATE, "the same bytes as an accepted message", now, base, junk=False
                )
                return Outcome.DUPLICATE
            expected = _expected_old_status(channel, verdict, retained)
            if expected is not None:
                # Signed by the agent (the signature is checked before seq and ts), only old: the broker
                # replays the retained status to each new subscription, and a Will superseded by a newer
                # connection can arrive late. Summed up, not counted as an attack.
                self._count(
                    agent, Reason.OLD_STATUS, verdict.detail, now, {**base, "expected": expected}, junk=False
                )
                return Outcome.OLD_STATUS
            self._count(agent, Reason(verdict.status.value), verdict.detail, now, base)
            return Outcome.REJECTED

        envelope = verdict.envelope
        assert envelope is not None  # ok verdicts carry both
        seq = envelope.seq
        kind = envelope.kind.value
        if not self._store.record_message(agent, seq, kind, digest, now, ts=envelope.ts, late_s=late):
            if self._store.message_digest(agent, seq) == digest:
                # A Last Will (exempt from the replay check) again, or with a share group a redelivery
                # another process of the group already accepted.
                # Genuine (signed, stored before): a redelivery after a restart is no junk. Charging it would
                # make the agent noisy and have the inbox drop its next messages unread.
                self._count(
                    agent, Reason.DUPLICATE, "the same bytes as an accepted message", now, base, junk=False
                )
                return Outcome.DUPLICATE
            # Same (agent, seq), other bytes: accepted once already (by this or another process).
            detail = f"seq {seq} already accepted with other content"
            self._count(agent, Reason.REPLAYED, detail, now, base)
            return Outcome.REJECTED
        if self._shared and not verdict.is_will:
            self._accepted[agent] = max(seq, self._accepted.get(agent, seq))
        self.sealer.accepted(now)  # covered by the next verdict.batch entry (its row in messages is the leaf)
        body = verdict.body
        if late is not None:
            self.late += 1
        if late is not None and isinstance(body, Posture | Status):
            # Evidence of what the endpoint was, stored (digest, audit) but never judged as what it is now:
            # the endpoint's state moves only on fresh reports (and silence is decided on those alone).
            pass
        elif isinstance(body, Posture):
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
        self.counts[Outcome.ACCEPTED.value] += 1
        return Outcome.ACCEPTED

    def _count(
        self,
        key: str,
        reason: Reason,
        detail: str,
        now: float,
        base: Mapping[str, object],
        *,
        junk: bool = True,
    ) -> None:
        """A message not acted on: counted in its sender's window; spends the topic's junk budget (a
        verified sender over its own budget is noisy already)."""
        self.counts[reason.value] += 1
        if junk:
            if self._junk_in_batch is not None:
                self._junk_in_batch.append((key, now))  # charged once the batch commits
            else:
                self.budgets.charge_junk(key, now)
        if self.windows.add(key, reason, now, {**base, "detail": detail}):
            log.warning(
                "message_not_accepted",
                sender=key,
                reason=reason.value,
                topic=str(base.get("topic", ""))[:200],
                detail=detail[:200],
                note=f"further ones from this sender are summed up for {self.windows.window_s:g} s",
            )
