"""Writes audit entries for the controller's own steps (one place that names the actor)."""

from __future__ import annotations

from typing import Any

import structlog

from ..store import Store
from . import AuditEntry

log = structlog.get_logger("cleanroom.controller.audit")


class Recorder:
    def __init__(self, store: Store, actor: str) -> None:
        self._store = store
        self.actor = actor

    def record(
        self, kind: str, subject: str, data: dict[str, Any], *, actor: str | None = None
    ) -> AuditEntry:
        return self._store.append_audit(kind, actor or self.actor, subject, data)
