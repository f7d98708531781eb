"""The agent's single MQTT connection.

Connects with a signed Last Will, subscribes to its commands and the retained policy, publishes the
outbox strictly in seq order (a row leaves the spool only after the broker's PUBACK), verifies every
incoming message against the controller key, and reconnects with jittered backoff. Bad input is
rejected (counted, reported through ``on_reject``), never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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
    agent_topic,
    verify,
)

from . import __version__
from .localsock import TokenBucket
from .outbox import Outbox

log = structlog.get_logger("cleanroom_agent.link")

CONTROLLER_LAST_SEQ = "controller_last_seq"
POLICY_WAIT_S = 2.0
INCOMING_RATE = 20.0  # messages/s on average from the controller side; more is dropped
INCOMING_BURST = 100


@dataclass
class LinkCallbacks:
    """What the daemon does with verified input and connection changes."""

    on_command: Callable[[Command], Awaitable[None]]
    on_command_replayed: Callable[[str], bool]  # command id → True if its ack was re-sent
    on_policy: Callable[[PolicyDocument, bytes], Awaitable[None]]
    on_reject: Callable[[str, str], None]  # (what: "command" | "policy", reason)
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
        self._bucket = TokenBucket(INCOMING_RATE, INCOMING_BURST)
        self._last_rate_report = 0.0
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
            if self.connected:
                self.connected = False
                self.offline_since = time.time()
                self._cb.on_disconnected()

    async def _connect_and_serve(self) -> None:
        will_seq, will_payload = self._outbox.will()
        status_topic = agent_topic(self._agent_id, Channel.STATUS)
        tls = ssl.create_default_context() if self._broker.tls else None
        client = aiomqtt.Client(
            self._broker.host,
            self._broker.port,
            identifier=f"cleanroom-agent-{self._agent_id}",
            will=aiomqtt.Will(status_topic, will_payload, qos=1, retain=True),
            keepalive=self._keepalive,
            tls_context=tls,
            clean_session=False,  # commands sent while we reconnect are queued by the broker
            max_queued_incoming_messages=1000,
            timeout=10,
        )
        async with client:
            self._reconnector.connected()
            self._policy_seen.clear()
            await client.subscribe(agent_topic(self._agent_id, Channel.COMMANDS), qos=1)
            await client.subscribe(POLICY_TOPIC, qos=1)
            log.info("broker_connected", broker=self._broker.url, will_seq=will_seq)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client), name="link.receive")
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
            self._spool.delete(row.seq)
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
        while self._spool.count():
            self._drained.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), 0.5)

    # --- incoming ----------------------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                await self._handle(str(message.topic), message.payload)
            except Exception:  # never let one message take the link down
                self.rejected += 1
                log.exception("incoming_message_failed", topic=str(message.topic))

    async def _handle(self, topic: str, payload: object) -> None:
        is_policy = topic == POLICY_TOPIC
        what = "policy" if is_policy else "command"
        if not isinstance(payload, bytes | bytearray):
            self._reject(what, "malformed: payload is not bytes")
            return
        raw = bytes(payload)
        if is_policy and not raw:
            return  # a cleared retained policy: keep the one in force
        if not self._bucket.take():
            self.rejected += 1
            if time.monotonic() - self._last_rate_report > 10:
                self._last_rate_report = time.monotonic()
                self._cb.on_reject(what, "rate_limited")
            return
        if len(raw) > MAX_MESSAGE_BYTES:
            self._reject(what, f"too_large: {len(raw)} bytes")
            return
        if is_policy:
            await self._handle_policy(raw)
        else:
            await self._handle_command(raw)

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
            self._reject("policy", f"{verdict.status.value}: {verdict.detail}")
            return
        await self._cb.on_policy(verdict.body, raw)

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
            self._reject("command", f"{verdict.status.value}: {verdict.detail}")
            return
        self._spool.set_state(CONTROLLER_LAST_SEQ, str(verdict.envelope.seq))
        await self._cb.on_command(verdict.body)

    def _reject(self, what: str, reason: str) -> None:
        self.rejected += 1
        log.warning(f"{what}_rejected", reason=reason)
        self._cb.on_reject(what, reason[:1000])
