"""Message bodies, one pydantic model per envelope kind. No PHI travels in any of them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .policy import Policy

Name = Annotated[str, Field(max_length=256)]
Text = Annotated[str, Field(max_length=4096)]


class Kind(StrEnum):
    POSTURE = "posture"
    EVENT = "event"
    COMMAND = "command"
    ACK = "ack"
    POLICY = "policy"
    STATUS = "status"
    WATERMARK = "watermark"


class Mode(StrEnum):
    """``enforce`` blocks and ends; ``audit`` detects and reports, blocks and ends nothing."""

    ENFORCE = "enforce"
    AUDIT = "audit"


class EnforcerState(StrEnum):
    ACTIVE = "active"
    DEGRADED = "degraded"
    UNSUPPORTED = "unsupported"  # a legitimate answer, never a silent pass
    OFF = "off"


class _Body(BaseModel):
    # Bodies ignore unknown fields so a newer agent can talk to an older controller; the signature
    # still covers them because it is computed over the received JSON.
    model_config = ConfigDict(extra="ignore", frozen=True)


class EnforcerStatus(_Body):
    name: Name
    state: EnforcerState
    reason: Text | None = None
    # Hash of the policy whose rules this enforcer has in force (confirmed by its backend), None while it
    # enforces none. Compliance requires it to equal the judged policy's hash: `active` alone could be the
    # shipped defaults still running after a new policy arrived.
    policy: Name | None = None


class PolicyRef(_Body):
    id: Name
    version: int
    hash: Name


class MountInfo(_Body):
    device: Name
    mountpoint: Text
    fstype: Name
    removable: bool
    writable: bool


class ProcessInfo(_Body):
    name: Name
    pid: int
    user: Name | None = None
    exe: Text | None = None


class SessionInfo(_Body):
    """A VDI client session: a running process whose executable is a configured client."""

    id: Name
    client: Name
    pid: int
    pids: Annotated[list[int], Field(max_length=4096)]
    started: float
    user: Name | None = None
    launched: bool = False  # started through ``cleanroom-agent launch``
    # Read from the client's arguments (cleanroom_agent.sessions.vdiargs; never a password): what it connects to
    # (host or host:port), the user name it logs on with, and Horizon's desktop name. The controller maps
    # the address to a desktop of its pools (docs/desktops.md).
    desktop_address: Name | None = None
    desktop_user: Name | None = None
    desktop_name: Name | None = None


class Posture(_Body):
    agent_id: Name
    agent_version: Name
    mode: Mode
    policy: PolicyRef | None
    hostname: Name
    os: Name
    kernel: Name
    display_server: Name  # "x11", "wayland", "none"
    boot_time: float
    users: Annotated[list[Name], Field(max_length=256)]
    mounts: Annotated[list[MountInfo], Field(max_length=256)]
    denied_processes: Annotated[list[ProcessInfo], Field(max_length=1024)]
    sessions: Annotated[list[SessionInfo], Field(max_length=256)]
    enforcers: Annotated[list[EnforcerStatus], Field(max_length=64)]
    offline_since: float | None = None  # set while the agent is cut off from the broker
    # The agent's outbox is full (until a watermark drains it to its low-water mark): it cannot record
    # what happens, so it is judged non-compliant (``spool_full``) and fails closed. ``spool_refused``:
    # every event and ack it could not record, ever (durable, never reset): the gap in its record.
    spool_full: bool = False
    spool_refused: Annotated[int, Field(ge=0, le=2**62)] = 0


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


Scalar = Text | int | float | bool | None


class Event(_Body):
    """Something that happened on the endpoint. ``details`` names what, never clipboard content."""

    kind: Annotated[str, Field(max_length=64, pattern=r"^[a-z][a-z0-9_.]*$")]
    at: float
    severity: Severity = Severity.INFO
    blocked: bool = False
    details: Annotated[dict[Name, Scalar], Field(max_length=64)] = {}


class CommandAction(StrEnum):
    END_SESSION = "end_session"


# The longest a command may stay valid (expires_at - ts). The agent refuses one valid for longer, so the
# nonces it must remember (until each one's expiry) are bounded in time as well as in number.
MAX_COMMAND_LIFETIME_S = 3600.0
# 128 bits or more of randomness, as lowercase hex.
Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{32,128}$")]


class Command(_Body):
    id: Name
    action: CommandAction
    session_id: Name | None = None  # None: every session on the endpoint
    reason: Text = ""
    # Optional in the model so that the schema stays readable by older parties; the agent refuses a command
    # without them. ``agent``: whom it is for (the topic says it too, the body is what the signature covers).
    # ``nonce``: fixed for the command's life, every retry reuses it; ``expires_at``: epoch s.
    agent: Name | None = None
    nonce: Nonce | None = None
    expires_at: Annotated[float, Field(allow_inf_nan=False)] | None = None


class AckResult(StrEnum):
    ENDED = "ended"  # the process tree is verified gone
    NOT_FOUND = "not_found"  # nothing to end (already gone)
    FAILED = "failed"
    AUDIT_ONLY = "audit_only"  # agent in audit mode: reported, nothing ended
    REJECTED = "rejected"  # unknown action or invalid command


class Ack(_Body):
    command_id: Name
    result: AckResult
    sessions: Annotated[list[Name], Field(max_length=256)] = []
    detail: Text = ""


class PolicyDocument(_Body):
    """A policy as the controller publishes it (signed, retained)."""

    policy: Policy
    hash: Name


class AgentState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Status(_Body):
    """Retained connection status. ``will_seq`` announces the seq reserved for this connection's Last
    Will, so the Will (signed at connect time, delivered later) is recognised and not taken for a replay."""

    state: AgentState
    will_seq: int | None = None
    agent_version: Name | None = None
    reason: Literal["connected", "will", "shutdown"] = "connected"


SeqRange = tuple[int, int]
MAX_WATERMARK_RANGES = 2_000  # ~30 KB of JSON: far below the 64 KiB message bound


class Watermark(_Body):
    """What the controller has durably stored of one agent's messages (signed, retained, on
    ``cleanroom/v1/agents/{agent}/watermark``). ``seq``: the highest seq stored so far. ``stored``: the
    seqs stored since the previous watermark, as inclusive ranges ``[first, last]``. The agent deletes a
    spooled message only when a watermark lists it, and resends a message it sent a while ago that is still
    unlisted while a later seq is (a gap: lost on the way). See docs/data-path.md."""

    agent: Name
    seq: Annotated[int, Field(ge=0)]
    stored: Annotated[list[SeqRange], Field(max_length=MAX_WATERMARK_RANGES)] = []


BODY_MODELS: dict[Kind, type[BaseModel]] = {
    Kind.POSTURE: Posture,
    Kind.EVENT: Event,
    Kind.COMMAND: Command,
    Kind.ACK: Ack,
    Kind.POLICY: PolicyDocument,
    Kind.STATUS: Status,
    Kind.WATERMARK: Watermark,
}


def body_dict(body: BaseModel) -> dict[str, Any]:
    return body.model_dump(mode="json")
