"""Topics build and parse only valid agent topics; key files are created 0600 and refused when open."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cleanroom_protocol import (
    Channel,
    KeyFileError,
    agent_filter,
    agent_topic,
    fingerprint,
    load_or_create_private_key,
    load_private_key,
    load_public_key,
    parse_agent_topic,
    public_key_pem,
)


def test_topics_round_trip() -> None:
    topic = agent_topic("tc-042", Channel.POSTURE)
    assert topic == "cleanroom/v1/agents/tc-042/posture"
    assert parse_agent_topic(topic) == ("tc-042", Channel.POSTURE)


@pytest.mark.parametrize(
    "topic",
    ["cleanroom/v1/agents/a/nope", "cleanroom/v2/agents/a/posture", "cleanroom/v1/agents/a+b/posture",
     "cleanroom/v1/agents/a/posture/x", "cleanroom/v1/policy", "x"],
)  # fmt: skip
def test_foreign_topics_do_not_parse(topic: str) -> None:
    assert parse_agent_topic(topic) is None


def test_invalid_agent_ids_cannot_build_topics() -> None:
    for bad in ["", "a/b", "#", "+", "a" * 65, "-lead"]:
        with pytest.raises(ValueError, match="invalid agent id"):
            agent_topic(bad, Channel.EVENTS)


def test_filters() -> None:
    assert agent_filter() == "cleanroom/v1/agents/+/+"
    assert agent_filter(Channel.ACKS, share_group="ctl") == "$share/ctl/cleanroom/v1/agents/+/acks"


def test_private_key_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "agent.key"
    key, created = load_or_create_private_key(path)
    assert created and os.stat(path).st_mode & 0o777 == 0o600
    again, created_again = load_or_create_private_key(path)
    assert not created_again and fingerprint(again) == fingerprint(key)


def test_open_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    load_or_create_private_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="must be 0600"):
        load_private_key(path)


def test_public_key_files(tmp_path: Path) -> None:
    key, _ = load_or_create_private_key(tmp_path / "k")
    pub = tmp_path / "k.pub"
    pub.write_text(public_key_pem(key))
    assert fingerprint(load_public_key(pub)) == fingerprint(key)
    pub.write_text("not a key")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(pub)
