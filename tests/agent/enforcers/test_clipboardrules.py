"""Clipboard decisions (pure): modes, directions, text checks, client launch arguments."""

from __future__ import annotations

import pytest

from cleanroom_agent.enforcers.clipboardrules import (
    Direction,
    TextCheck,
    client_clipboard_off,
    clipboard_handling,
    judge_text,
    with_clipboard_off,
)
from cleanroom_protocol.policy import ClipboardSection


@pytest.mark.parametrize("d", ["to_session", "from_session"])
def test_block_and_allow_ignore_direction(d: Direction) -> None:
    assert clipboard_handling(ClipboardSection(mode="block"), d, enforce=True).action == "block"
    assert clipboard_handling(ClipboardSection(mode="allow"), d, enforce=True).action == "allow"


def test_directional_settings() -> None:
    section = ClipboardSection(mode="directional", to_session="deny", from_session="text", max_bytes=10)
    assert clipboard_handling(section, "to_session", enforce=True).action == "block"
    text = clipboard_handling(section, "from_session", enforce=False, owner_name="xfreerdp")
    assert (text.action, text.max_bytes, text.enforce, text.owner_name) == ("text", 10, False, "xfreerdp")


@pytest.mark.parametrize(
    ("check", "ok", "fragment"),
    [
        (TextCheck(("TARGETS", "UTF8_STRING", "STRING"), 5), True, "within"),
        (TextCheck(("TARGETS", "UTF8_STRING"), 11), False, "exceeds max_bytes 10"),
        (TextCheck(("TARGETS", "UTF8_STRING"), 11, incremental=True), False, "at least 11"),
        (TextCheck(("TARGETS", "UTF8_STRING", "image/png"), 3), False, "image/png"),
        (TextCheck(("TARGETS", "text/uri-list", "UTF8_STRING"), 3), False, "text/uri-list"),
        (TextCheck(("TARGETS", "TIMESTAMP"), 0), False, "no text target"),
        (TextCheck(None, None), False, "did not list"),
        (TextCheck(("UTF8_STRING",), None), False, "size unknown"),
    ],
)
def test_judge_text(check: TextCheck, ok: bool, fragment: str) -> None:
    verdict = judge_text(check, 10)
    assert verdict.ok is ok
    assert fragment in verdict.reason


def test_client_launch_arguments() -> None:
    assert client_clipboard_off("/usr/bin/xfreerdp").args == ("-clipboard",)
    assert client_clipboard_off("xfreerdp3").covered
    assert client_clipboard_off("rdesktop").args == ("-r", "clipboard:off")
    assert not client_clipboard_off("remote-viewer").covered
    assert "server-side" in client_clipboard_off("remote-viewer").note
    assert with_clipboard_off(["xfreerdp", "/v:host"]) == ["xfreerdp", "-clipboard", "/v:host"]
    assert with_clipboard_off(["xfreerdp", "-clipboard", "/v:h"]) == ["xfreerdp", "-clipboard", "/v:h"]
    assert with_clipboard_off(["rdesktop", "h"]) == ["rdesktop", "-r", "clipboard:off", "h"]
    assert with_clipboard_off(["wfica", "x.ica"]) == ["wfica", "x.ica"]
    assert with_clipboard_off([]) == []
