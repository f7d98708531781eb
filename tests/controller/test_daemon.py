"""The whole controller loop in-process against a real Mosquitto: policy published signed and retained;
violation → decision → signed end_session → ack → session ended, in that order in the audit; retries with
the same command id; silence (3 × heartbeat) acted on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiomqtt

from cleanroom_controller import AuditEntry
from cleanroom_protocol import (
    POLICY_TOPIC,
    Ack,
    AckResult,
    Channel,
    Command,
    Kind,
    PolicyDocument,
    agent_topic,
    verify,
)
from tests.support.mosquitto import Mosquitto

from .harness import agent_client, publish, running_controller, until
from .helpers import Sender, posture, session


async def next_message(client: aiomqtt.Client, timeout: float = 10) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            return message
    raise AssertionError("no message")


async def test_policy_is_published_signed_and_retained(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with running_controller(mosquitto, tmp_path / "c") as run, agent_client(mosquitto) as c:
        await c.subscribe(POLICY_TOPIC, qos=1)
        message = await next_message(c)
        assert message.retain
        key = run.controller.key.public_key()
        verdict = verify(bytes(message.payload), public_key_for=lambda s: key if s == "controller" else None,
                         max_skew_s=None, expected_kind=Kind.POLICY)  # fmt: skip
        assert verdict.ok, verdict.detail
        assert isinstance(verdict.body, PolicyDocument)
        assert verdict.body.policy.id == "offshore-billing"


async def test_violation_ends_the_session_and_the_audit_shows_the_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    a1 = Sender("a1")
    async with (
        running_controller(mosquitto, tmp_path / "c", senders=(a1,)) as run,
        agent_client(mosquitto) as c,
    ):
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture(sessions=(session(),))))
        await until(
            lambda: [s.state.value for s in run.store.sessions()] == ["running"], timeout=5, what="running"
        )

        await publish(
            c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture(denied=("scrot",), sessions=(session(),)))
        )
        message = await next_message(c)
        key = run.controller.key.public_key()
        verdict = verify(bytes(message.payload), public_key_for=lambda s: key, expected_kind=Kind.COMMAND)
        assert verdict.ok, verdict.detail
        command = verdict.body
        assert isinstance(command, Command)
        assert command.session_id == "s-100-1"
        assert "denied_process:scrot" in command.reason
        assert run.store.session("a1", "s-100-1").state.value == "ending"

        ack = Ack(command_id=command.id, result=AckResult.ENDED, sessions=["s-100-1"])
        await publish(c, "a1", Channel.ACKS, a1.seal(Kind.ACK, ack))
        await until(lambda: run.store.session("a1", "s-100-1").state.value == "ended",
                    timeout=5, what="session ended")  # fmt: skip
        assert run.store.session("a1", "s-100-1").ended_reason == "violation:denied_process:scrot"
        await until(
            lambda: any(e.kind == "action.outcome" for e in run.store.audit_entries()),
            timeout=5,
            what="outcome",
        )

        # The report is covered by the batch entry sealed after it (within the seal policy's age).
        await until(
            lambda: (run.store.message_leaf("a1", 2) or ("", "", None, None))[2] is not None,
            timeout=5,
            what="report sealed",
        )
        # Each entry found by its own identity over the whole trail, so every comparison below can fail.
        entries = list(run.store.audit_entries())

        def where(what: str, match: Callable[[AuditEntry], bool]) -> int:
            found = [i for i, e in enumerate(entries) if match(e)]
            assert len(found) == 1, (
                f"{what}: expected one entry, found {found} in {[e.kind for e in entries]}"
            )
            return found[0]

        leaf = run.store.message_leaf("a1", 2)
        assert leaf is not None and leaf[0] == "posture"
        report = where("report", lambda e: e.kind == "verdict.batch" and e.id == leaf[2])
        decision = where(
            "decision",
            lambda e: (
                e.kind == "decision"
                and e.data.get("cause_seq") == 2
                and "denied_process:scrot" in e.data.get("reasons", [])
            ),
        )
        sent = where("command", lambda e: e.kind == "command" and e.data.get("id") == command.id)
        acked = where("ack", lambda e: e.kind == "ack" and e.data.get("command_id") == command.id)
        assert decision < sent < acked, [e.kind for e in entries]
        assert decision < report  # the decision is written with the message, the batch seals it after
        assert run.store.command(command.id).result == "ended"


async def test_unanswered_command_is_retried_with_the_same_id_then_expires(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    a1 = Sender("a1")
    async with (
        running_controller(
            mosquitto, tmp_path / "c", senders=(a1,), command_timeout=0.2, command_attempts=3
        ) as run,
        agent_client(mosquitto) as c,
    ):
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        await publish(
            c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture(denied=("obs",), sessions=(session(),)))
        )
        ids, seqs = [], []
        for _ in range(3):
            message = await next_message(c)
            data = json.loads(message.payload)
            ids.append(data["body"]["id"])
            seqs.append(data["seq"])
        assert len(set(ids)) == 1
        assert seqs == sorted(set(seqs))  # a fresh seq per attempt: the agent's replay check passes
        await until(lambda: run.store.command(ids[0]).state.value == "expired", timeout=5, what="expired")
        assert run.store.session("a1", "s-100-1").state.value == "ending"
        assert any(e.kind == "command.expired" for e in run.store.audit_entries())


async def test_silent_endpoint_is_acted_on(mosquitto: Mosquitto, tmp_path: Path) -> None:
    policy = tmp_path / "fast.toml"
    policy.write_text('id = "fast"\nversion = 1\n[report]\nheartbeat_s = 1\n')
    a1 = Sender("a1")
    async with (
        running_controller(mosquitto, tmp_path / "c", senders=(a1,), policy=policy) as run,
        agent_client(mosquitto) as c,
    ):
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        p = posture(sessions=(session(),), policy=run.controller.policy.policy)
        await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, p))
        message = await next_message(c, timeout=8)  # after 3 × 1 s of silence
        assert "silent" in json.loads(message.payload)["body"]["reason"]
        assert run.store.endpoint("a1").condition.value == "silent"


async def test_pending_command_is_resumed_after_a_restart(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A command left pending by a stopped controller is sent again (same id) when it starts."""
    from cleanroom_controller import CommandRecord, CommandState, Store

    data = tmp_path / "c"
    store = Store.open(data)
    store.save_command(
        CommandRecord("c-left", "a1", "s-100-1", "end_session", "violation:x", CommandState.PENDING, 1, 1.0)
    )
    store.close()
    a1 = Sender("a1")
    async with agent_client(mosquitto) as c:
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        async with running_controller(mosquitto, data, senders=(a1,)) as run:
            message = await next_message(c)
            assert json.loads(message.payload)["body"]["id"] == "c-left"
            ack = Ack(command_id="c-left", result=AckResult.NOT_FOUND)
            await publish(c, "a1", Channel.ACKS, a1.seal(Kind.ACK, ack))
            await until(lambda: run.store.command("c-left").state.value == "acked", timeout=5, what="acked")


