"""cleanroom controller: verifies agents' messages, judges posture against policy, ends non-compliant
sessions and keeps a tamper-evident audit trail.

Public names are re-exported here but imported on first use (PEP 562): ``cleanroom-controller agents list``
and friends then load only what they need (the protocol models, structlog and aiomqtt take ~1 s to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# ``judge`` is also a submodule's name: importing the submodule would shadow a lazily loaded function,
# so it is bound eagerly (judge.py itself imports the protocol only when called).
from .decisions.judge import Judgement, judge

if TYPE_CHECKING:
    from .actions.drivers import AgentDriver, Outcome, Publisher, SessionDriver
    from .audit import (
        GENESIS,
        AuditEntry,
        ChainHead,
        ChainProblem,
        Tamper,
        entry_hash,
        make_entry,
        verify_chain,
    )
    from .broker import EmbeddedBroker, mosquitto_config, write_mosquitto_config
    from .decisions.decide import Decision, EndSession, plan_end_sessions, reconcile_sessions, retry_delay
    from .ingest.pipeline import Ingest, KeyCache, subscriptions
    from .models import CommandRecord, CommandState, Condition, EndpointState, SessionRecord, SessionState
    from .policy_keeper import NoPolicyError, PolicyKeeper
    from .settings import BrokerAddress, ControllerSettings, SettingsError, load_settings, parse_broker_url
    from .store import AgentExistsError, Store
    from .tracker import Tracker

_LAZY = {
    "AgentDriver": "drivers",
    "AgentExistsError": "store",
    "AuditEntry": "audit",
    "BrokerAddress": "settings",
    "ChainHead": "audit",
    "ChainProblem": "audit",
    "CommandRecord": "models",
    "CommandState": "models",
    "Condition": "models",
    "ControllerSettings": "settings",
    "Decision": "decide",
    "EmbeddedBroker": "broker",
    "EndSession": "decide",
    "EndpointState": "models",
    "GENESIS": "audit",
    "Ingest": "ingest",
    "KeyCache": "ingest",
    "NoPolicyError": "policy_keeper",
    "Outcome": "drivers",
    "PolicyKeeper": "policy_keeper",
    "Publisher": "drivers",
    "SessionDriver": "drivers",
    "SessionRecord": "models",
    "SessionState": "models",
    "SettingsError": "settings",
    "Store": "store",
    "Tamper": "audit",
    "Tracker": "tracker",
    "entry_hash": "audit",
    "load_settings": "settings",
    "make_entry": "audit",
    "mosquitto_config": "broker",
    "parse_broker_url": "settings",
    "plan_end_sessions": "decide",
    "reconcile_sessions": "decide",
    "retry_delay": "decide",
    "subscriptions": "ingest",
    "verify_chain": "audit",
    "write_mosquitto_config": "broker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
