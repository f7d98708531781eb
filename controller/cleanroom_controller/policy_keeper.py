"""The policy in force: loaded from ``--policy FILE`` at start, reloaded when the file changes (watchdog),
kept durable in SQLite and published signed and retained on ``cleanroom/v1/policy``.

A broken file never replaces the policy in force: the error (file, line, field) is logged and audited. At
start a broken file is fatal only when no earlier policy is in force.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from cleanroom_protocol import (
    Kind,
    Policy,
    PolicyDocument,
    PolicyError,
    load_policy,
    policy_from_document,
    policy_hash,
)

from .audit.recorder import Recorder
from .filewatch import watch_reloads
from .store import Store
from .trust.signer import Signer

log = structlog.get_logger("cleanroom.controller.policy")

_META_KEY = "policy"


class NoPolicyError(Exception):
    """The controller has no valid policy to start with (the message says why)."""


class PolicyKeeper:
    def __init__(self, *, store: Store, recorder: Recorder, signer: Signer, path: Path | None) -> None:
        self._store = store
        self._recorder = recorder
        self._signer = signer
        self.path = path
        self._policy: Policy | None = None
        self._payload: bytes | None = None

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            raise NoPolicyError("no policy in force")
        return self._policy

    @property
    def hash(self) -> str:
        return policy_hash(self.policy)

    def load_initial(self) -> Policy:
        stored = self._stored()
        if self.path is None:
            if stored is None:
                raise NoPolicyError("no policy in force: pass --policy FILE")
            self._enforce(stored, source="stored")
            return stored
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self._recorder.record("policy.rejected", str(self.path), {"error": str(exc), "at": "start"})
            if stored is None:
                raise NoPolicyError(f"refusing to start: {exc}") from exc
            log.error(
                "policy_rejected_keeping_stored", error=str(exc), policy=f"{stored.id}@{stored.version}"
            )
            self._enforce(stored, source="stored")
            return stored
        self._enforce(policy, source=str(self.path))
        return policy

    def reload(self) -> bool:
        """Re-read the file; ``True`` when a new valid policy is now in force."""
        if self.path is None:
            return False
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            log.error("policy_rejected", error=str(exc), kept=self._ref())
            self._recorder.record("policy.rejected", str(self.path), {"error": str(exc), "kept": self._ref()})
            return False
        if self._policy is not None and policy_hash(policy) == policy_hash(self._policy):
            return False
        if self._policy is not None and policy.version < self._policy.version:
            error = f"{self.path}: version {policy.version} is older than the policy in force ({self._ref()})"
            log.error("policy_rejected", error=error)
            self._recorder.record("policy.rejected", str(self.path), {"error": error, "kept": self._ref()})
            return False
        self._enforce(policy, source=str(self.path))
        return True

    def signed_document(self) -> bytes:
        """The retained policy message (sealed once per policy: republishing on reconnect reuses it)."""
        if self._payload is None:
            _, self._payload = self._signer.seal(
                Kind.POLICY, PolicyDocument(policy=self.policy, hash=policy_hash(self.policy))
            )
        return self._payload

    async def watch(
        self,
        on_change: Callable[[], Awaitable[None]],
        started: asyncio.Event | None = None,
        on_failed: Callable[[Exception], None] | None = None,
    ) -> None:
        """Reload on every change of the file (editors replace it: the directory is watched).
        ``started`` is set once the watch is in place; ``on_failed`` hears of a reload that could not be
        stored (the policy in force stays; the caller reloads again later)."""
        await watch_reloads(
            self.path, self.reload, on_change, what="policy", started=started, on_failed=on_failed
        )

    # -- internals -----------------------------------------------------------------------------------------
    def _ref(self) -> str | None:
        return None if self._policy is None else f"{self._policy.id}@{self._policy.version}"

    def _stored(self) -> Policy | None:
        raw = self._store.get_meta(_META_KEY)
        if raw is None:
            return None
        try:
            data: Any = json.loads(raw)
            return policy_from_document(data)
        except (ValueError, PolicyError) as exc:
            log.error("stored_policy_unreadable", error=str(exc))
            return None

    def _enforce(self, policy: Policy, *, source: str) -> None:
        # Stored and audited together, then in force here: a database that fails meanwhile (DatabaseUnavailable)
        # leaves the policy in force unchanged, and a reload later tries again.
        with self._store.transaction():
            self._store.set_meta(_META_KEY, json.dumps(policy.model_dump(mode="json")))
            self._recorder.record(
                "policy.loaded",
                policy.id,
                {"id": policy.id, "version": policy.version, "hash": policy_hash(policy), "source": source},
            )
        self._policy = policy
        self._payload = None
        log.info("policy_in_force", policy=self._ref(), source=source)
