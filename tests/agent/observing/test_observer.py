"""The observer's posture rounds: when a round reads the process table. The host, the process table and the
process-event source are in-memory fakes here (the real ones have their own tests: test_posture.py,
test_procevents.py); what is under test is the loop's bookkeeping, on a real event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from cleanroom_agent.decisions import PolicyInForce, PolicySource
from cleanroom_agent.observing.observer import Observer, process_scan_due
from cleanroom_agent.observing.posture import HostFacts, assemble_posture
from cleanroom_agent.observing.procevents import Interest
from cleanroom_agent.sessions.book import SessionBook
from cleanroom_agent.sessions.clients import ProcessSnapshot
from cleanroom_protocol import Mode, Policy, Posture, ProcessInfo, SessionInfo
from tests.support.wait import wait_until

FACTS = HostFacts("h", "Debian", "6.1", "x11", 1.0, ["alice"], [])
CLIENT = "xfreerdp"


class Probe:
    def host_facts(self) -> HostFacts:
        return FACTS


class Table:
    """A process table the test edits; counts how often it is read."""

    def __init__(self) -> None:
        self.procs: list[ProcessSnapshot] = []
        self.reads = 0

    def snapshot(self) -> list[ProcessSnapshot]:
        self.reads += 1
        return list(self.procs)


class Source:
    """A process-event source whose events the test fires."""

    def __init__(self) -> None:
        self.wake: Callable[[], None] | None = None

    def start(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    def set_interest(self, interest: Interest) -> None:
        pass

    def rearm(self) -> None:
        pass

    @property
    def failure(self) -> str | None:
        return None

    def stop(self) -> None:
        pass


class ForgetfulFlag(asyncio.Event):
    """``posture_due`` whose first ``forget`` sets are lost: the outcome of a request that raced the poll's
    timeout and was cleared unseen."""

    def __init__(self, forget: int) -> None:
        super().__init__()
        self.forget = forget

    def set(self) -> None:
        if self.forget > 0:
            self.forget -= 1
            return
        super().set()


class Events:
    """The event sink: what kinds were reported."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def event(self, kind: str, *args: Any, **details: Any) -> None:
        self.kinds.append(kind)


def assemble(facts: HostFacts, denied: list[ProcessInfo], sessions: list[SessionInfo]) -> Posture:
    return assemble_posture(
        agent_id="ep-1",
        mode=Mode.ENFORCE,
        policy=None,
        facts=facts,
        denied=denied,
        sessions=sessions,
        enforcers=[],
        offline_since=None,
    )


def test_a_plain_tick_reads_the_process_table_only_when_due_or_owed() -> None:
    due = {"events_live": True, "since_scan_s": 1.0, "rescan_s": 10.0}
    assert process_scan_due(asked=False, events_owed=False, **due) is False  # type: ignore[arg-type]
    assert process_scan_due(asked=True, events_owed=False, **due) is True  # type: ignore[arg-type]
    assert process_scan_due(asked=False, events_owed=True, **due) is True  # type: ignore[arg-type]
    assert process_scan_due(
        asked=False, events_live=False, events_owed=False, since_scan_s=0.0, rescan_s=10.0
    )
    assert process_scan_due(
        asked=False, events_live=True, events_owed=False, since_scan_s=10.0, rescan_s=10.0
    )


@pytest.mark.asyncio
async def test_a_process_event_whose_posture_request_was_lost_is_still_observed_at_the_next_tick() -> None:
    """Seen in CI: the coalesced observe for a client's exec asked for a posture round in the same turn of
    a busy loop as the poll's timeout; the round ran as a plain tick (host facts only) and the session was
    not found until the 10 s rescan. The observe the events owe must not hang on that one request."""
    table = Table()
    events = Events()
    flag = ForgetfulFlag(forget=0)
    policy = Policy.model_validate({"id": "p", "version": 1, "sessions": {"clients": [CLIENT]}})
    source = Source()
    observer = Observer(
        poll_interval=0.05,
        probe=Probe(),
        processes=table,
        process_events=source,
        book=SessionBook(),
        in_force=lambda: PolicyInForce(policy, PolicySource.BOOTSTRAP),
        assemble=assemble,
        events=events,  # type: ignore[arg-type]
        posture_due=flag,
    )
    sent: list[Posture] = []
    async with asyncio.TaskGroup() as tg:
        events_task = tg.create_task(observer.run_process_events(), name="procevents")
        loop_task = tg.create_task(observer.posture_loop(lambda p: sent.append(p) or True), name="posture")
        await wait_until(lambda: source.wake is not None and sent, "the loop running with events live")
        await wait_until(lambda: observer._coalescer.owed is False, "the first observe done")
        table.procs.append(ProcessSnapshot(pid=4242, ppid=1, name=CLIENT, exe_name=CLIENT, create_time=1.0))
        flag.forget = 1  # the request this event makes is lost
        assert source.wake is not None
        source.wake()
        await wait_until(lambda: sent and [s.pid for s in sent[-1].sessions] == [4242], "the session found")
        events_task.cancel()
        loop_task.cancel()
    assert flag.forget == 0, "the request was never made: the test did not test the lost request"
    assert events.kinds.count("session.started") == 1
