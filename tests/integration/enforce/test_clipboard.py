"""Clipboard guard under a real Xvfb with real xclip, xsel and small python-xlib clients (xclient.py, each
its own process): copies are cleared in every guarded selection (CLIPBOARD, PRIMARY, SECONDARY,
XdndSelection, the policy's extra ones) and cut buffers are deleted, the permitted direction still works,
audit mode reports without clearing, a policy update re-judges what is there. Storms: test_clipboard_storm.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from cleanroom_agent.enforcers.clipboard import ClipboardEnforcer
from cleanroom_agent.enforcers.procinfo import ProcessIdentity, identify
from cleanroom_protocol import EnforcerState, Event, Mode, Policy
from tests.support.wait import wait_until

from .conftest import x_env

pytestmark = pytest.mark.x11
CONTENT = "PATIENT-4711-do-not-leak"


def policy(**clipboard: object) -> Policy:
    return Policy.model_validate({"id": "p", "version": 1, "clipboard": clipboard})


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
        self.judged: list[int | None] = []  # owner pids the guard looked up to judge, in order
        self.enforcer = ClipboardEnforcer(
            self.events.append, display=display, env=x_env(display), lookup=self._identify
        )

    def _identify(self, pid: int | None, clients: frozenset[str]) -> ProcessIdentity:
        self.judged.append(pid)
        return identify(pid, clients)

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
        # The paste may come before the guard's turn: judged while the owner lives, or a later look at a
        # vanished owner (no pid: fail closed, to_session) would be what this test sees.
        await wait_until(lambda: owner.pid in guard.judged, "the session's copy judged")
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


# --- every channel -------------------------------------------------------------------------------
XCLIENT = str(Path(__file__).with_name("xclient.py"))


def xclient(display: str, *args: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, XCLIENT, *args],
        env=x_env(display),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def serve(display: str, selection: str, text: str = CONTENT) -> subprocess.Popen[str]:
    """An owner of ``selection`` that keeps serving ``text`` to every paste until killed."""
    proc = subprocess.Popen(
        [sys.executable, XCLIENT, "own", selection, text],
        env=x_env(display),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "owned"
    return proc


@pytest.mark.parametrize("selection", ["SECONDARY", "XdndSelection"])
async def test_block_guards_secondary_and_drag_and_drop(guard: Guard, selection: str) -> None:
    # Without the guard, another client reads what the owner serves: the channel is real.
    await guard.enforcer.start(policy(mode="allow"), Mode.ENFORCE)
    owner = serve(guard.display, selection)
    try:
        assert xclient(guard.display, "paste", selection).stdout == CONTENT
    finally:
        owner.kill()
        owner.wait(5)
    await guard.enforcer.apply(policy(mode="block"), Mode.ENFORCE)
    for attempt in range(3):
        before = len(guard.blocked(selection))
        owner = serve(guard.display, selection)
        try:
            await wait_until(lambda b=before: len(guard.blocked(selection)) > b, f"{selection} blocked")
            result = xclient(guard.display, "paste", selection)
            assert result.returncode != 0, f"attempt {attempt}: {result.stdout!r}"
            assert CONTENT not in result.stdout
        finally:
            owner.kill()
            owner.wait(5)
    event = guard.blocked(selection)[0]
    assert (event.kind, event.details["channel"]) == ("clipboard.blocked", "selection")


async def test_block_guards_secondary_for_xclip_and_xsel(guard: Guard) -> None:
    await guard.enforcer.start(policy(mode="block"), Mode.ENFORCE)
    for copy in (
        lambda: copy_xclip(guard.display, "secondary"),
        lambda: copy_xsel(guard.display, "-s"),
    ):
        before = len(guard.blocked("SECONDARY"))
        copy()
        await wait_until(lambda b=before: len(guard.blocked("SECONDARY")) > b, "SECONDARY blocked")
        assert CONTENT not in paste(guard.display, "secondary").stdout


async def test_block_guards_an_extra_selection_from_the_policy(guard: Guard) -> None:
    await guard.enforcer.start(policy(mode="block", extra_selections=["CLEANROOM_TEST_SEL"]), Mode.ENFORCE)
    owner = serve(guard.display, "CLEANROOM_TEST_SEL")
    try:
        await wait_until(lambda: guard.blocked("CLEANROOM_TEST_SEL"), "extra selection blocked")
        assert xclient(guard.display, "paste", "CLEANROOM_TEST_SEL").returncode != 0
    finally:
        owner.kill()
        owner.wait(5)


def cut_buffer(display: str, n: int) -> str | None:
    result = xclient(display, "cut-read", str(n))
    return result.stdout if result.returncode == 0 else None


async def test_block_deletes_every_cut_buffer_unread(guard: Guard) -> None:
    from Xlib import display

    # Xvfb resets (clearing root properties) when its last client leaves: a desktop always has one.
    keeper = display.Display(guard.display)
    try:
        # One written before the guard starts is deleted at start.
        assert xclient(guard.display, "cut-write", "7", CONTENT).returncode == 0
        assert cut_buffer(guard.display, 7) == CONTENT
        await guard.enforcer.start(policy(mode="block"), Mode.ENFORCE)
        assert cut_buffer(guard.display, 7) is None
    finally:
        keeper.close()
    for n in range(8):
        assert xclient(guard.display, "cut-write", str(n), CONTENT).returncode == 0
        await wait_until(lambda n=n: guard.blocked(f"CUT_BUFFER{n}"), f"CUT_BUFFER{n} blocked")
        assert cut_buffer(guard.display, n) is None
        event = guard.blocked(f"CUT_BUFFER{n}")[-1]
        assert (event.kind, event.details["channel"], event.details["direction"]) == (
            "clipboard.blocked",
            "cut_buffer",
            "unknown",
        )
    for event in guard.events:
        assert CONTENT not in event.model_dump_json()


async def test_cut_buffers_in_allow_audit_and_directional_modes(guard: Guard) -> None:
    await guard.enforcer.start(policy(mode="allow"), Mode.ENFORCE)
    xclient(guard.display, "cut-write", "0", "allowed")
    # Audit: reported, left in place.
    await guard.enforcer.apply(policy(mode="block"), Mode.AUDIT)
    await wait_until(lambda: guard.blocked("CUT_BUFFER0"), "cut buffer detected")
    assert guard.blocked("CUT_BUFFER0")[0].kind == "clipboard.detected"
    assert cut_buffer(guard.display, 0) == "allowed"
    # Both directions text: small text stays, too large is deleted (size from the length only).
    await guard.enforcer.apply(
        policy(mode="directional", to_session="text", from_session="text", max_bytes=16), Mode.ENFORCE
    )
    assert cut_buffer(guard.display, 0) == "allowed"
    xclient(guard.display, "cut-write", "1", "x" * 17)
    await wait_until(lambda: guard.blocked("CUT_BUFFER1"), "oversize cut buffer blocked")
    assert "exceeds max_bytes 16" in str(guard.blocked("CUT_BUFFER1")[0].details["reason"])
    assert cut_buffer(guard.display, 1) is None
    # One direction denied: the writer is unknown, so every cut buffer goes (at once, on apply).
    await guard.enforcer.apply(
        policy(mode="directional", to_session="deny", from_session="text"), Mode.ENFORCE
    )
    assert cut_buffer(guard.display, 0) is None


async def test_policy_update_rejudges_the_current_owner_before_apply_returns(guard: Guard) -> None:
    await guard.enforcer.start(policy(mode="allow"), Mode.ENFORCE)
    owner = serve(guard.display, "CLIPBOARD")
    try:
        assert xclient(guard.display, "paste", "CLIPBOARD").stdout == CONTENT
        await guard.enforcer.apply(policy(mode="block"), Mode.ENFORCE)
        # No waiting: when apply returns, the owner copied under "allow" has lost the selection.
        assert xclient(guard.display, "paste", "CLIPBOARD").returncode != 0
        assert guard.enforcer.status().policy == policy(mode="block").digest
    finally:
        owner.kill()
        owner.wait(5)
