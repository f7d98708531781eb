"""The agent keeps what it sent until the controller's signed watermark lists it, and sends again what a
later stored seq shows was lost. A real agent process and a real Mosquitto; the test plays the controller
(its key signs the watermarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_agent.messaging.link import RESEND_AFTER_S
from cleanroom_protocol import Channel, agent_topic
from tests.agent.conftest import AGENT_ID, Controller, Tap
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for


def test_sent_rows_leave_only_on_a_genuine_watermark_and_a_skipped_one_is_sent_again(
    tmp_path: Path, mosquitto: Mosquitto, tap: Tap, agent_factory: Any, controller: Controller
) -> None:
    agent = agent_factory(mosquitto.url)
    agent.start()
    wait_for(lambda: tap.on(Channel.POSTURE), timeout=15, what="a posture")
    wait_for(lambda: agent.outbox_seqs() == [], timeout=5, what="everything acknowledged by the broker")
    kept = agent.kept_seqs()
    assert len(kept) >= 2, f"sent rows are kept until a watermark lists them: {kept}"
    topic = agent_topic(AGENT_ID, Channel.WATERMARK)
    everything = [(kept[0], kept[-1])]

    forged = Controller(Ed25519PrivateKey.generate(), controller.public_key_file)
    tap.publish(topic, forged.watermark(everything))
    tap.publish(topic, controller.watermark(everything, agent="someone-else"))
    wait_for(
        lambda: agent.log.read_text().count("watermark_rejected") >= 2,
        timeout=5,
        what="the forged and the misaddressed watermark refused",
    )
    assert agent.kept_seqs()[: len(kept)] == kept, "a forged or misaddressed watermark deleted rows"

    # The controller stored all but the first: the rest leave; the first is below a stored seq, so once
    # it is RESEND_AFTER_S old it is published again (the broker delivers in order: it was lost).
    skipped = kept[0]
    tap.publish(topic, controller.watermark([(kept[1], kept[-1])]))
    wait_for(lambda: not set(kept[1:]) & set(agent.kept_seqs()), timeout=5, what="the listed rows deleted")
    assert agent.kept_seqs()[0] == skipped

    own = [agent_topic(AGENT_ID, c) for c in (Channel.POSTURE, Channel.EVENTS, Channel.STATUS)]

    def sent_twice() -> bool:
        seqs = [agent.verify(m.payload, max_skew_s=None).seq for m in tap.all() if m.topic in own]
        return seqs.count(skipped) >= 2

    wait_for(sent_twice, timeout=RESEND_AFTER_S * 3, what=f"seq {skipped} sent again")
    tap.publish(topic, controller.watermark([(skipped, skipped)]))
    wait_for(lambda: skipped not in agent.kept_seqs(), timeout=5, what="the resent row listed and deleted")
