"""Signing glue between the agent's messages and the spool: each message is sealed with the seq the
spool allocates for it, in the same transaction, and lands on its channel's topic.

The record of the agent ending sessions (``agent.fail_closed``, ``session.ended``, the acks of
``end_session``: ``decisions.is_evidence_event`` / ``is_evidence_ack``) may use the spool's reserve beyond
its bound, so the evidence of failing closed on a full spool reaches the controller.

An event or ack the full spool refuses (any other once the spool is full, evidence once the reserve is full
too) is not lost silently: it is counted twice, durably and in one transaction: ``spool_refused`` (every one, ever: the posture reports it, so the controller and an auditor
see the gap) and the count since the last report, which goes out as one ``spool.overflow`` event as soon
as there is room again. An ack refused is also remembered with its command (``commands.py``), so the
controller's retry of the command gets it once there is room.
"""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from cleanroom_protocol import (
    Ack,
    AgentState,
    Channel,
    Event,
    Kind,
    Posture,
    Severity,
    Status,
    agent_topic,
    seal,
)

from .. import __version__
from ..decisions import is_evidence_ack, is_evidence_event
from .spool import Spool, SpoolFull

# Rows of these keys replace older unsent rows of the same key; events and acks never coalesce.
COALESCE_POSTURE = "posture"
COALESCE_STATUS = "status"
DROPPED_KEY = "events_dropped_spool_full"  # refused since the last spool.overflow event
REFUSED_KEY = "spool_refused"  # refused ever: never reset


class Outbox:
    def __init__(self, spool: Spool, *, agent_id: str, key: Ed25519PrivateKey) -> None:
        self.spool = spool
        self.agent_id = agent_id
        self._key = key
        # Events refused while the outbox was full. Read once here; written only when it changes, so the
        # common path (an event, room in the outbox) costs no extra statement.
        self._dropped = spool.get_int(DROPPED_KEY) or 0
        self._refused = spool.get_int(REFUSED_KEY) or self._dropped  # a spool from before the total

    @property
    def refused(self) -> int:
        """Events and acks the full spool refused, ever (durable): posture's ``spool_refused``."""
        return self._refused

    def _put(
        self,
        kind: Kind,
        body: BaseModel,
        channel: Channel,
        *,
        retain: bool = False,
        coalesce: str | None = None,
        evidence: bool = False,
    ) -> int:
        return self.spool.enqueue(
            agent_topic(self.agent_id, channel),
            lambda seq: seal(kind, body, sender=self.agent_id, seq=seq, key=self._key),
            retain=retain,
            coalesce_key=coalesce,
            evidence=evidence,
        )

    def posture(self, posture: Posture) -> int:
        return self._put(Kind.POSTURE, posture, Channel.POSTURE, coalesce=COALESCE_POSTURE)

    def event(self, event: Event) -> int | None:
        """Queue ``event``; ``None`` when the outbox is full (the event is counted, and the count goes out
        as a ``spool.overflow`` event as soon as there is room again). Evidence may use the reserve."""
        return self._put_or_count(
            Kind.EVENT, event, Channel.EVENTS, at=event.at, evidence=is_evidence_event(event.kind)
        )

    def _put_or_count(
        self, kind: Kind, body: BaseModel, channel: Channel, *, at: float, evidence: bool
    ) -> int | None:
        """Queue an event or ack after any pending ``spool.overflow`` report; ``None`` (counted) if refused.

        The overflow report is an ordinary row: while the spool is full it waits for room, and evidence
        going into the reserve meanwhile does not wait for it (it reports a gap, it is not the gap)."""
        try:
            self._report_overflow(at)
        except SpoolFull:
            if not evidence:
                self._count_refused()
                return None
        try:
            return self._put(kind, body, channel, evidence=evidence)
        except SpoolFull:
            self._count_refused()
            return None

    def _report_overflow(self, at: float) -> None:
        if self._dropped:
            overflow = Event(
                kind="spool.overflow",
                at=at,
                severity=Severity.CRITICAL,
                details={"dropped": self._dropped, "refused_total": self._refused},
            )
            self._put(Kind.EVENT, overflow, Channel.EVENTS)
            self.spool.set_state(DROPPED_KEY, "0")
            self._dropped = 0

    def _count_refused(self) -> None:
        self.spool.set_states({DROPPED_KEY: str(self._dropped + 1), REFUSED_KEY: str(self._refused + 1)})
        self._dropped += 1
        self._refused += 1

    def ack(self, ack: Ack) -> int | None:
        """Queue ``ack``; ``None`` when the outbox is full (counted like an event; the command keeps its ack,
        so the controller's retry gets it again once there is room). An ``end_session`` answer is evidence:
        it may use the reserve."""
        return self._put_or_count(
            Kind.ACK, ack, Channel.ACKS, at=time.time(), evidence=is_evidence_ack(ack.result)
        )

    def status(self, status: Status) -> int:
        return self._put(Kind.STATUS, status, Channel.STATUS, retain=True, coalesce=COALESCE_STATUS)

    def will(self) -> tuple[int, bytes]:
        """Allocate the seq reserved for this connection's Last Will and sign the Will with it."""
        seq = self.spool.next_seq()
        body = Status(state=AgentState.OFFLINE, agent_version=__version__, reason="will")
        return seq, seal(Kind.STATUS, body, sender=self.agent_id, seq=seq, key=self._key)
