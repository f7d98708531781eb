"""Enforcement end to end: real Mosquitto, real `cleanroom-controller run` and `cleanroom-agent run`
(which starts the real enforcers: fanotify listener as root, X11 guard on a real Xvfb). A blocked copy,
a denied exec and a removable mount reach the controller as events, and posture carries the enforcer
statuses."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, cleanroom
from tests.support.wait import wait_for

from .conftest import x_env

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.x11]


@pytest.fixture
def world(
    tmp_path: Path, mosquitto: Mosquitto, xvfb: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cleanroom]:
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify, mount)")
    monkeypatch.setenv("DISPLAY", xvfb)  # the agent process inherits it
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def test_blocked_things_arrive_at_the_controller(world: Cleanroom, xvfb: str, tmp_path: Path) -> None:
    media = tmp_path / "media-watch"
    media.mkdir()
    world.policy_path.write_text(
        f"""\
id = "it-enforce"
version = 1
[report]
heartbeat_s = 1
[sessions]
clients = ["fake-vdi"]
[clipboard]
mode = "block"
[media]
watch = ["{media}"]
unmount = true
"""
    )
    ctl = world.start_controller()
    tap = world.tap()
    sysfs = tmp_path / "sys"  # an empty sysfs: no USB bus, and the real root hubs stay untouched
    sysfs.mkdir()
    world.add_agent("it-agent", enforcers="clipboard,capture,usb,media", extra=["--sysfs-root", str(sysfs)])
    world.wait_agent("it-agent", timeout=30, what="it-agent online", online=True)

    def statuses() -> dict[str, str] | None:
        for message in reversed(tap.on("it-agent/posture")):
            body = message.envelope()["body"]
            found = {e["name"]: e["state"] for e in body.get("enforcers", [])}
            if found.get("capture") == "active" and found.get("clipboard") == "active":
                return found
        return None

    found = wait_for(statuses, timeout=20, what="posture with capture and clipboard active")
    assert found is not None
    assert found["usb"] == "unsupported"  # no USB bus on this machine
    assert found["media"] == "active"

    subprocess.run(
        ["xclip", "-i", "-selection", "clipboard"], input="x", text=True, env=x_env(xvfb), check=True
    )
    denied = subprocess.run(
        ["bash", "-c", f"scrot {tmp_path}/shot.png"], capture_output=True, text=True, check=False
    )
    assert denied.returncode == 126, denied.stderr
    stick = media / "STICK"
    stick.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stick", str(stick)], check=True)
    try:
        wanted = {"clipboard.blocked", "exec.denied", "media.mounted", "media.unmounted"}
        got: set[str] = set()

        def arrived() -> bool:
            got.update(row["kind"] for row in ctl.events() if row.get("agent") == "it-agent")
            return wanted <= got

        try:
            wait_for(arrived, timeout=30, what="clipboard.blocked, exec.denied, media.* at the controller")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; missing {wanted - got}; got {sorted(got)}") from None
    finally:
        subprocess.run(["umount", "-l", str(stick)], capture_output=True, check=False)
    assert not (tmp_path / "shot.png").exists()
    wire = [json.loads(m.payload)["body"] for m in tap.on("it-agent/events")]
    exec_events = [b for b in wire if b["kind"] == "exec.denied"]
    assert exec_events
    assert exec_events[0]["details"]["name"] == "scrot"
    assert exec_events[0]["blocked"] is True
