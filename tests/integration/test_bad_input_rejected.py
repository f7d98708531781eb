"""Bad input is rejected, counted and audited, and nothing crashes.

Against a running controller (real process, real Mosquitto) an enrolled identity driven by the test
publishes a forged signature, a replayed seq, malformed JSON, an oversized payload and a message from an
unknown sender; each is rejected with its verdict, counted per (sender, status) and written to the audit
trail (summed up per sender per window: one ``verdict.summary`` entry with counts by reason, written at the
latest when the controller stops), and the controller still accepts and judges the next good message. A
policy signed by the wrong key on ``cleanroom/v1/policy`` is refused by a real agent (event
``policy.rejected``), which keeps its policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_protocol import (
    MAX_MESSAGE_BYTES,
    POLICY_TOPIC,
    Channel,
    Kind,
    PolicyDocument,
    load_policy,
    policy_hash,
    seal,
)
from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, SimulatedAgent, audit_entries, cleanroom, publish
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def _audited_rejects(db: Path) -> list[dict[str, Any]]:
    return [
        e
        for e in audit_entries(db)
        if "reject" in e["kind"]
        or any(
            status in e["data_json"]
            for status in (
                "bad_signature",
                "replayed",
                "malformed",
                "too_large",
                "unknown_sender",
                "duplicate",
            )
        )
    ]


def test_forged_replayed_malformed_oversized_and_unknown_messages_are_rejected_counted_and_audited(
    world: Cleanroom, mosquitto: Mosquitto
) -> None:
    world.write_policy(heartbeat_s=5)
    policy = load_policy(world.policy_path)
    ctl = world.start_controller()
    sim = SimulatedAgent("sim-agent")
    pub = world.root / "sim-agent.pub"
    pub.write_text(sim.public_pem())
    ctl.enrol("sim-agent", pub)
    port = mosquitto.port

    # The retained status reaches the controller whenever it subscribes: seeing it online means it listens.
    publish(port, [sim.online()])
    world.wait_agent(
        "sim-agent", timeout=20, what="the controller to see sim-agent's retained status", online=True
    )
    good = sim.posture(policy)
    publish(port, [good])
    world.wait_agent("sim-agent", timeout=20, what="sim-agent judged compliant", compliant=True)

    posture_topic = sim.topic(Channel.POSTURE)
    forged = sim.seal(Kind.POSTURE, sim.posture_body(policy), key=Ed25519PrivateKey.generate())
    # A correctly signed message whose seq is not above the last accepted (a counter gone backwards).
    reused_seq = sim.seal(Kind.POSTURE, sim.posture_body(policy, denied=[world.denied_name]), seq=sim.seq - 1)
    stranger = SimulatedAgent("stranger")
    oversized = b'{"v":1,"pad":"' + b"x" * (MAX_MESSAGE_BYTES + 1024) + b'"}'
    bad: dict[str, tuple[str, bytes, bool]] = {
        "bad_signature": (posture_topic, forged, False),
        "replayed": (posture_topic, reused_seq, False),
        "malformed": (posture_topic, b'{"v": 1, "kind": "posture", this is not json', False),
        "too_large": (posture_topic, oversized, False),
        "unknown_sender": stranger.posture(policy),
    }
    # The exact bytes of an accepted message again: a QoS 1 redelivery looks the same, so it is
    # recognised as a duplicate (audited, not acted on twice) rather than counted as a reject.
    publish(port, [*bad.values(), good])

    # Still alive and still judging: a good (violating) posture after the bad ones is accepted.
    publish(port, [sim.posture(policy, denied=[world.denied_name])])
    row = world.wait_agent(
        "sim-agent", timeout=20, what="the good violating posture after the bad input judged", compliant=False
    )
    assert f"denied_process:{world.denied_name}" in row["reasons"], f"unexpected reasons: {row}"

    # Counted: per enrolled sender in `agents list --json` (field rejects), unenrolled senders together
    # in the text listing's footer.
    expected = {s for s in bad if s != "unknown_sender"}
    row = world.wait_agent("sim-agent", timeout=10, what="the rejects counted for sim-agent")
    rejects = row.get("rejects") or {}
    assert expected <= set(rejects), f"sim-agent's rejects {rejects} lack {sorted(expected - set(rejects))}"
    assert all(rejects[s] == 1 for s in expected), f"each reject should be counted once: {rejects}"
    footer = ctl.cli("agents", "list").stdout
    assert "unknown_sender" in footer, (
        f"the unknown sender's reject is not counted in `agents list`:\n{footer}"
    )

    # Audited once per sender per window (``verdict.summary``, counts by reason): the window is still open
    # (10 s), and a clean stop writes it.
    ctl.assert_alive()
    assert ctl.stop() == 0
    audited = _audited_rejects(ctl.db_path)
    for status in [*bad, "duplicate"]:
        assert any(status in e["data_json"] for e in audited), (
            f"no audit entry for the {status} verdict; reject-like entries: "
            + json.dumps(
                [(e["id"], e["kind"], e["subject"], e["data_json"][:200]) for e in audited], indent=1
            )
        )
    summary = next(
        json.loads(e["data_json"])
        for e in audited
        if e["kind"] == "verdict.summary" and e["subject"] == "sim-agent"
    )
    assert summary["counts"] == {s: 1 for s in [*expected, "duplicate"]}, summary
    verify = ctl.audit_verify()
    assert verify.returncode == 0, f"audit verify failed:\n{verify.stdout}{verify.stderr}"


def test_agent_refuses_a_policy_signed_by_the_wrong_key_and_keeps_its_policy(
    world: Cleanroom, mosquitto: Mosquitto
) -> None:
    world.write_policy(heartbeat_s=1)
    policy = load_policy(world.policy_path)
    ctl = world.start_controller()
    tap = world.tap("cleanroom/v1/agents/it-agent/posture")
    agent = world.add_agent("it-agent")
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )

    evil = policy.model_copy(update={"version": policy.version + 98, "description": "forged"})
    evil = evil.model_copy(update={"processes": evil.processes.model_copy(update={"deny": []})})
    forged = seal(
        Kind.POLICY,
        PolicyDocument(policy=evil, hash=policy_hash(evil)),
        sender="controller",
        seq=2**40,
        key=Ed25519PrivateKey.generate(),
    )
    published_at = len(tap.on("/it-agent/posture"))
    publish(mosquitto.port, [(POLICY_TOPIC, forged, True)], client_id="it-forger")

    def rejected() -> list[dict[str, Any]]:
        return [
            e for e in ctl.events() if e.get("agent") == "it-agent" and e.get("kind") == "policy.rejected"
        ]

    wait_for(
        rejected, timeout=20, what="a policy.rejected event from it-agent at the controller", interval=0.3
    )
    # Postures sent after the forged policy still carry the policy in force.
    wait_for(
        lambda: len(tap.on("/it-agent/posture")) >= published_at + 2,
        timeout=15,
        what="two postures after the forged policy",
    )
    for message in tap.on("/it-agent/posture")[published_at:]:
        ref = message.envelope()["body"]["policy"]
        assert ref is not None and (ref["id"], ref["version"]) == (policy.id, policy.version), (
            f"the agent's policy changed after a forged one: {ref}"
        )
    applied = [e for e in ctl.events() if e.get("agent") == "it-agent" and e.get("kind") == "policy.applied"]
    assert applied, "no policy.applied event for the genuine policy"
    forged_applied = [e for e in applied if (e.get("details") or {}).get("version") == evil.version]
    assert not forged_applied, f"the forged policy was applied: {forged_applied}"
    world.wait_agent("it-agent", timeout=10, what="it-agent still compliant", online=True, compliant=True)
    agent.assert_alive()
    ctl.assert_alive()
