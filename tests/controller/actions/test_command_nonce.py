"""Commands name their agent and carry a random nonce and an expiry; every retry carries the same ones;
a command past its expiry (resumed after a long outage) is not sent again. The controller in-process
against a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiomqtt

from cleanroom_controller import CommandRecord, CommandState, Store
from cleanroom_controller.actions.drivers.agent import command_lifetime
from cleanroom_protocol import Channel, Kind, agent_topic
from tests.controller.harness import agent_client, publish, running_controller, until
from tests.controller.helpers import Sender, posture, session
from tests.support.mosquitto import Mosquitto


async def next_body(client: aiomqtt.Client, timeout: float = 10) -> dict[str, object]:
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            body: dict[str, object] = json.loads(message.payload)["body"]
            return body
    raise AssertionError("no message")


def test_a_command_lives_for_its_retry_schedule_plus_the_clock_skew_allowed() -> None:
    assert command_lifetime(5.0, 6) == 5 + 10 + 20 + 40 + 40 + 40 + 300  # the defaults: 455 s
    assert command_lifetime(3600.0, 100) == 3600.0  # capped: the agent refuses longer


async def test_retries_carry_the_same_agent_nonce_and_expiry(mosquitto: Mosquitto, tmp_path: Path) -> None:
    a1 = Sender("a1")
    async with (
        running_controller(
            mosquitto, tmp_path / "c", senders=(a1,), command_timeout=0.2, command_attempts=3
        ) as run,
        agent_client(mosquitto) as c,
    ):
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        sessions = (session("s-1-1", pid=1), session("s-2-1", pid=2))
        await publish(
            c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture(denied=("obs",), sessions=sessions))
        )
        bodies = [await next_body(c) for _ in range(6)]  # two commands, three attempts each
        by_id: dict[object, set[tuple[object, object, object]]] = {}
        for b in bodies:
            by_id.setdefault(b["id"], set()).add((b["agent"], b["nonce"], b["expires_at"]))
        assert len(by_id) == 2
        fields = [next(iter(same)) for same in by_id.values()]
        assert all(len(same) == 1 for same in by_id.values()), by_id  # every retry the same
        assert {f[0] for f in fields} == {"a1"}
        nonces = [str(f[1]) for f in fields]
        assert all(re.fullmatch(r"[0-9a-f]{32}", n) for n in nonces) and nonces[0] != nonces[1]
        for command_id, (_, nonce, expires_at) in zip(by_id, fields, strict=True):
            stored = run.store.command(str(command_id))
            assert stored is not None and (stored.nonce, stored.expires_at) == (nonce, expires_at)
            assert stored.expires_at == stored.created + command_lifetime(0.2, 3)


async def test_a_command_past_its_expiry_is_not_resumed(mosquitto: Mosquitto, tmp_path: Path) -> None:
    data = tmp_path / "c"
    store = Store.open(data)
    store.save_command(
        CommandRecord(
            "c-stale", "a1", "s-100-1", "end_session", "violation:x", CommandState.PENDING, 1, 1.0,
            nonce="ab" * 16, expires_at=2.0,
        )
    )  # fmt: skip
    store.close()
    async with agent_client(mosquitto) as c:
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        async with running_controller(mosquitto, data, senders=(Sender("a1"),)) as run:
            await until(
                lambda: run.store.command("c-stale").state.value == "expired", timeout=5, what="expired"
            )
            assert run.store.command("c-stale").attempts == 1  # no attempt made
            # A marker sent after the verdict arrives after anything the controller published before it.
            await publish(c, "a1", Channel.COMMANDS, b'{"marker": true}')
            first = await next_body_or_raw(c)
            assert first == {"marker": True}, f"the expired command was sent again: {first}"


async def next_body_or_raw(client: aiomqtt.Client, timeout: float = 10) -> object:
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            data = json.loads(message.payload)
            return data.get("body", data)
    raise AssertionError("no message")
