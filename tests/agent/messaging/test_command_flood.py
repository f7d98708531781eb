"""Signature first, then budgets: a flood of junk on an agent's command topic (a real agent process, a real
Mosquitto) does not cost a genuine signed end_session its place, and becomes a bounded number of
``command.rejected`` events whose counts add up to every junk message sent."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import paho.mqtt.client as paho

from cleanroom_agent.messaging.refusals import DETAILED_PER_WINDOW, WINDOW_S
from cleanroom_protocol import Channel, agent_topic
from tests.agent.conftest import AGENT_ID, Controller, FakeClients, Tap, events
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for

JUNK = 6000
ACK_DEADLINE_S = 10.0  # from the genuine command's PUBACK to its ack on the broker (measured: ~1.5 s)


def junk(n: int) -> bytes:
    """Cheap and expensive junk: not JSON, the wrong shape, an unknown sender, and (most of it) envelopes
    claiming to be the controller with a signature that does not verify (the costliest to refuse)."""
    if n % 10 == 0:
        return b"{not json"
    if n % 10 == 1:
        return b'{"v": 1}'
    envelope = {
        "v": 1,
        "kind": "command",
        "sender": "controller" if n % 10 > 2 else "mallory",
        "seq": 10**9 + n,  # above anything genuine: the replay check cannot be what stops it
        "ts": time.time(),
        "body": {"id": f"junk-{n}", "action": "end_session", "agent": AGENT_ID},
        "sig": base64.b64encode(bytes(64)).decode(),
    }
    return json.dumps(envelope).encode()


def rejected_counts(tap: Tap, agent: Any) -> tuple[int, int]:
    """(events, refusals they stand for): a single refusal is 1, a summary says its count."""
    found = events(tap, agent, "command.rejected")
    return len(found), sum(int(e["details"].get("count", 1)) for e in found)


def test_a_genuine_command_is_acted_on_through_a_flood_of_junk(
    mosquitto: Mosquitto, tap: Tap, agent_factory: Any, controller: Controller, clients: FakeClients
) -> None:
    agent = agent_factory(mosquitto.url)
    agent.start()
    client = clients.start()
    started = wait_for(lambda: events(tap, agent, "session.started"), timeout=15, what="session.started")
    session_id = started[0]["details"]["session"]
    topic = agent_topic(AGENT_ID, Channel.COMMANDS)
    genuine = controller.command("genuine-1", session_id)

    flooder = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="flooder")
    flooder.max_inflight_messages_set(1000)
    flooder.max_queued_messages_set(0)
    flooder.connect("127.0.0.1", mosquitto.port)
    flooder.loop_start()
    try:
        flood_started = time.monotonic()
        for n in range(JUNK // 2):
            flooder.publish(topic, junk(n), qos=1)
        sent_genuine = flooder.publish(topic, genuine, qos=1)  # in the middle of the flood
        for n in range(JUNK // 2, JUNK):
            last = flooder.publish(topic, junk(n), qos=1)
        sent_genuine.wait_for_publish(30)
        genuine_at = time.monotonic()
        last.wait_for_publish(60)
        flood_s = time.monotonic() - flood_started
    finally:
        flooder.loop_stop()
        flooder.disconnect()

    acks = wait_for(
        lambda: tap.on(Channel.ACKS),
        timeout=max(0.0, genuine_at + ACK_DEADLINE_S - time.monotonic()),
        what="the genuine command's ack",
    )
    ack_latency = time.monotonic() - genuine_at  # an upper bound: the flood was still being sent
    ack = agent.verify(acks[0].payload).body
    assert (ack.command_id, ack.result.value, ack.sessions) == ("genuine-1", "ended", [session_id])
    assert client.wait(5) is not None, "the genuine end_session did not end the session"

    # Every junk message refused and counted, in at most (detailed + 1 summary) events per window.
    wait_for(
        lambda: rejected_counts(tap, agent)[1] >= JUNK,
        timeout=WINDOW_S * 3,
        what=f"{JUNK} refusals accounted for; now {rejected_counts(tap, agent)}",
    )
    elapsed = time.monotonic() - flood_started
    n_events, n_refused = rejected_counts(tap, agent)
    windows = int(elapsed / WINDOW_S) + 2
    print(f"\nflood: {JUNK} junk published in {flood_s:.2f} s; genuine ack within {ack_latency:.2f} s of its PUBACK; "
          f"{n_events} command.rejected events for {n_refused} refusals")  # fmt: skip
    assert n_refused == JUNK
    assert n_events <= windows * (DETAILED_PER_WINDOW + 1), [
        e["details"] for e in events(tap, agent, "command.rejected")
    ]
    summaries = [e["details"] for e in events(tap, agent, "command.rejected") if "count" in e["details"]]
    assert summaries and all({"bad_signature", "window_s"} <= s.keys() for s in summaries)
    assert agent.proc.poll() is None
