"""The embedded evaluation broker (amqtt, in-process, loopback only) with a real aiomqtt client; the
Mosquitto config writer."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from cleanroom_controller import EmbeddedBroker, mosquitto_config, write_mosquitto_config
from tests.support.mosquitto import free_port, mosquitto_binary
from tests.support.wait import wait_for


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


def test_written_mosquitto_config_starts_a_real_mosquitto(tmp_path: Path) -> None:
    port = free_port()
    conf = write_mosquitto_config(
        tmp_path / "mosquitto.conf", port=port, persistence_dir=tmp_path / "db", log_file=tmp_path / "log"
    )
    text = conf.read_text() + ("user root\n" if os.geteuid() == 0 else "")
    conf.write_text(text)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)])
    try:
        wait_for(lambda: _listening(port) or proc.poll() is not None, timeout=10, what="mosquitto listening")
        assert proc.poll() is None, "mosquitto refused the written config"
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_mosquitto_config() -> None:
    conf = mosquitto_config(port=1884, bind="0.0.0.0")
    assert "listener 1884 0.0.0.0" in conf
    assert "persistence true" in conf
    assert "message_size_limit 65536" in conf
