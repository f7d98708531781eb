"""The embedded evaluation broker (amqtt, in-process, loopback only) with a real aiomqtt client; the
Mosquitto config writer."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from cleanroom_controller import EmbeddedBroker, mosquitto_config
from tests.support.mosquitto import free_port


async def test_embedded_broker_carries_qos1_and_stops() -> None:
    port = free_port()
    broker = EmbeddedBroker(port)
    assert broker.config()["listeners"]["default"]["bind"] == f"127.0.0.1:{port}"
    await broker.start()
    try:
        async with (
            aiomqtt.Client("127.0.0.1", port, identifier="sub") as sub,
            aiomqtt.Client("127.0.0.1", port, identifier="pub") as pub,
        ):
            await sub.subscribe("cleanroom/v1/agents/+/posture", qos=1)
            await pub.publish("cleanroom/v1/agents/a1/posture", b"hello", qos=1)
            async with asyncio.timeout(5):
                message = await anext(aiter(sub.messages))
            assert (str(message.topic), bytes(message.payload)) == (
                "cleanroom/v1/agents/a1/posture",
                b"hello",
            )
    finally:
        await broker.shutdown()
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port, identifier="late", timeout=2):
            pass


def test_mosquitto_config() -> None:
    conf = mosquitto_config(port=1884, bind="0.0.0.0")
    assert "listener 1884 0.0.0.0" in conf
    assert "persistence true" in conf
    assert "message_size_limit 65536" in conf
