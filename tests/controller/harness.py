"""Runs the real controller daemon in the test's event loop against a real Mosquitto, plus an agent-side
MQTT client that signs with a real key."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiomqtt

from cleanroom_controller import Store, load_settings
from cleanroom_controller.daemon import Controller
from cleanroom_protocol import Channel, agent_topic
from tests.support.mosquitto import Mosquitto
from tests.support.wait import async_wait_for

from .helpers import POLICY_FILE, Sender, enrol

T = TypeVar("T")


@dataclass
class Running:
    controller: Controller
    store: Store  # a second connection, as the CLI would have
    data_dir: Path


@contextlib.asynccontextmanager
async def running_controller(
    broker: Mosquitto,
    data_dir: Path,
    *,
    senders: tuple[Sender, ...] = (),
    policy: Path = POLICY_FILE,
    **overrides: object,
) -> AsyncIterator[Running]:
    settings = load_settings(
        None,
        broker=broker.url,
        data_dir=data_dir,
        policy=policy,
        command_timeout=overrides.pop("command_timeout", 1.0),
        silence_check_s=0.1,
        **overrides,
    )
    controller = Controller(settings)
    for s in senders:
        enrol(controller.store, s.agent, s.key)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop), name="controller-under-test")
    reader = Store.open(data_dir)
    try:
        await async_wait_for(
            _connected(controller, task), timeout=10, what="controller connected to the broker"
        )
        yield Running(controller, reader, data_dir)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        reader.close()


def _connected(controller: Controller, task: asyncio.Task[None]):
    async def check() -> bool:
        if task.done():
            task.result()  # raise what stopped it
        return controller.link.connected

    return check


async def until(condition: Callable[[], T], *, timeout: float, what: str) -> T:
    """Wait on a condition without blocking the loop the controller under test runs in."""

    async def check() -> T:
        return condition()

    return await async_wait_for(check, timeout=timeout, what=what)


@contextlib.asynccontextmanager
async def agent_client(broker: Mosquitto, ident: str = "test-agent") -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=ident) as client:
        yield client


async def publish(
    client: aiomqtt.Client, agent: str, channel: Channel, payload: bytes, retain: bool = False
) -> None:
    await client.publish(agent_topic(agent, channel), payload, qos=1, retain=retain)
