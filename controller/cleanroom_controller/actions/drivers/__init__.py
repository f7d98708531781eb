"""Session drivers: how the controller ends a session (the agent over MQTT today; desktop-side later)."""

from .agent import AgentDriver, Publisher
from .base import Outcome, SessionDriver

__all__ = ["AgentDriver", "Outcome", "Publisher", "SessionDriver"]
