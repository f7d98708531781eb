"""The policy in force and the enforcers that carry it.

At start: the signed policy persisted in the spool if it still verifies, else the bootstrap ``--policy``
file, else none (:func:`initial_policy`). While running: a signed policy from the controller replaces it
(:meth:`PolicyKeeper.handle_policy`), is persisted, and is applied to every enforcer, with posture held
meanwhile so no posture reports rules half in force.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cleanroom_protocol import (
    Kind,
    Mode,
    Policy,
    PolicyDocument,
    PolicyError,
    load_policy,
    policy_hash,
    verify,
)

from ..decisions import NO_POLICY, PolicyChoice, PolicyInForce, PolicySource, choose_policy
from ..enforcers import Enforcer
from ..memory import release_free_memory
from ..messaging.reporting import EventSink
from ..messaging.spool import Spool
from ..settings import AgentSettings

log = structlog.get_logger("cleanroom_agent.control.policykeeper")

POLICY_DOCUMENT = "policy_document"


class StartupError(Exception):
    """The agent cannot start (unreadable bootstrap policy, ...); the message says what and where."""


def load_signed_policy(raw: str | None, controller_id: str, key: Ed25519PublicKey) -> Policy | None:
    """Re-verify the signed policy document persisted in the spool (the key may have changed since)."""
    if raw is None:
        return None
    verdict = verify(
        raw.encode(),
        public_key_for=lambda s: key if s == controller_id else None,
        max_skew_s=None,
        expected_kind=Kind.POLICY,
    )
    if not verdict.ok or not isinstance(verdict.body, PolicyDocument):
        log.warning("persisted_policy_rejected", status=verdict.status.value, detail=verdict.detail)
        return None
    return verdict.body.policy


def initial_policy(
    settings: AgentSettings, spool: Spool | None, controller_key: Ed25519PublicKey | None
) -> PolicyInForce:
    """Signed persisted policy if it still verifies, else the bootstrap ``--policy`` file, else none."""
    if controller_key is not None and spool is not None:
        signed = load_signed_policy(spool.get_state(POLICY_DOCUMENT), settings.controller_id, controller_key)
        if signed is not None:
            return PolicyInForce(signed, PolicySource.SIGNED)
    if settings.policy is not None:
        try:
            return PolicyInForce(load_policy(settings.policy), PolicySource.BOOTSTRAP)
        except PolicyError as exc:
            raise StartupError(str(exc)) from exc
    return NO_POLICY


class PolicyKeeper:
    """Owns :attr:`in_force`; starts the enforcers with it and applies each newer signed policy to them.

    ``held`` is the posture hold (:meth:`reporting.PostureReporter.held`) taken while enforcers start or
    apply."""

    def __init__(
        self,
        in_force: PolicyInForce,
        *,
        mode: Mode,
        spool: Spool,
        enforcers: Sequence[Enforcer],
        events: EventSink,
        held: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.in_force = in_force
        self._mode = mode
        self._spool = spool
        self._enforcers = enforcers
        self._events = events
        self._held = held

    async def run_enforcers(self) -> None:
        """Start every enforcer (posture held meanwhile), keep them until cancelled, then stop them."""
        with self._held():
            for enforcer in self._enforcers:
                try:
                    # The policy in force now, not when this task began: a signed policy may have arrived
                    # meanwhile, and an apply() before start() is a no-op, so this start must carry it.
                    await enforcer.start(self.in_force.effective, self._mode)
                except Exception:
                    log.exception("enforcer_start_failed", enforcer=getattr(enforcer, "name", "?"))
        release_free_memory()  # start-up is over: what it freed goes back to the kernel (memory.py)
        try:
            await asyncio.Event().wait()
        finally:
            for enforcer in self._enforcers:
                try:
                    await enforcer.stop()
                except Exception:
                    log.exception("enforcer_stop_failed", enforcer=getattr(enforcer, "name", "?"))

    async def handle_policy(self, document: PolicyDocument, raw: bytes) -> None:
        """A correctly signed policy document from the controller (the link verified the signature)."""
        policy = document.policy
        if document.hash != policy_hash(policy):
            self._events.rejected("policy", f"hash mismatch: document says {document.hash}")
            return
        choice = choose_policy(self.in_force, policy)
        if choice is PolicyChoice.UNCHANGED:
            return
        if choice is PolicyChoice.OLDER:
            current = self.in_force.policy
            self._events.rejected(
                "policy",
                f"older: {policy.id}@{policy.version} < {current.id}@{current.version}"
                if current
                else "older",
            )
            return
        with self._held():
            self.in_force = PolicyInForce(policy, PolicySource.SIGNED)
            self._spool.set_state(POLICY_DOCUMENT, raw.decode("utf-8"))
            self._events.event("policy.applied", id=policy.id, version=policy.version)
            for enforcer in self._enforcers:
                try:
                    await enforcer.apply(policy, self._mode)
                except Exception:
                    log.exception("enforcer_apply_failed", enforcer=getattr(enforcer, "name", "?"))
