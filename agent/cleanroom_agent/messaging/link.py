"""The agent's single MQTT connection.

Connects with a signed Last Will, subscribes to its commands, its watermark and the retained policy,
publishes the outbox strictly in seq order (the broker's PUBACK marks a row sent; it leaves the spool only
when the controller's signed watermark lists it as stored: after a reconnect every unlisted row is sent
again, and so is one sent ``RESEND_AFTER_S`` ago that a later stored seq shows was lost), verifies every
incoming message against the controller key, and reconnects with jittered backoff. Bad input is
rejected (counted, reported through ``on_reject`` in bounded form: ``refusals.py``), never fatal.

Incoming messages are checked in this order, cheapest and most discriminating first, so that junk never
costs a genuine command its place:

1. admission, as the message is read off the socket (before it may take a place in the client's queue):
   the size, then the signature against the controller key. Junk, whatever its volume, is counted and
   dropped here; it never reaches a queue or a budget.
2. the budgets: only messages signed by the controller draw on them, fresh commands, redeliveries (an old
   seq: the ack is sent again) and policies each on their own, so replays of a captured command cannot
   starve new ones.
3. the full verdict (staleness, the replay check against the last accepted seq), then what the command
   itself must be (``commandchecks.py``: for this agent, not expired, its nonce unused), then the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiomqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cleanroom_protocol import (
    MAX_MESSAGE_BYTES,
    POLICY_TOPIC,
    AgentState,
    BrokerAddress,
    Channel,
    Command,
    Kind,
    PolicyDocument,
    Reconnector,
    Status,
    VerdictStatus,
    Watermark,
    agent_topic,
    client_tls_context,
    verify,
)

from .. import __version__
from ..control.commandchecks import Refusal, check_command
from ..sessions.localsock import TokenBucket
from .outbox import Outbox
from .refusals import RefusalReport, RefusalTally

log = structlog.get_logger("cleanroom_agent.messaging.link")

CONTROLLER_LAST_SEQ = "controller_last_seq"
POLICY_WAIT_S = 2.0
# Budgets for messages signed by the controller (junk never draws on them), per second and burst.
COMMAND_RATE, COMMAND_BURST = 20.0, 100  # new commands
REDELIVERY_RATE, REDELIVERY_BURST = 5.0, 20  # commands with an old seq: each one costs an ack sent again
POLICY_RATE, POLICY_BURST = 2.0, 10
WATERMARK_RATE, WATERMARK_BURST = 20.0, 100  # the controller sends at most 2/s; more are replays
# A row sent this long ago and still unlisted while the controller stored a later seq was lost on the way:
# it is sent again. Longer than a watermark round plus a commit, so reordering alone never triggers it.
RESEND_AFTER_S = 5.0
# Admitted (signed, within budget) messages waiting for the handler; the budgets keep it far below this.
MAX_QUEUED_INCOMING = 1000
REFUSAL_FLUSH_S = 1.0  # how often held-back refusal counts are checked for a summary


class RejectSink(Protocol):
    """``(what, reason)`` for one refusal; a summary adds ``count``, ``window_s`` and counts per verdict."""

    def __call__(self, what: str, reason: str, /, **counts: float) -> None: ...


@dataclass
class LinkCallbacks:
    """What the daemon does with verified input and connection changes."""

    on_command: Callable[[Command], Awaitable[None]]
    on_command_replayed: Callable[[str], bool]  # command id → True if its ack was re-sent
    on_policy: Callable[[PolicyDocument, bytes], Awaitable[None]]
    on_reject: RejectSink  # (what: "command" | "policy", reason)
    on_connected: Callable[[], None]
    on_disconnected: Callable[[], None] = field(default=lambda: None)


class Link:
    def __init__(
        self,
        *,
        broker: BrokerAddress,
        agent_id: str,
        controller_id: str,
        controller_key: Ed25519PublicKey,
        outbox: Outbox,
        callbacks: LinkCallbacks,
        keepalive: int = 10,
    ) -> None:
        self._broker = broker
        self._agent_id = agent_id
        self._controller_id = controller_id
        self._controller_key = controller_key
        self._outbox = outbox
        self._spool = outbox.spool
        self._cb = callbacks
        self._keepalive = keepalive
        self._wake = asyncio.Event()
        self._policy_seen = asyncio.Event()
        self._drained = asyncio.Event()
        self._command_budget = TokenBucket(COMMAND_RATE, COMMAND_BURST)
        self._redelivery_budget = TokenBucket(REDELIVERY_RATE, REDELIVERY_BURST)
        self._policy_budget = TokenBucket(POLICY_RATE, POLICY_BURST)
        self._watermark_budget = TokenBucket(WATERMARK_RATE, WATERMARK_BURST)
        self._watermark_topic = agent_topic(agent_id, Channel.WATERMARK)
        self._stored_high = 0  # the highest seq the controller said it stored
        self.covered = 0  # rows deleted because a watermark listed them
        self.resent = 0  # rows sent again (after a reconnect, or found missing)
        self.refusals = RefusalTally()
        self.connected = False
        self._reconnector = Reconnector()
        self.offline_since: float | None = time.time()
        self.rejected = 0
        self.published = 0
        self._spool.on_enqueue(self._on_enqueue)

    def _on_enqueue(self) -> None:
        self._drained.clear()
        self._wake.set()

    # --- connection loop ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        """The agent is stopping: a lost connection from now on ends :meth:`run` instead of reconnecting."""
        self._reconnector.request_stop()

    async def run(self) -> None:
        await self._reconnector.run(self._session, self._lost)

    def _lost(self, error: Exception | None, attempt: int, delay: float) -> None:
        if isinstance(error, BaseExceptionGroup):  # from the session's TaskGroup
            expected = error.split(aiomqtt.MqttError)[1] is None  # nothing but broker errors in it
        else:
            expected = error is None or isinstance(error, aiomqtt.MqttError)
        if expected:
            log.warning("broker_connection_lost", error=str(error), attempt=attempt, retry_in=round(delay, 2))
        else:
            # A bug or a local fault (disk full, ...) must not end the agent: log it and reconnect.
            log.error(
                "link_failed", error=repr(error), attempt=attempt, retry_in=round(delay, 2), exc_info=error
            )

    async def _session(self) -> None:
        try:
            await self._connect_and_serve()
        finally:
            self._report(self.refusals.flush_all())
            if self.connected:
                self.connected = False
                self.offline_since = time.time()
                self._cb.on_disconnected()

    async def _connect_and_serve(self) -> None:
        will_seq, will_payload = self._outbox.will()
        status_topic = agent_topic(self._agent_id, Channel.STATUS)
        # mqtts://: the shared TLS context (CA, this device's certificate), re-read at each connection so a
        # renewed certificate is used from the next reconnect. With a client certificate the broker takes
        # the client id from its CN (use_username_as_clientid); ours is the same id, so logs agree.
        tls = client_tls_context(self._broker)
        client = aiomqtt.Client(
            self._broker.host,
            self._broker.port,
            identifier=self._agent_id if self._broker.tls_files.cert else f"cleanroom-agent-{self._agent_id}",
            will=aiomqtt.Will(status_topic, will_payload, qos=1, retain=True),
            keepalive=self._keepalive,
            tls_context=tls,
            clean_session=False,  # commands sent while we reconnect are queued by the broker
            queue_type=self._admitting_queue(),
            max_queued_incoming_messages=MAX_QUEUED_INCOMING,
            timeout=10,
        )
        async with client:
            self._reconnector.connected()
            self._policy_seen.clear()
            await client.subscribe(agent_topic(self._agent_id, Channel.COMMANDS), qos=1)
            await client.subscribe(self._watermark_topic, qos=1)
            await client.subscribe(POLICY_TOPIC, qos=1)
            # What no watermark listed goes out again, in seq order, before anything new.
            resent = self._spool.resend_all()
            if resent:
                self.resent += resent
                log.info("outbox_resend", rows=resent, why="reconnected")
            log.info("broker_connected", broker=self._broker.url, will_seq=will_seq)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client), name="link.receive")
                tg.create_task(self._report_refusals(), name="link.refusals")
                tg.create_task(self._find_gaps(), name="link.gaps")
                try:
                    await asyncio.wait_for(self._policy_seen.wait(), POLICY_WAIT_S)
                except TimeoutError:
                    log.info("no_retained_policy", waited_s=POLICY_WAIT_S)
                self._outbox.status(
                    Status(
                        state=AgentState.ONLINE,
                        will_seq=will_seq,
                        agent_version=__version__,
                        reason="connected",
                    )
                )
                self.connected = True
                self.offline_since = None
                self._cb.on_connected()
                tg.create_task(self._publish(client), name="link.publish")

    async def _publish(self, client: aiomqtt.Client) -> None:
        while True:
            row = self._spool.first()
            if row is None:
                self._drained.set()
                self._wake.clear()
                # re-check after clearing: an enqueue between first() and clear() must not be missed
                if self._spool.first() is None:
                    await self._wake.wait()
                continue
            await client.publish(row.topic, row.payload, qos=1, retain=row.retain)  # returns after PUBACK
            self._spool.mark_sent(row.seq, time.time())  # kept until a watermark lists it
            self.published += 1

    async def drain(self, within_s: float) -> bool:
        """Wait until the outbox is empty (only meaningful while connected)."""
        if not self.connected:
            return False
        try:
            await asyncio.wait_for(self._wait_empty(), within_s)
            return True
        except TimeoutError:
            return False

    async def _wait_empty(self) -> None:
        while self._spool.unsent():
            self._drained.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), 0.5)

    # --- incoming ----------------------------------------------------------------------------------
    def _admitting_queue(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        """The client's incoming queue, admitting only what :meth:`_admit` lets through.

        The MQTT client puts each message in this queue as it reads it off the socket, before anything of
        ours runs; checking there keeps a flood of junk from filling the queue (whose overflow the client
        drops, genuine or not)."""
        admit = self._admit

        class AdmittingQueue(asyncio.Queue[aiomqtt.Message]):
            def put_nowait(self, item: aiomqtt.Message) -> None:
                if admit(str(item.topic), item.payload):
                    super().put_nowait(item)

        return AdmittingQueue

    def _admit(self, topic: str, payload: object) -> bool:
        """Size, then signature, then budget: ``True`` if the message may wait for :meth:`_handle`."""
        try:
            admitted = self._check_admission(topic, payload)
        except Exception:  # raised here it would end the connection (the MQTT client's read loop)
            log.exception("admission_failed", topic=topic)
            self._refuse("policy" if topic == POLICY_TOPIC else "command", "malformed", "admission failed")
            admitted = False
        if not admitted and topic == POLICY_TOPIC:
            self._policy_seen.set()  # nothing to apply: stop waiting for a retained policy
        return admitted

    def _check_admission(self, topic: str, payload: object) -> bool:
        is_policy = topic == POLICY_TOPIC
        is_watermark = topic == self._watermark_topic
        what = "policy" if is_policy else "watermark" if is_watermark else "command"
        if not isinstance(payload, bytes | bytearray):
            self._refuse(what, "malformed", "payload is not bytes")
            return False
        if is_policy and not payload:
            return False  # a cleared retained policy: keep the one in force
        if len(payload) > MAX_MESSAGE_BYTES:
            self._refuse(what, "too_large", f"{len(payload)} bytes")
            return False
        # Signature only (no replay or clock check yet: those need the state the handler holds).
        verdict = verify(
            bytes(payload),
            public_key_for=self._key_for,
            last_seq=None,
            max_skew_s=None,
            expected_kind=Kind.POLICY if is_policy else Kind.WATERMARK if is_watermark else Kind.COMMAND,
        )
        if not verdict.ok or verdict.envelope is None:
            self._refuse(what, verdict.status.value, verdict.detail)
            return False
        if is_policy:
            budget = self._policy_budget
        elif is_watermark:
            budget = self._watermark_budget
        else:
            last_seq = self._spool.get_int(CONTROLLER_LAST_SEQ)
            fresh = last_seq is None or verdict.envelope.seq > last_seq
            budget = self._command_budget if fresh else self._redelivery_budget
        if not budget.take():
            self._refuse(what, "rate_limited", f"signed by the controller, over the {what} budget")
            return False
        return True

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                await self._handle(str(message.topic), message.payload)
            except Exception:  # never let one message take the link down
                self.rejected += 1
                log.exception("incoming_message_failed", topic=str(message.topic))

    async def _handle(self, topic: str, payload: object) -> None:
        """An admitted message: signed by the controller, within its budget."""
        if not isinstance(payload, bytes | bytearray):
            return
        if topic == POLICY_TOPIC:
            await self._handle_policy(bytes(payload))
        elif topic == self._watermark_topic:
            self._handle_watermark(bytes(payload))
        else:
            await self._handle_command(bytes(payload))

    def _key_for(self, sender: str) -> Ed25519PublicKey | None:
        return self._controller_key if sender == self._controller_id else None

    async def _handle_policy(self, raw: bytes) -> None:
        self._policy_seen.set()
        verdict = verify(
            raw,
            public_key_for=self._key_for,
            last_seq=None,
            max_skew_s=None,
            expected_kind=Kind.POLICY,
        )
        if not verdict.ok or not isinstance(verdict.body, PolicyDocument):
            self._refuse("policy", verdict.status.value, verdict.detail)
            return
        await self._cb.on_policy(verdict.body, raw)

    def _handle_watermark(self, raw: bytes) -> None:
        """Signed by the controller (checked again here) and about us: the rows it lists leave the spool.
        No replay or clock check is needed: an old watermark only lists seqs that were stored."""
        verdict = verify(
            raw, public_key_for=self._key_for, last_seq=None, max_skew_s=None, expected_kind=Kind.WATERMARK
        )
        if not verdict.ok or not isinstance(verdict.body, Watermark):
            self._refuse("watermark", verdict.status.value, verdict.detail)
            return
        mark = verdict.body
        if mark.agent != self._agent_id:
            self._refuse("watermark", "not_for_us", f"a watermark for {mark.agent[:64]!r}")
            return
        self.covered += self._spool.covered(mark.stored)
        self._stored_high = max(self._stored_high, mark.seq)
        self._resend_gaps()

    def _resend_gaps(self) -> None:
        resent = self._spool.resend_gaps(self._stored_high, sent_before=time.time() - RESEND_AFTER_S)
        if resent:
            self.resent += resent
            log.warning("outbox_resend", rows=resent, why="missing below the controller's watermark")
            self._on_enqueue()

    async def _find_gaps(self) -> None:
        """Rows may turn out missing without another watermark (it came before they were due)."""
        while True:
            await asyncio.sleep(RESEND_AFTER_S)
            self._resend_gaps()

    async def _handle_command(self, raw: bytes) -> None:
        verdict = verify(
            raw,
            public_key_for=self._key_for,
            last_seq=self._spool.get_int(CONTROLLER_LAST_SEQ),
            expected_kind=Kind.COMMAND,
        )
        if verdict.status is VerdictStatus.REPLAYED and verdict.envelope is not None:
            # Signed by the controller, only its seq is old: a redelivery. Same command id → same ack.
            command_id = verdict.envelope.body.get("id")
            if isinstance(command_id, str) and self._cb.on_command_replayed(command_id):
                return
        if not verdict.ok or not isinstance(verdict.body, Command) or verdict.envelope is None:
            self._refuse("command", verdict.status.value, verdict.detail)
            return
        command, envelope = verdict.body, verdict.envelope
        # The controller's seq is used up whatever the command says: a second copy is a redelivery.
        self._spool.set_state(CONTROLLER_LAST_SEQ, str(envelope.seq))
        now = time.time()
        checked = check_command(
            command,
            agent_id=self._agent_id,
            signed_at=envelope.ts,
            now=now,
            nonce_owner=None if command.nonce is None else self._spool.nonce_owner(command.nonce, now),
        )
        if isinstance(checked, Refusal):
            self._refuse("command", checked.status, checked.detail)
            return
        self._spool.remember_nonce(checked.nonce, command.id, checked.expires_at, now)
        await self._cb.on_command(command)

    # --- refusals ----------------------------------------------------------------------------------
    def _refuse(self, what: str, status: str, detail: str) -> None:
        self.rejected += 1
        self._report(self.refusals.refused(what, status, detail[:1000]))

    def _report(self, reports: list[RefusalReport]) -> None:
        for report in reports:
            if report.summary:
                log.warning(
                    f"{report.what}_rejected_summary",
                    count=report.count,
                    by_status=report.by_status,
                    last=report.reason,
                    window_s=report.window_s,
                )
                self._cb.on_reject(
                    report.what,
                    report.reason,
                    count=report.count,
                    window_s=report.window_s,
                    **report.by_status,
                )
            else:
                log.warning(f"{report.what}_rejected", reason=report.reason)
                self._cb.on_reject(report.what, report.reason)

    async def _report_refusals(self) -> None:
        while True:
            await asyncio.sleep(REFUSAL_FLUSH_S)
            self._report(self.refusals.flush())
