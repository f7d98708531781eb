"""A real agent refuses commands signed by the controller that are expired, for another agent, without a
nonce, or that reuse another command's nonce (each a ``command.rejected`` event naming why, the session
left running); a retry of a command already acted on (same id and nonce, a new seq) gets the same ack."""

from __future__ import annotations

import secrets
import time
from typing import Any

from cleanroom_protocol import Channel, Command, CommandAction, Kind, agent_topic
from tests.agent.conftest import AGENT_ID, Controller, FakeClients, Tap, events
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for


def acks(tap: Tap, agent: Any) -> list[Any]:
    return [agent.verify(m.payload).body for m in tap.on(Channel.ACKS)]


def test_expired_misaddressed_nonceless_and_replayed_commands_are_refused(
    mosquitto: Mosquitto, tap: Tap, agent_factory: Any, controller: Controller, clients: FakeClients
) -> None:
    agent = agent_factory(mosquitto.url)
    agent.start()
    client = clients.start()
    started = wait_for(lambda: events(tap, agent, "session.started"), timeout=15, what="session.started")
    sid = started[0]["details"]["session"]
    topic = agent_topic(AGENT_ID, Channel.COMMANDS)

    nonce = secrets.token_hex(16)
    old_style = Command(id="c-old", action=CommandAction.END_SESSION, session_id=sid)  # no agent/nonce/expiry
    for raw in (
        controller.command("c-expired", sid, expires_at=time.time() - 1),
        controller.command("c-elsewhere", sid, agent="ep-2"),
        controller.sign(Kind.COMMAND, old_style),
    ):
        tap.publish(topic, raw)
    refused = wait_for(
        lambda: (r := events(tap, agent, "command.rejected")) and len(r) >= 3 and r,
        timeout=10,
        what="3 refusals",
    )
    reasons = [e["details"]["reason"] for e in refused]
    assert [r.split(":")[0] for r in reasons] == ["expired", "not_for_us", "malformed"], reasons
    assert (
        "'c-expired'" in reasons[0]
        and "'ep-2'" in reasons[1]
        and "without agent, nonce, expires_at" in reasons[2]
    )
    assert acks(tap, agent) == [] and client.poll() is None  # nothing acted on

    genuine = controller.command("c-1", sid, nonce=nonce)
    tap.publish(topic, genuine)
    wait_for(lambda: acks(tap, agent), timeout=15, what="the genuine command's ack")
    first = acks(tap, agent)[0]
    assert (first.command_id, first.result.value) == ("c-1", "ended")
    assert client.wait(5) is not None

    # The controller's retry: same id, same nonce, a new seq (a new envelope) → the same ack, no refusal.
    tap.publish(topic, controller.command("c-1", sid, nonce=nonce))
    wait_for(lambda: len(acks(tap, agent)) == 2, timeout=10, what="the ack again for the retry")
    assert acks(tap, agent)[1] == first
    # Another command carrying c-1's nonce is a replay; c-next (sent after it) shows it was judged.
    tap.publish(topic, controller.command("c-2", None, nonce=nonce))
    tap.publish(topic, controller.command("c-next", "s-none"))
    wait_for(lambda: len(acks(tap, agent)) == 3, timeout=10, what="c-next's ack")
    assert [a.command_id for a in acks(tap, agent)] == ["c-1", "c-1", "c-next"]
    replay = events(tap, agent, "command.rejected")[3:]
    assert [e["details"]["reason"].split(":")[0] for e in replay] == ["replayed"]
    assert "already used by command 'c-1'" in replay[0]["details"]["reason"]
