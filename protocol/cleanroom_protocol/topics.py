"""MQTT topics of the v1 contract (MQTT 3.1.1 only: no v5 features are needed)."""

from __future__ import annotations

import re
from enum import StrEnum

PREFIX = "cleanroom/v1"
POLICY_TOPIC = f"{PREFIX}/policy"

# An agent id is one topic level: no wildcards, no separators, bounded length.
AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_AGENT_ID = re.compile(AGENT_ID_PATTERN)


class Channel(StrEnum):
    """The last topic level under ``cleanroom/v1/agents/{agent_id}/``."""

    POSTURE = "posture"  # agent → controller
    EVENTS = "events"  # agent → controller
    STATUS = "status"  # agent → controller, retained; the Last Will turns it offline
    ACKS = "acks"  # agent → controller
    COMMANDS = "commands"  # controller → agent
    WATERMARK = "watermark"  # controller → agent, retained: what the controller has stored (Watermark)


AGENT_TO_CONTROLLER = (Channel.POSTURE, Channel.EVENTS, Channel.STATUS, Channel.ACKS)


def is_valid_agent_id(agent_id: str) -> bool:
    return bool(_AGENT_ID.match(agent_id))


def agent_topic(agent_id: str, channel: Channel) -> str:
    if not is_valid_agent_id(agent_id):
        raise ValueError(f"invalid agent id {agent_id!r}: must match {AGENT_ID_PATTERN}")
    return f"{PREFIX}/agents/{agent_id}/{channel.value}"


def agent_filter(channel: Channel | None = None, *, share_group: str | None = None) -> str:
    """Subscription filter for one channel of every agent (or all channels with ``None``).

    ``share_group`` makes it a shared subscription (``$share/{group}/...``) so several controller
    processes split the load.
    """
    tail = channel.value if channel is not None else "+"
    flt = f"{PREFIX}/agents/+/{tail}"
    return f"$share/{share_group}/{flt}" if share_group else flt


def parse_agent_topic(topic: str) -> tuple[str, Channel] | None:
    """``cleanroom/v1/agents/{id}/{channel}`` → ``(id, channel)``; anything else → ``None``."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "agents":
        return None
    agent_id, tail = parts[3], parts[4]
    if not is_valid_agent_id(agent_id):
        return None
    try:
        return agent_id, Channel(tail)
    except ValueError:
        return None
