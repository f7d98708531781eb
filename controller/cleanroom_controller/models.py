"""Plain records shared by the pure decision code and the store (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Condition(StrEnum):
    """What the controller last concluded about an endpoint."""

    UNKNOWN = "unknown"  # enrolled, nothing accepted yet
    COMPLIANT = "compliant"
    VIOLATION = "violation"
    OFFLINE = "offline"  # Last Will or clean shutdown
    SILENT = "silent"  # no report for 3 × heartbeat


class SessionState(StrEnum):
    RUNNING = "running"
    ENDING = "ending"  # end_session sent, no conclusive ack yet
    ENDED = "ended"


class CommandState(StrEnum):
    PENDING = "pending"  # created, sent zero or more times, no ack yet
    ACKED = "acked"
    EXPIRED = "expired"  # retries exhausted without an ack
    CANCELLED = "cancelled"  # retries stopped: the endpoint is compliant again


@dataclass(frozen=True, slots=True)
class EndpointState:
    agent: str
    condition: Condition = Condition.UNKNOWN
    online: bool | None = None
    compliant: bool | None = None
    reasons: tuple[str, ...] = ()
    last_seen: float | None = None  # receive time of the last accepted message of any kind
    last_seq: int | None = None
    will_seq: int | None = None
    mode: str | None = None
    policy: str | None = None  # "id@version" the endpoint reports in force


@dataclass(frozen=True, slots=True)
class SessionRecord:
    agent: str
    id: str
    state: SessionState
    client: str = ""
    pid: int | None = None
    user: str | None = None
    started: float | None = None
    ended_reason: str | None = None
    ending_reason: str | None = None  # why an end was requested (becomes ended_reason)
    command_id: str | None = None  # the last end_session command for it
    command_result: str | None = None  # its outcome so far (None while pending)
    command_condition: str | None = None  # the condition key it was sent for


@dataclass(frozen=True, slots=True)
class CommandRecord:
    id: str
    agent: str
    session_id: str | None
    action: str
    reason: str
    state: CommandState
    attempts: int = 0
    created: float = 0.0
    last_sent: float | None = None
    result: str | None = None
    detail: str = ""
    sessions: tuple[str, ...] = field(default_factory=tuple)
    # Fixed when the command is created and sent with every attempt (the agent refuses a nonce used by
    # another command, and a command past its expiry); "" / None: created before commands carried them.
    nonce: str = ""
    expires_at: float | None = None
