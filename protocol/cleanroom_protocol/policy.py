"""The policy: TOML on disk, validated by pydantic, signed on the wire.

The agent applies it; the controller judges with it. Every key is documented in ``policies/README.md``.
A broken file raises :class:`PolicyError` naming the file, the line and the field; callers keep the policy
in force.
"""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import tomlfiles
from .canonical import canonical_json
from .usbrules import parse_rules

MAX_POLICY_BYTES = 256 * 1024

ExeName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^/\x00]+$")]


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReportSection(_Section):
    heartbeat_s: Annotated[int, Field(ge=1, le=3600)] = 30
    max_offline_s: Annotated[int, Field(ge=0, le=86400)] = 120


class SessionsSection(_Section):
    clients: Annotated[list[ExeName], Field(max_length=64)] = [
        "xfreerdp",
        "xfreerdp3",
        "remote-viewer",
        "vmware-view",
        "wfica",
    ]
    end_grace_s: Annotated[float, Field(gt=0, le=60)] = 5.0


class ProcessesSection(_Section):
    deny: Annotated[list[ExeName], Field(max_length=1024)] = []


# end_session: the agent ends the client's process tree on the endpoint; wipe_desktop: the controller logs the
# session off on its desktop and wipes that desktop back to its golden image (desktops file, docs/desktops.md).
ViolationAction = Literal["end_session", "wipe_desktop"]


class OnViolationSection(_Section):
    actions: Annotated[list[ViolationAction], Field(max_length=8)] = ["end_session"]


class OnConditionSection(_Section):
    """``[on_offline]`` / ``[on_silent]``: the actions for an endpoint whose agent is gone (Last Will,
    shutdown) or silent; absent, ``[on_violation]``'s apply (as they always did)."""

    actions: Annotated[list[ViolationAction], Field(max_length=8)]


class ComplianceSection(_Section):
    require_enforcers: Annotated[list[str], Field(max_length=16)] = []
    allow_audit_mode: bool = True
    allow_removable_mounts: bool = True


ClipboardDirection = Literal["deny", "text"]


def _not_a_manager_selection(name: str) -> str:
    if re.search(r"(^|_)S[0-9]+$", name):
        raise ValueError(
            f"{name!r} is a manager selection (ICCCM: WM_S0, _NET_WM_CM_S0, _NET_SYSTEM_TRAY_S0, ...): "
            "taking it would make its manager (window manager, compositor, tray) give up"
        )
    return name


SelectionName = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_.:+-]*$"),
    AfterValidator(_not_a_manager_selection),
]


class ClipboardSection(_Section):
    mode: Literal["block", "allow", "directional"] = "block"
    to_session: ClipboardDirection = "deny"
    from_session: ClipboardDirection = "deny"
    max_bytes: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] = 4096
    disable_client_redirection: bool = True
    # Guarded like CLIPBOARD besides the selections always guarded (CLIPBOARD, PRIMARY, SECONDARY,
    # XdndSelection) and the cut buffers.
    extra_selections: Annotated[list[SelectionName], Field(max_length=32)] = []
    # An X client changing guarded selections more often than this per second (or pasting from the guard
    # ten times as often) is disconnected from the X server in enforce mode; the enforcer is degraded
    # until storm_calm_s pass without a storm.
    storm_changes_per_s: Annotated[int, Field(ge=10, le=100_000)] = 100
    storm_calm_s: Annotated[float, Field(ge=1, le=3600)] = 10.0


DEFAULT_CAPTURE_DENY = [
    "scrot", "maim", "import", "xwd", "gnome-screenshot", "spectacle", "flameshot", "shutter",
    "xfce4-screenshooter", "ksnip", "obs", "simplescreenrecorder", "kazam", "peek", "vokoscreen",
    "recordmydesktop", "anydesk", "teamviewer", "x11vnc",
]  # fmt: skip


class CaptureSection(_Section):
    deny: Annotated[list[ExeName], Field(max_length=1024)] = DEFAULT_CAPTURE_DENY
    deny_sha256: Annotated[
        list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]], Field(max_length=4096)
    ] = []
    allowlist: bool = False
    allow: Annotated[list[str], Field(max_length=4096)] = []
    grab_print_key: bool = True
    screenshot_dirs: Annotated[list[str], Field(max_length=64)] = []
    remove_screenshots: bool = False


DEFAULT_USB_RULES = [
    "allow with-interface one-of { 03:00:* 03:01:* }",  # HID keyboards and mice
    "allow with-interface equals { 0b:*:* }",  # smart-card readers (CCID) for MFA
    "block",
]


class UsbSection(_Section):
    rules: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=1024)] = DEFAULT_USB_RULES
    keep_present_hid: bool = True

    @field_validator("rules")
    @classmethod
    def _usbguard_rules(cls, rules: list[str]) -> list[str]:
        # Parsed where the policy is loaded, so a rule USBGuard refuses (or one that would fail open) is
        # refused with the policy, naming rule and column, and never reaches an agent. UsbRuleError is a
        # ValueError: load_policy reports it with file, line and field.
        parse_rules(rules)
        return rules


class MediaSection(_Section):
    watch: Annotated[list[str], Field(max_length=64)] = ["/media", "/run/media"]
    unmount: bool = True


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    version: Annotated[int, Field(ge=0)]
    description: Annotated[str, Field(max_length=4096)] = ""
    report: ReportSection = ReportSection()
    sessions: SessionsSection = SessionsSection()
    processes: ProcessesSection = ProcessesSection()
    on_violation: OnViolationSection = OnViolationSection()
    on_offline: OnConditionSection | None = None
    on_silent: OnConditionSection | None = None
    compliance: ComplianceSection = ComplianceSection()
    clipboard: ClipboardSection = ClipboardSection()
    capture: CaptureSection = CaptureSection()
    usb: UsbSection = UsbSection()
    media: MediaSection = MediaSection()

    def actions_for(self, condition: str) -> list[str]:
        """The actions for an endpoint in ``condition`` (``violation``, ``offline``, ``silent``)."""
        section = {"offline": self.on_offline, "silent": self.on_silent}.get(condition)
        return list((section or self.on_violation).actions)

    @cached_property
    def digest(self) -> str:
        """``sha256:`` over the canonical JSON of the whole policy: what agents report and compliance
        compares. Cached: the policy is frozen, and the controller judges every posture against it."""
        return "sha256:" + hashlib.sha256(canonical_json(self.model_dump(mode="json"))).hexdigest()


class PolicyError(ValueError):
    """A policy file or document that must not replace the policy in force."""


def policy_hash(policy: Policy) -> str:
    return policy.digest


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; raise :class:`PolicyError` naming file, line and field."""
    text = tomlfiles.read_text(path, max_bytes=MAX_POLICY_BYTES, what="policy", error=PolicyError)
    return parse_policy(text, source=str(path))


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    data = tomlfiles.parse(text, source=source, error=PolicyError)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(tomlfiles.describe(exc, text, source)) from exc


def policy_from_document(data: Any) -> Policy:
    """Validate a policy received in a message; raise :class:`PolicyError` with the field named."""
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(tomlfiles.describe(exc, "", "policy message")) from exc
