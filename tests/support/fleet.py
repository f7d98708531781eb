"""The simulated fleet of the PostgreSQL integration tests (fail-over, database restart): enrolled identities
with real Ed25519 keys publish signed events over QoS 1 from one paho client and keep each event, as the
agent's outbox does (docs/data-path.md), until a watermark from the controllers lists it, resending what is
still unlisted a while after it was sent. A real agent cannot produce thousands of events a second here."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cleanroom_controller.store import Store
from cleanroom_protocol import Channel, Event, Kind, Policy, SessionInfo
from tests.support.procs import SimulatedAgent, publish
from tests.support.wait import wait_for

RESEND_AFTER_S = 1.5  # unlisted this long after sending: resent (the agent's outbox does the same)


class Fleet:
    """The simulated agents' one connection: publishes events (QoS 1), records the watermarks it is sent."""

    def __init__(self, port: int, agents: list[SimulatedAgent], client_id: str = "it-fleet") -> None:
        self.agents = {a.agent_id: a for a in agents}
        self.sent: dict[str, dict[int, tuple[float, bytes]]] = {a.agent_id: {} for a in agents}
        self.listed: dict[str, set[int]] = {a.agent_id: set() for a in agents}
        self.resent = 0
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = lambda c, *_: c.subscribe("cleanroom/v1/agents/+/watermark", qos=1)
        self.client.on_message = self._on_watermark
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_watermark(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        body = json.loads(msg.payload)["body"]
        with self._lock:
            listed = self.listed.get(body["agent"])
            if listed is not None:
                for first, last in body["stored"]:
                    listed.update(range(first, last + 1))

    def send_event(self, agent: SimulatedAgent, n: int) -> None:
        payload = agent.seal(Kind.EVENT, Event(kind="clipboard.blocked", at=time.time(), details={"n": n}))
        with self._lock:
            self.sent[agent.agent_id][agent.seq] = (time.monotonic(), payload)
        self.client.publish(agent.topic(Channel.EVENTS), payload, qos=1)

    def unlisted(self) -> dict[str, list[int]]:
        with self._lock:
            return {
                a: sorted(set(s) - self.listed[a]) for a, s in self.sent.items() if set(s) - self.listed[a]
            }

    def resend_unlisted(self) -> None:
        now = time.monotonic()
        for agent_id, seqs in self.unlisted().items():
            for seq in seqs:
                sent_at, payload = self.sent[agent_id][seq]
                if now - sent_at >= RESEND_AFTER_S:
                    with self._lock:
                        self.sent[agent_id][seq] = (now, payload)
                    self.client.publish(self.agents[agent_id].topic(Channel.EVENTS), payload, qos=1)
                    self.resent += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stored_events(store: Store) -> dict[str, list[int]]:
    rows = store._db.execute("SELECT agent, seq FROM events ORDER BY agent, seq").fetchall()
    out: dict[str, list[int]] = {}
    for agent, seq in rows:
        out.setdefault(str(agent), []).append(int(seq))
    return out


def start_session(
    port: int, store: Store, agent: SimulatedAgent, policy: Policy, *, client: str, session_id: str, pid: int
) -> SessionInfo:
    """``agent`` comes online with a compliant posture reporting one running session; returns once the
    controller has it as ``running``. Returns the session (a later violation reports it again).

    ``controller.started`` is audited before the controller's first subscription is in place, and the broker
    drops what is published before it: the same sealed messages are sent again every 2 s until stored, as a
    real agent resends what no watermark lists (a copy that did arrive is a counted duplicate)."""
    session = SessionInfo(id=session_id, client=client, pid=pid, pids=[pid], started=time.time())
    compliant = agent.posture_body(policy).model_copy(update={"sessions": [session]})
    messages = [agent.online(), (agent.topic(Channel.POSTURE), agent.seal(Kind.POSTURE, compliant), False)]

    def running() -> bool:
        s = store.session(agent.agent_id, session_id)
        return s is not None and s.state.value == "running"

    deadline = time.monotonic() + 20
    while True:
        publish(port, messages)
        try:
            wait_for(running, timeout=min(2.0, max(0.0, deadline - time.monotonic())), what="")
            break
        except AssertionError:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after 20 s waiting for {agent.agent_id}'s session running"
                ) from None
    return session
