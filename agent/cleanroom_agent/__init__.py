"""cleanroom endpoint agent."""

__version__ = "0.1.0"

from .decisions import (
    NO_POLICY,
    LaunchDecision,
    PolicyChoice,
    PolicyInForce,
    PolicySource,
    choose_policy,
    fail_closed_reason,
    launch_decision,
    may_end_sessions,
)
from .messaging.outbox import Outbox
from .messaging.spool import OutboxRow, Spool
from .observing.posture import (
    HostFacts,
    HostProbe,
    LinuxHostProbe,
    assemble_posture,
    build_mounts,
    detect_display_server,
    find_denied,
    fingerprint,
    parse_os_release,
)
from .sessions.clients import (
    EndResult,
    ProcessSnapshot,
    ProcessTable,
    PsutilProcessTable,
    PsutilTreeEnder,
    SessionChanges,
    TreeEnder,
    diff_sessions,
    find_sessions,
    session_id,
)
from .settings import AgentSettings, BrokerAddress, SettingsError, load_settings, parse_broker_url

__all__ = [
    "NO_POLICY",
    "AgentSettings",
    "BrokerAddress",
    "EndResult",
    "HostFacts",
    "HostProbe",
    "LaunchDecision",
    "LinuxHostProbe",
    "Outbox",
    "OutboxRow",
    "PolicyChoice",
    "PolicyInForce",
    "PolicySource",
    "ProcessSnapshot",
    "ProcessTable",
    "PsutilProcessTable",
    "PsutilTreeEnder",
    "SessionChanges",
    "SettingsError",
    "Spool",
    "TreeEnder",
    "__version__",
    "assemble_posture",
    "build_mounts",
    "choose_policy",
    "detect_display_server",
    "diff_sessions",
    "fail_closed_reason",
    "find_denied",
    "find_sessions",
    "fingerprint",
    "launch_decision",
    "load_settings",
    "may_end_sessions",
    "parse_broker_url",
    "parse_os_release",
    "session_id",
]
