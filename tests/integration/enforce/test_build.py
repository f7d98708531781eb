"""The four enforcers as the daemon builds them: start, statuses for posture, stop. As root (fanotify);
USB against an empty temp sysfs root (this machine has no USB bus) so it reports unsupported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cleanroom_agent.enforcers import build_enforcers
from cleanroom_protocol import EnforcerState, Event, Mode, Policy

pytestmark = pytest.mark.root


async def test_build_start_status_stop(tmp_path: Path, xvfb: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify)")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", xvfb)
    events: list[Event] = []
    enforcers = build_enforcers(events.append, sysfs_root=tmp_path)
    assert [e.name for e in enforcers] == ["clipboard", "capture", "usb", "media"]
    policy = Policy.model_validate({"id": "p", "version": 1})
    try:
        for enforcer in enforcers:
            await enforcer.start(policy, Mode.ENFORCE)
        states = {e.name: e.status().state for e in enforcers}
        assert states == {
            "clipboard": EnforcerState.ACTIVE,
            "capture": EnforcerState.ACTIVE,
            "usb": EnforcerState.UNSUPPORTED,
            "media": EnforcerState.ACTIVE,
        }
        for enforcer in enforcers:
            await enforcer.apply(policy, Mode.AUDIT)
        reported = {
            (e.details["enforcer"], e.details["state"]) for e in events if e.kind == "enforcer.status"
        }
        assert ("usb", "unsupported") in reported
        assert ("capture", "active") in reported
    finally:
        for enforcer in enforcers:
            await enforcer.stop()
    assert {e.status().state for e in enforcers} == {EnforcerState.OFF}


def test_build_a_subset() -> None:
    assert [e.name for e in build_enforcers(lambda e: None, names=["usb", "media"])] == ["usb", "media"]
    with pytest.raises(ValueError, match="unknown enforcer"):
        build_enforcers(lambda e: None, names=["printer"])
