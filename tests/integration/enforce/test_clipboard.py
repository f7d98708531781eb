"""Clipboard guard under a real Xvfb with real xclip and xsel: copies are cleared in both selections,
the permitted direction still works, audit mode reports without clearing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from cleanroom_agent.enforcers.clipboard import ClipboardEnforcer
from cleanroom_protocol import EnforcerState, Event, Mode, Policy

from .conftest import x_env

pytestmark = pytest.mark.x11
CONTENT = "PATIENT-4711-do-not-leak"


def policy(**clipboard: object) -> Policy:
    return Policy.model_validate({"id": "p", "version": 1, "clipboard": clipboard})


async def wait_until(cond: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def paste(display: str, selection: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["xclip", "-o", "-selection", selection],
        env=x_env(display),
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )


def copy_xclip(display: str, selection: str, text: str = CONTENT, *, program: str = "xclip") -> None:
    """xclip forks a server process that owns the selection and returns at once."""
    subprocess.run(
        [program, "-i", "-selection", selection],
        input=text,
        env=x_env(display),
        text=True,
        timeout=5,
        check=True,
    )


def copy_xsel(display: str, flag: str, text: str = CONTENT) -> None:
    subprocess.run(["xsel", flag, "-i"], input=text, env=x_env(display), text=True, timeout=5, check=True)


def owner_in_foreground(display: str, program: str, text: str, *targets: str) -> subprocess.Popen[str]:
    """An owner that stays in the foreground (xclip -quiet): its X connection's pid is alive."""
    argv = [program, "-quiet", "-i", "-selection", "clipboard", *targets]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=x_env(display),
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(text)
    proc.stdin.close()
    return proc


class Guard:
    def __init__(self, display: str) -> None:
        self.display = display
        self.events: list[Event] = []
        self.enforcer = ClipboardEnforcer(self.events.append, display=display, env=x_env(display))

    def blocked(self, selection: str) -> list[Event]:
        return [
            e
            for e in self.events
            if e.kind.startswith("clipboard.") and e.details.get("selection") == selection
        ]


@pytest.fixture
async def guard(xvfb: str) -> AsyncIterator[Guard]:
    g = Guard(xvfb)
    yield g
    await g.enforcer.stop()


async def test_block_clears_both_selections_for_xclip_and_xsel(guard: Guard) -> None:
    await guard.enforcer.start(policy(mode="block"), Mode.ENFORCE)
    assert guard.enforcer.status().state is EnforcerState.ACTIVE
    copies: list[tuple[Callable[[], None], str]] = [
        (lambda: copy_xclip(guard.display, "clipboard"), "clipboard"),
        (lambda: copy_xclip(guard.display, "primary"), "primary"),
        (lambda: copy_xsel(guard.display, "-b"), "clipboard"),
        (lambda: copy_xsel(guard.display, "-p"), "primary"),
    ]
    for copy, selection in copies:
        before = len(guard.blocked(selection.upper()))
        copy()

        def more_blocked(s: str = selection, b: int = before) -> bool:
            return len(guard.blocked(s.upper())) > b

        await wait_until(more_blocked, f"{selection} blocked")
        result = paste(guard.display, selection)
        assert result.returncode != 0
        assert CONTENT not in result.stdout
    for event in guard.events:
        assert CONTENT not in event.model_dump_json()
    event = guard.blocked("CLIPBOARD")[0]
    assert event.kind == "clipboard.blocked"
    assert event.blocked
    assert event.details["direction"] == "to_session"
    assert float(str(event.details["latency_ms"])) < 50


async def test_block_reports_the_owning_process(guard: Guard) -> None:
    """xclip exits the moment it loses the selection, often before its pid can be asked for; an owner
    that stays connected is named with its pid and process name."""
    from Xlib import X, display

    await guard.enforcer.start(policy(mode="block"), Mode.ENFORCE)
    disp = display.Display(guard.display)
    try:
        win = disp.screen().root.create_window(0, 0, 1, 1, 0, X.CopyFromParent, X.InputOnly, X.CopyFromParent)
        win.set_selection_owner(disp.intern_atom("CLIPBOARD"), X.CurrentTime)
        disp.flush()
        await wait_until(lambda: guard.blocked("CLIPBOARD"), "clipboard.blocked")
        event = guard.blocked("CLIPBOARD")[0]
        assert event.details["pid"] == os.getpid()
        assert event.details["process"]
    finally:
        disp.close()