async def test_commands_for_several_sessions_arrive_in_seq_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The agent rejects a seq below one it accepted: concurrent commands must be published in seq order."""
    a1 = Sender("a1")
    async with (
        running_controller(mosquitto, tmp_path / "c", senders=(a1,)) as _,
        agent_client(mosquitto) as c,
    ):
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        sessions = tuple(session(f"s-{n}-1", pid=n) for n in range(100, 105))
        await publish(
            c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture(denied=("obs",), sessions=sessions))
        )
        received = [json.loads((await next_message(c)).payload) for _ in sessions]
        assert sorted(m["body"]["session_id"] for m in received) == [s.id for s in sessions]
        seqs = [m["seq"] for m in received]
        assert seqs == sorted(seqs)


async def test_retries_stop_when_the_endpoint_is_compliant_again(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    a1 = Sender("a1")
    async with (
        running_controller(
            mosquitto, tmp_path / "c", senders=(a1,), command_timeout=0.3, command_attempts=50
        ) as run,
        agent_client(mosquitto) as c,
    ):
        await c.subscribe(agent_topic("a1", Channel.COMMANDS), qos=1)
        await publish(
            c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture(denied=("obs",), sessions=(session(),)))
        )
        command_id = json.loads((await next_message(c)).payload)["body"]["id"]
        await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture(sessions=(session(),))))
        await until(
            lambda: run.store.command(command_id).state.value == "cancelled", timeout=5, what="cancelled"
        )
        await until(
            lambda: run.store.session("a1", "s-100-1").command_result == "cancelled",
            timeout=5,
            what="outcome",
        )
        s = run.store.session("a1", "s-100-1")
        assert (s.state.value, s.ended_reason) == ("running", None)
        assert any(e.kind == "command.cancelled" for e in run.store.audit_entries())


async def test_link_reconnects_and_resubscribes_after_a_broker_restart(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The broker comes back without its persisted sessions (as a replaced or wiped broker does): the
    controller's subscriptions are gone with them, so only a controller that subscribes again on every
    connect sees the posture sent after the restart."""
    a1 = Sender("a1")
    async with running_controller(mosquitto, tmp_path / "c", senders=(a1,)) as run:
        mosquitto.stop()
        await until(
            lambda: not run.controller.link.connected, timeout=10, what="link noticed the broker is gone"
        )
        mosquitto.forget_sessions()
        mosquitto.start()
        await until(lambda: run.controller.link.connected, timeout=20, what="link reconnected")
        async with agent_client(mosquitto) as c:
            await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture()))
            await until(
                lambda: run.store.endpoint("a1").compliant is True, timeout=5, what="posture after restart"
            )


async def test_shared_subscription_ingests(mosquitto: Mosquitto, tmp_path: Path) -> None:
    a1 = Sender("a1")
    async with (
        running_controller(mosquitto, tmp_path / "c", senders=(a1,), share_group="controllers") as run,
        agent_client(mosquitto) as c,
    ):
        await publish(c, "a1", Channel.POSTURE, a1.seal(Kind.POSTURE, posture()))
        await until(lambda: run.store.endpoint("a1").compliant is True, timeout=5, what="posture via $share")
