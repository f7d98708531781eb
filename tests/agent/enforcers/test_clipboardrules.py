"""Clipboard decisions (pure): modes, directions, text checks, client launch arguments, the guard's
rules (selections, cut buffers, storms) and their policy keys."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cleanroom_agent.enforcers.clipboardrules import (
    Direction,
    TextCheck,
    client_clipboard_off,
    clipboard_handling,
    cut_buffer_handling,
    guard_rules,
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


def test_guarded_selections_always_include_the_clients_channels() -> None:
    rules = guard_rules(ClipboardSection(extra_selections=["MY_APP_SEL", "PRIMARY"]), enforce=True)
    assert rules.selections == ("CLIPBOARD", "PRIMARY", "SECONDARY", "XdndSelection", "MY_APP_SEL")
    assert rules.owner_independent is not None and rules.owner_independent.action == "block"
    assert rules.storm == "disconnect"
    assert (rules.storm_changes_per_s, rules.storm_calm_s) == (100, 10.0)


def test_guard_rules_per_mode() -> None:
    audit = guard_rules(ClipboardSection(mode="block"), enforce=False)
    assert (audit.storm, audit.owner_independent and audit.owner_independent.enforce) == ("report", False)
    allow = guard_rules(ClipboardSection(mode="allow"), enforce=True)
    assert allow.storm == "ignore" and allow.cut_buffers.action == "allow"
    directional = guard_rules(ClipboardSection(mode="directional", from_session="text"), enforce=True)
    assert directional.owner_independent is None  # the owner decides the direction
    assert directional.storm == "disconnect"


@pytest.mark.parametrize(
    ("section", "action"),
    [
        (ClipboardSection(mode="block"), "block"),
        (ClipboardSection(mode="allow"), "allow"),
        # The writer of a cut buffer is unknown: one denied direction is enough to refuse it.
        (ClipboardSection(mode="directional", to_session="text", from_session="deny"), "block"),
        (ClipboardSection(mode="directional", to_session="deny", from_session="text"), "block"),
        (ClipboardSection(mode="directional", to_session="text", from_session="text"), "text"),
    ],
)
def test_cut_buffer_handling(section: ClipboardSection, action: str) -> None:
    handling = cut_buffer_handling(section, enforce=True)
    assert (handling.action, handling.direction) == (action, "unknown")
    if action == "text":
        assert handling.max_bytes == section.max_bytes


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (["WM_S0"], "manager selection"),
        (["_NET_WM_CM_S1"], "manager selection"),
        (["_NET_SYSTEM_TRAY_S0"], "manager selection"),
        (["has space"], "pattern"),
        ([""], "at least 1"),
        (["A"] * 33, "at most 32"),
    ],
)
def test_extra_selections_are_validated(value: list[str], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ClipboardSection(extra_selections=value)


@pytest.mark.parametrize(
    ("key", "value"), [("storm_changes_per_s", 9), ("storm_changes_per_s", 100_001), ("storm_calm_s", 0.5)]
)
def test_storm_settings_are_bounded(key: str, value: float) -> None:
    with pytest.raises(ValidationError, match=key):
        ClipboardSection.model_validate({key: value})
