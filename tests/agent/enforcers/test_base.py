"""The enforcer lifecycle every enforcer inherits: start, apply and stop serialised, and the status naming
the hash of the policy whose rules are in force (pure asyncio, no OS: the backend is an Event the test
controls)."""

from __future__ import annotations

import asyncio

import pytest

from cleanroom_agent.enforcers.base import Enforcer
from cleanroom_protocol import EnforcerState, Event, Mode, Policy, policy_hash

P1 = Policy(id="p", version=1)
P2 = Policy(id="p", version=2)


class SlowBackend(Enforcer):
    """Starts only when the test says so; records which policy each step saw, in order."""

    name = "slow"

    def __init__(self) -> None:
        self.events: list[Event] = []
        super().__init__(self.events.append)
        self.release = asyncio.Event()
        self.steps: list[str] = []
        self.fail_apply = False

    async def _start(self, policy: Policy, mode: Mode) -> None:
        self.steps.append(f"start:{policy.version}:begin")
        await self.release.wait()
        self._set_status(EnforcerState.ACTIVE)
        self.steps.append(f"start:{policy.version}:end")

    async def _apply(self, policy: Policy, mode: Mode) -> None:
        self.steps.append(f"apply:{policy.version}")
        if self.fail_apply:
            raise RuntimeError("backend refused the rules")

    async def _stop(self) -> None:
        self.steps.append("stop")
        self._set_status(EnforcerState.OFF)


async def test_an_apply_during_start_waits_for_the_start_and_then_applies() -> None:
    enforcer = SlowBackend()
    starting = asyncio.create_task(enforcer.start(P1, Mode.ENFORCE))
    await asyncio.sleep(0)  # the start holds the lock and waits on its backend
    applying = asyncio.create_task(enforcer.apply(P2, Mode.ENFORCE))
    await asyncio.sleep(0.01)
    assert enforcer.steps == ["start:1:begin"], "apply ran against a half-started backend"
    enforcer.release.set()
    await asyncio.gather(starting, applying)
    assert enforcer.steps == ["start:1:begin", "start:1:end", "apply:2"]
    assert enforcer.status().state is EnforcerState.ACTIVE
    assert enforcer.status().policy == policy_hash(P2)


async def test_a_starting_enforcer_claims_its_policy_only_once_the_start_returned() -> None:
    enforcer = SlowBackend()
    enforcer.release.set()
    await enforcer.start(P1, Mode.ENFORCE)
    assert enforcer.status().policy == policy_hash(P1)
    reported = [e.details["policy"] for e in enforcer.events if e.kind == "enforcer.status"]
    assert reported == [None, policy_hash(P1)], "the status claimed the policy before the start returned"


async def test_an_applying_enforcer_names_the_old_policy_until_the_new_one_is_in_force() -> None:
    enforcer = SlowBackend()
    enforcer.release.set()
    await enforcer.start(P1, Mode.ENFORCE)
    seen_during_apply: list[str | None] = []

    async def observing_apply(policy: Policy, mode: Mode) -> None:
        seen_during_apply.append(enforcer.status().policy)

    enforcer._apply = observing_apply  # type: ignore[method-assign]
    await enforcer.apply(P2, Mode.ENFORCE)
    assert seen_during_apply == [policy_hash(P1)]
    assert enforcer.status().policy == policy_hash(P2)


async def test_apply_before_start_does_nothing() -> None:
    enforcer = SlowBackend()
    await enforcer.apply(P2, Mode.ENFORCE)
    assert enforcer.steps == []
    assert enforcer.status().policy is None


async def test_a_failed_apply_claims_no_policy_and_is_degraded() -> None:
    enforcer = SlowBackend()
    enforcer.release.set()
    await enforcer.start(P1, Mode.ENFORCE)
    enforcer.fail_apply = True
    with pytest.raises(RuntimeError):
        await enforcer.apply(P2, Mode.ENFORCE)
    status = enforcer.status()
    assert status.state is EnforcerState.DEGRADED
    assert status.policy is None
    assert status.reason is not None and "apply failed" in status.reason


async def test_stop_claims_nothing() -> None:
    enforcer = SlowBackend()
    enforcer.release.set()
    await enforcer.start(P1, Mode.ENFORCE)
    await enforcer.stop()
    assert enforcer.status().state is EnforcerState.OFF
    assert enforcer.status().policy is None