async def test_directional_from_session_text_passes_local_copy_is_blocked(
    guard: Guard, tmp_path: Path
) -> None:
    # A "VDI client": xclip under a configured client name, so its X connection belongs to a session.
    client = tmp_path / "xfreerdp"
    shutil.copy2(shutil.which("xclip") or "/usr/bin/xclip", client)
    await guard.enforcer.start(
        policy(mode="directional", from_session="text", to_session="deny", max_bytes=64), Mode.ENFORCE
    )
    owner = owner_in_foreground(guard.display, str(client), "hello from the session")
    try:
        await wait_until(
            lambda: paste(guard.display, "clipboard").stdout == "hello from the session", "paste"
        )
        assert guard.blocked("CLIPBOARD") == []
    finally:
        owner.terminate()
        owner.wait(5)
    # Too large for max_bytes: refused (size known from the property length, content never read).
    owner = owner_in_foreground(guard.display, str(client), "x" * 200)
    try:
        await wait_until(lambda: guard.blocked("CLIPBOARD"), "oversize blocked")
        assert "exceeds max_bytes 64" in str(guard.blocked("CLIPBOARD")[0].details["reason"])
        assert paste(guard.display, "clipboard").returncode != 0
    finally:
        owner.kill()
        owner.wait(5)
    # An image from the session: not text, refused.
    owner = owner_in_foreground(guard.display, str(client), "PNG", "-t", "image/png")
    try:
        await wait_until(lambda: len(guard.blocked("CLIPBOARD")) >= 2, "image blocked")
        assert "image/png" in str(guard.blocked("CLIPBOARD")[1].details["reason"]), guard.blocked("CLIPBOARD")
    finally:
        owner.kill()
        owner.wait(5)
    # A local copy goes towards the session: denied.
    copy_xclip(guard.display, "clipboard")
    await wait_until(lambda: len(guard.blocked("CLIPBOARD")) >= 3, "local copy blocked")
    assert guard.blocked("CLIPBOARD")[2].details["direction"] == "to_session"
    assert paste(guard.display, "clipboard").returncode != 0


async def test_allow_mode_lets_copies_through(guard: Guard) -> None:
    await guard.enforcer.start(policy(mode="allow"), Mode.ENFORCE)
    copy_xclip(guard.display, "clipboard", "fine")
    await wait_until(lambda: paste(guard.display, "clipboard").stdout == "fine", "paste works")
    assert guard.blocked("CLIPBOARD") == []


async def test_audit_mode_reports_and_leaves_the_clipboard(guard: Guard) -> None:
    await guard.enforcer.start(policy(mode="block"), Mode.AUDIT)
    copy_xclip(guard.display, "clipboard", "audited")
    await wait_until(lambda: guard.blocked("CLIPBOARD"), "clipboard.detected")
    event = guard.blocked("CLIPBOARD")[0]
    assert (event.kind, event.blocked) == ("clipboard.detected", False)
    assert paste(guard.display, "clipboard").stdout == "audited"


async def test_policy_update_switches_from_allow_to_block(guard: Guard) -> None:
    await guard.enforcer.start(policy(mode="allow"), Mode.ENFORCE)
    await guard.enforcer.apply(policy(mode="block"), Mode.ENFORCE)
    copy_xclip(guard.display, "clipboard")
    await wait_until(lambda: guard.blocked("CLIPBOARD"), "blocked after apply")
    assert paste(guard.display, "clipboard").returncode != 0


async def test_no_display_or_wayland_is_unsupported() -> None:
    events: list[Event] = []
    enforcer = ClipboardEnforcer(events.append, env={})
    await enforcer.start(policy(), Mode.ENFORCE)
    assert enforcer.status().state is EnforcerState.UNSUPPORTED
    assert "DISPLAY" in (enforcer.status().reason or "")
    wayland = ClipboardEnforcer(events.append, env={"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"})
    await wayland.start(policy(), Mode.ENFORCE)
    assert "Wayland" in (wayland.status().reason or "")


async def test_unreachable_display_is_degraded() -> None:
    enforcer = ClipboardEnforcer(lambda e: None, display=":987", env={"DISPLAY": ":987"})
    await enforcer.start(policy(), Mode.ENFORCE)
    try:
        assert enforcer.status().state is EnforcerState.DEGRADED
        assert ":987" in (enforcer.status().reason or "")
    finally:
        await enforcer.stop()
