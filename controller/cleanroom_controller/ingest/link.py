"""The controller's one MQTT connection: persistent session (clean_session=not self._persistent, so QoS 1 commands and
agent messages queue across reconnects), subscriptions on connect, jittered reconnect backoff, and a
``publish`` that waits for the link instead of failing while it is down.

Acknowledgement after commit: paho sends the QoS 1 PUBACK only when told (``manual_ack``), and every message
handed on carries a :class:`Receipt`; ingest calls :meth:`BrokerLink.ack` once the transaction that stored
it (or counted its rejection) has committed. Until then the broker keeps the message: a controller killed
before its commit gets it again on reconnect (persistent session). What the controller holds unacknowledged
is bounded by aiomqtt's queue (``max_queued_incoming_messages``) plus the inbox and the batch in hand, not by
the broker's ``max_inflight_messages``: Mosquitto 2.0.11 (Debian 12), measured, sends a whole window more
for each PUBACK (window 100, one PUBACK: 200 held; eight: 900), with MQTT 3.1.1 and with v5's Receive
Maximum alike. Past aiomqtt's queue a message is discarded unacknowledged: the broker keeps it for the next
connection and the agent resends it (docs/data-path.md). A receipt from an earlier connection is ignored: the broker redelivers those messages itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog

from cleanroom_protocol import BrokerAddress, Reconnector, client_tls_context

log = structlog.get_logger("cleanroom.controller.link")


@dataclass(frozen=True, slots=True)
class Receipt:
    """What acknowledges one received message to the broker: the connection it came on and its MQTT id."""

    connection: int
    mid: int
    qos: int


MessageHandler = Callable[[str, bytes, bool, Receipt], Coroutine[Any, Any, None]]
ConnectHook = Callable[[], Coroutine[Any, Any, None]]


class BrokerLink:
    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        keepalive: int,
        persistent: bool = True,
        subscriptions: list[str],
        on_message: MessageHandler,
        on_connect: ConnectHook | None = None,
    ) -> None:
        self._address = address
        self._client_id = client_id
        self._keepalive = keepalive
        self._persistent = persistent
        self._subscriptions = subscriptions
        self._reconnector = Reconnector()
        self._on_message = on_message
        self._on_connect = on_connect
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._connection = 0  # counts connections: a receipt of an earlier one is not acknowledged
        self._reading = asyncio.Event()
        self._reading.set()
        self.acked = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        while True:
            await self._connected.wait()
            client = self._client
            if client is None:
                continue
            try:
                await client.publish(topic, payload, qos=1, retain=retain)
                return
            except aiomqtt.MqttError as exc:
                log.warning("publish_failed", topic=topic, error=str(exc))
                self._connected.clear()

    def ack(self, receipt: Receipt) -> None:
        """PUBACK for one message: call only once what it caused is committed. From the event loop."""
        client = self._client
        if client is None or receipt.connection != self._connection or receipt.qos == 0:
            return  # that connection is gone: the broker sends the message again on the next one
        client._client.ack(receipt.mid, receipt.qos)  # aiomqtt does not expose manual acks
        self.acked += 1

    def stop_reading(self) -> None:
        """Hand on no more messages (shutdown): what is not handed on stays unacknowledged at the broker."""
        self._reading.clear()

    def request_stop(self) -> None:
        """The controller is stopping: a lost connection from now on ends :meth:`run`, no reconnect."""
        self._reconnector.request_stop()

    async def run(self) -> None:
        await self._reconnector.run(self._session, self._lost)

    def _lost(self, error: Exception | None, attempt: int, delay: float) -> None:
        log.warning("broker_disconnected", error=str(error), retry_in=round(delay, 2), attempt=attempt)

    async def _session(self) -> None:
        try:
            client = aiomqtt.Client(
                self._address.host,
                self._address.port,
                identifier=self._client_id,
                clean_session=not self._persistent,
                keepalive=self._keepalive,
                # mqtts://: the shared TLS context (CA, this process's certificate), re-read per connection
                tls_context=client_tls_context(self._address),
                max_concurrent_outgoing_calls=200,
                # The bound on what is delivered and not yet acked (the broker's inflight window is not one:
                # see the module docstring). Beyond it aiomqtt drops a message unacknowledged (not lost).
                max_queued_incoming_messages=100_000,
            )
            # A watermark round publishes up to 100 at once (daemon): aiomqtt would log a warning for each
            # publish beyond 10 pending, hundreds of lines a second under load.
            client.pending_calls_threshold = 200
            # PUBACK after the commit, not when paho has read the message (aiomqtt 2.5 does not expose it).
            client._client.manual_ack_set(True)
            self._connection += 1
            connection = self._connection
            async with client:
                _no_delay(client)
                for flt in self._subscriptions:
                    await client.subscribe(flt, qos=1)
                self._client = client
                self._connected.set()
                self._reconnector.connected()
                log.info("broker_connected", broker=self._address.url)
                if self._on_connect is not None:
                    asyncio.get_running_loop().create_task(self._on_connect(), name="on_connect")
                messages = aiter(client.messages)
                # What paho has handed to aiomqtt and nobody has taken yet. aiomqtt's iterator makes a task
                # and an asyncio.wait per message (~15 µs, a tenth of a message's cost under load): what is
                # queued already is taken at once, the iterator waits only for the next one to arrive.
                queued = client._queue  # aiomqtt does not expose it
                while True:
                    await self._reading.wait()  # cleared on shutdown: the rest stays with the broker
                    message = queued.get_nowait() if not queued.empty() else await anext(messages)
                    payload = message.payload
                    raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
                    receipt = Receipt(connection, message.mid, message.qos)
                    await self._on_message(str(message.topic), bytes(raw), bool(message.retain), receipt)
        finally:
            self._connected.clear()
            self._client = None


def _no_delay(client: aiomqtt.Client) -> None:
    """Send each MQTT packet at once (TCP_NODELAY): an end_session or a PUBACK must not wait for Nagle's
    algorithm to collect more (with the peer's delayed ACK that is ~40 ms per hop on an idle link)."""
    sock = client._client.socket()  # aiomqtt does not expose it
    if isinstance(sock, socket.socket):  # an SSLSocket too
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
