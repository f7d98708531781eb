"""cleanroom controller: verifies agents' messages, judges posture against policy, ends non-compliant
sessions and keeps a tamper-evident audit trail."""

from .audit import GENESIS, AuditEntry, ChainHead, ChainProblem, Tamper, entry_hash, make_entry, verify_chain
from .broker import EmbeddedBroker, mosquitto_config, write_mosquitto_config
from .decide import Decision, EndSession, plan_end_sessions, reconcile_sessions, retry_delay
from .drivers import AgentDriver, Outcome, Publisher, SessionDriver
from .ingest import Ingest, KeyCache, subscriptions
from .judge import Judgement, judge
from .models import CommandRecord, CommandState, Condition, EndpointState, SessionRecord, SessionState
from .policy_keeper import NoPolicyError, PolicyKeeper
from .settings import BrokerAddress, ControllerSettings, SettingsError, load_settings, parse_broker_url
from .store import AgentExistsError, Store
from .tracker import Tracker

__version__ = "0.1.0"

__all__ = [
    "GENESIS",
    "AgentDriver",
    "AgentExistsError",
    "AuditEntry",
    "BrokerAddress",
    "ChainHead",
    "ChainProblem",
    "CommandRecord",
    "CommandState",
    "Condition",
    "ControllerSettings",
    "Decision",
    "EmbeddedBroker",
    "EndSession",
    "EndpointState",
    "Ingest",
    "Judgement",
    "KeyCache",
    "NoPolicyError",
    "Outcome",
    "PolicyKeeper",
    "Publisher",
    "SessionDriver",
    "SessionRecord",
    "SessionState",
    "SettingsError",
    "Store",
    "Tamper",
    "Tracker",
    "entry_hash",
    "judge",
    "load_settings",
    "make_entry",
    "mosquitto_config",
    "parse_broker_url",
    "plan_end_sessions",
    "reconcile_sessions",
    "retry_delay",
    "subscriptions",
    "verify_chain",
    "write_mosquitto_config",
]
