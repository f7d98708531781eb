"""Clipboard decisions (policy ``[clipboard]``). Pure: no X11, no processes.

Direction comes from who owns a selection after a change: the VDI client (or a process it started) owns
it when something was copied inside the remote session → ``from_session``; any local program owns it
when something was copied locally, which the VDI client would carry into the session → ``to_session``.
The root window's cut buffers name no writer, so their direction is ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cleanroom_protocol.policy import ClipboardSection

Direction = Literal["from_session", "to_session"]
Flow = Literal["from_session", "to_session", "unknown"]
Action = Literal["allow", "block", "text"]
StormResponse = Literal["disconnect", "report", "ignore"]

# Guarded whatever the policy adds: the selections copy and paste (CLIPBOARD), select and middle-click
# (PRIMARY, SECONDARY) and drag and drop (XdndSelection: the drop target converts it to get the data) use.
ALWAYS_GUARDED = ("CLIPBOARD", "PRIMARY", "SECONDARY", "XdndSelection")
CUT_BUFFERS = tuple(f"CUT_BUFFER{n}" for n in range(8))
# Pastes answered by the guard that count as one owner change when looking for a storm: a paste is a
# TARGETS request and one or two conversions.
PASTES_PER_CHANGE = 10

# Type names that carry plain text only. Everything else offered alongside (image/png, text/html,
# text/uri-list, application/x-…) could carry more than text, so "text" mode refuses the whole change.
TEXT_TARGETS = frozenset(
    {"UTF8_STRING", "STRING", "TEXT", "COMPOUND_TEXT", "text/plain", "text/plain;charset=utf-8"}
)
# Meta targets every owner offers; they carry no data.
META_TARGETS = frozenset(
    {
        "TARGETS",
        "TIMESTAMP",
        "MULTIPLE",
        "SAVE_TARGETS",
        "LENGTH",
        "DELETE",
        "INSERT_SELECTION",
        "INSERT_PROPERTY",
    }
)


@dataclass(frozen=True)
class Handling:
    action: Action
    direction: Flow
    enforce: bool  # False in audit mode: judge and report, never take ownership
    max_bytes: int = 0
    reason: str = ""
    owner_name: str | None = None


def clipboard_handling(
    section: ClipboardSection, direction: Direction, *, enforce: bool, owner_name: str | None = None
) -> Handling:
    if section.mode == "allow":
        return Handling("allow", direction, enforce, reason="clipboard allowed", owner_name=owner_name)
    if section.mode == "block":
        return Handling("block", direction, enforce, reason="clipboard blocked", owner_name=owner_name)
    setting = section.to_session if direction == "to_session" else section.from_session
    if setting == "deny":
        return Handling("block", direction, enforce, reason=f"{direction} denied", owner_name=owner_name)
    return Handling("text", direction, enforce, section.max_bytes, f"{direction} text only", owner_name)


def cut_buffer_handling(section: ClipboardSection, *, enforce: bool) -> Handling:
    """Cut buffers are root-window properties any client writes and reads; no event names the writer,
    so no direction can be told. Directional mode lets them be only when both directions allow text
    (then as text within ``max_bytes``); otherwise a denied direction could be the one used."""
    if section.mode == "allow":
        return Handling("allow", "unknown", enforce, reason="clipboard allowed")
    if section.mode == "directional" and section.to_session == section.from_session == "text":
        return Handling("text", "unknown", enforce, section.max_bytes, "cut buffer text only")
    reason = (
        "clipboard blocked"
        if section.mode == "block"
        else "cut buffer: writer unknown, a direction is denied"
    )
    return Handling("block", "unknown", enforce, reason=reason)


@dataclass(frozen=True)
class GuardRules:
    """What the X11 guard enforces, from the policy and the mode; replaced whole on every update."""

    selections: tuple[str, ...]
    owner_independent: Handling | None  # every change handled alike (block, allow); None: ask per owner
    cut_buffers: Handling
    storm: StormResponse
    storm_changes_per_s: int
    storm_calm_s: float


def guard_rules(section: ClipboardSection, *, enforce: bool) -> GuardRules:
    selections = tuple(dict.fromkeys((*ALWAYS_GUARDED, *section.extra_selections)))
    independent = (
        None if section.mode == "directional" else clipboard_handling(section, "to_session", enforce=enforce)
    )
    # A storm matters only where the guard fights for the selections; in audit mode it is reported, and
    # with everything allowed nothing is fought over.
    storm: StormResponse = "ignore" if section.mode == "allow" else "disconnect" if enforce else "report"
    return GuardRules(
        selections,
        independent,
        cut_buffer_handling(section, enforce=enforce),
        storm,
        section.storm_changes_per_s,
        section.storm_calm_s,
    )


@dataclass(frozen=True)
class TextCheck:
    targets: tuple[str, ...] | None  # None: the owner did not answer TARGETS in time
    size: int | None  # bytes of the text conversion, None when unknown
    incremental: bool = False  # INCR transfer: size is the owner's announced lower bound
    note: str = ""  # why the size is unknown


@dataclass(frozen=True)
class TextVerdict:
    ok: bool
    reason: str


def judge_text(check: TextCheck, max_bytes: int) -> TextVerdict:
    """Allow only plain text no larger than ``max_bytes``; unknown means no (fail closed)."""
    if check.targets is None:
        return TextVerdict(False, "owner did not list its targets in time")
    other = sorted(t for t in check.targets if t not in TEXT_TARGETS and t not in META_TARGETS)
    if other:
        return TextVerdict(False, f"non-text targets offered: {', '.join(other)[:200]}")
    if not any(t in TEXT_TARGETS for t in check.targets):
        return TextVerdict(False, "no text target offered")
    if check.size is None:
        return TextVerdict(False, f"text size unknown{': ' + check.note if check.note else ''}")
    if check.size > max_bytes:
        bound = "at least " if check.incremental else ""
        return TextVerdict(False, f"text of {bound}{check.size} bytes exceeds max_bytes {max_bytes}")
    return TextVerdict(True, f"text of {check.size} bytes within max_bytes {max_bytes}")


@dataclass(frozen=True)
class ClientRedirection:
    args: tuple[str, ...]  # extra launch arguments that switch the client's own clipboard channel off
    covered: bool
    note: str


_FREERDP = ("xfreerdp", "xfreerdp3", "wlfreerdp", "wlfreerdp3", "sdl-freerdp", "sdl-freerdp3", "freerdp")


def client_clipboard_off(client: str) -> ClientRedirection:
    """Second layer beside the X11 guard: launch the VDI client with its clipboard redirection off.
    Covered: FreeRDP 2 and 3 (``-clipboard``) and rdesktop (``-r clipboard:off``). Not coverable from the
    command line: remote-viewer/virt-viewer (SPICE; turn it off server-side, libvirt
    ``<clipboard copypaste='no'/>``), VMware Horizon ``vmware-view`` and Citrix ``wfica`` (their
    clipboard is a server/agent-side policy) — for those the X11 guard is the only endpoint layer."""
    base = client.rsplit("/", 1)[-1]
    if base in _FREERDP:
        return ClientRedirection(("-clipboard",), True, "FreeRDP: -clipboard disables the cliprdr channel")
    if base == "rdesktop":
        return ClientRedirection(("-r", "clipboard:off"), True, "rdesktop: -r clipboard:off")
    notes = {
        "remote-viewer": "SPICE: no client flag; disable server-side (libvirt <clipboard copypaste='no'/>)",
        "virt-viewer": "SPICE: no client flag; disable server-side (libvirt <clipboard copypaste='no'/>)",
        "vmware-view": "Horizon: clipboard redirection is a Horizon Agent (server) policy",
        "wfica": "Citrix: clipboard redirection is a Citrix policy / All_Regions.ini setting",
    }
    return ClientRedirection((), False, notes.get(base, "unknown client: no known flag"))


def with_clipboard_off(argv: list[str]) -> list[str]:
    """``argv`` of a VDI client with the redirection-off arguments added right after the program."""
    if not argv:
        return argv
    extra = list(client_clipboard_off(argv[0]).args)
    rest = argv[1:]
    present = any(rest[i : i + len(extra)] == extra for i in range(len(rest)))
    return list(argv) if not extra or present else [argv[0], *extra, *rest]
