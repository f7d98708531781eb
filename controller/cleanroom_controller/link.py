"""The controller's one MQTT connection: persistent session (clean_session=not self._persistent, so QoS 1 commands and
agent messages queue across reconnects), subscriptions on connect, jittered reconnect backoff, and a
``publish`` that waits for the link instead of failing while it is down."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import aiomqtt
import structlog

from cleanroom_protocol import BrokerAddress, Reconnector, client_tls_context

log = structlog.get_logger("cleanroom.controller.link")

MessageHandler = Callable[[str, bytes, bool], Coroutine[Any, Any, None]]
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

    def request_stop(self) -> None:
        """The controller is stopping: a lost connection from now on ends :meth:`run`, no reconnect."""
        self._reconnector.request_stop()

    async def run(self) -> None:
        await self._reconnector.run(self._session, self._lost)

    def _lost(self, error: Exception | None, attempt: int, delay: float) -> None:
        log.warning("broker_disconnected", error=str(error), retry_in=round(delay, 2), attempt=attempt)

    async def _session(self) -> None:
        try:
            async with aiomqtt.Client(
                self._address.host,
                self._address.port,
                identifier=self._client_id,
                clean_session=not self._persistent,
                keepalive=self._keepalive,
                # mqtts://: the shared TLS context (CA, this process's certificate), re-read per connection
                tls_context=client_tls_context(self._address),
                max_concurrent_outgoing_calls=200,
                max_queued_incoming_messages=100_000,
            ) as client:
                _no_delay(client)
                for flt in self._subscriptions:
                    await client.subscribe(flt, qos=1)
                self._client = client
                self._connected.set()
                self._reconnector.connected()
                log.info("broker_connected", broker=self._address.url)
                if self._on_connect is not None:
                    asyncio.get_running_loop().create_task(self._on_connect(), name="on_connect")
                async for message in client.messages:
                    payload = message.payload
                    raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
                    await self._on_message(str(message.topic), bytes(raw), bool(message.retain))
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
