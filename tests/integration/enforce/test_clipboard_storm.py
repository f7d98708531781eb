"""Selection storms under a real Xvfb: a real X client (xclient.py, its own process) re-takes CLIPBOARD as
fast as python-xlib can send (~200,000 times a second here) while real ``xclip -o`` pastes run. The guard
must disconnect it within a bound, report ``degraded`` with the reason and a ``clipboard.storm`` event,
let no paste through, keep its memory bounded, and return to ``active`` once calm. Run with RECORD (the
client is named by the server, even when it names the root window as owner) and without it (Xvfb
``-extension RECORD``: the client is named by the window it set as owner)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from cleanroom_agent.enforcers.clipboard import ClipboardEnforcer
from cleanroom_protocol import EnforcerState, EnforcerStatus, Event, Mode, Policy, violations
from cleanroom_protocol.messages import PolicyRef, Posture
from tests.support.clipboardstorm import StormResult, storm_with_pastes
from tests.support.wait import wait_until

from .conftest import running_xvfb, x_env

pytestmark = pytest.mark.x11
CONTENT = "STORM-PASTE-4711"
STORM_S = 2.0
# Measured 0.01-0.05 s for owner-change storms, 0.04-0.3 s for paste floods (1,001 pastes must arrive);
# up to 0.7 s when the shared 2-core machine is loaded. Before: never (the guard fell seconds behind).
DISCONNECT_BOUND_S = 1.5
# Pastes made before the storm is recognised (the 101st change in a second) and its client disconnected
# may still reach the client: on a loaded 2-core machine a few did within the first ~100 ms (3 of 11 once).
# The bug this guards against let 299 of 300 through for as long as the storm lasted.
MAX_PASTES_THROUGH = 5
RSS_GROWTH_BOUND = 40 * 2**20  # the unguarded guard grew by hundreds of MB
QUEUE_BOUND = 20_000  # events python-xlib held at once (64 KB reads; act round trips behind a flood)


def policy(**clipboard: object) -> Policy:
    return Policy.model_validate(
        {
            "id": "p",
            "version": 1,
            "clipboard": {"storm_calm_s": 1, **clipboard},
            "compliance": {"require_enforcers": ["clipboard"]},
        }
    )


def posture(clipboard: EnforcerStatus) -> Posture:
    judged = policy(mode="block")
    return Posture(
        agent_id="a", agent_version="1", mode=Mode.ENFORCE,
        policy=PolicyRef(id=judged.id, version=judged.version, hash=judged.digest),
        hostname="h", os="linux", kernel="k", display_server="x11", boot_time=0.0,
        users=[], mounts=[], denied_processes=[], sessions=[], enforcers=[clipboard],
    )  # fmt: skip


@pytest.fixture(params=["record", "no-record"])
def storm_display(request: pytest.FixtureRequest) -> Iterator[tuple[str, bool]]:
    recording = request.param == "record"
    with running_xvfb() if recording else running_xvfb("-extension", "RECORD") as display:
        yield display, recording


@dataclass
class Setup:
    display: str
    recording: bool
    enforcer: ClipboardEnforcer
    events: list[Event]

    def storms(self) -> list[Event]:
        return [e for e in self.events if e.kind == "clipboard.storm"]

    async def storm_events(self) -> list[Event]:
        """The storm events, once the first has come through (the containment thread reports it)."""
        await wait_until(lambda: self.storms(), "a clipboard.storm event")
        return self.storms()


@pytest.fixture
async def setup(storm_display: tuple[str, bool]) -> AsyncIterator[Setup]:
    display, recording = storm_display
    events: list[Event] = []
    enforcer = ClipboardEnforcer(events.append, display=display, env=x_env(display))
    yield Setup(display, recording, enforcer, events)
    await enforcer.stop()


async def storm(setup: Setup, how: str = "own", seconds: float = STORM_S) -> StormResult:
    return await storm_with_pastes(x_env(setup.display), how, seconds, CONTENT)


async def test_a_storming_client_is_disconnected_and_the_guard_recovers(setup: Setup) -> None:
    await setup.enforcer.start(policy(mode="block"), Mode.ENFORCE)
    assert setup.enforcer.status().state is EnforcerState.ACTIVE
    result = await storm(setup)
    assert 0 <= result.disconnected_after_s <= DISCONNECT_BOUND_S, (
        result,
        [e.details for e in setup.storms()],
    )
    assert result.through <= MAX_PASTES_THROUGH, result
    assert result.peak_rss_growth < RSS_GROWTH_BOUND, result
    guard = setup.enforcer.guard
    assert guard is not None and guard.recording is setup.recording
    assert guard.stats.max_queue < QUEUE_BOUND, guard.stats
    assert guard.stats.disconnects == 1

    # The degraded status as it was reported: by now the enforcer may be calm (active) again already,
    # storm_calm_s being 1 s here and the storm's client gone.
    reported = [
        e for e in setup.events if e.kind == "enforcer.status" and e.details.get("state") == "degraded"
    ]
    assert reported, [e.details for e in setup.events if e.kind == "enforcer.status"]
    reason = str(reported[-1].details.get("reason") or "")
    assert "selection storm" in reason and "disconnected" in reason
    assert "active again after 1 s" in reason
    status = EnforcerStatus(
        name="clipboard",
        state=EnforcerState.DEGRADED,
        reason=reason,
        policy=reported[-1].details.get("policy"),
    )
    # The policy requires the clipboard enforcer: the posture is a violation (the session then ends).
    assert "enforcer_not_active:clipboard:degraded" in violations(posture(status), policy(mode="block"))
    [event] = await setup.storm_events()
    assert event.details["action"] == "disconnected"
    assert event.details["what"] == "owner_changes"
    assert event.details["selections"] == "CLIPBOARD"
    assert isinstance(event.details["pid"], int) and event.details["process"]
    assert CONTENT not in event.model_dump_json()

    # Calm: active again within storm_calm_s (1 s) and a round, and still guarding.
    await wait_until(lambda: setup.enforcer.status().state is EnforcerState.ACTIVE, "active again", 3.0)
    before = len([e for e in setup.events if e.kind == "clipboard.blocked"])
    subprocess.run(
        ["xclip", "-i", "-selection", "clipboard"],
        input="after", env=x_env(setup.display), text=True, timeout=5, check=True,
    )  # fmt: skip
    await wait_until(
        lambda: len([e for e in setup.events if e.kind == "clipboard.blocked"]) > before, "blocked after"
    )


async def test_a_storm_naming_the_root_window_is_pinned_on_its_client(setup: Setup) -> None:
    """The server sends pastes to whoever set the owner, whatever window it named: naming the root
    window hides the client from the events. RECORD names it; without RECORD it cannot be disconnected,
    and the enforcer stays degraded (fail closed)."""
    await setup.enforcer.start(policy(mode="block"), Mode.ENFORCE)
    result = await storm(setup, "root", seconds=1.0)
    event = (await setup.storm_events())[0]
    # Degraded was reported; with RECORD the client is gone and the enforcer may be calm (active) again by
    # now (storm_calm_s is 1 s here), so the status history is what is checked, not the status of now.
    degraded = [
        e for e in setup.events if e.kind == "enforcer.status" and e.details.get("state") == "degraded"
    ]
    assert degraded, [e.details for e in setup.events if e.kind == "enforcer.status"]
    if setup.recording:
        assert 0 <= result.disconnected_after_s <= DISCONNECT_BOUND_S, result
        assert result.through <= MAX_PASTES_THROUGH, result
        assert event.details["action"] == "disconnected" and event.details["pid"]
    else:
        assert setup.enforcer.status().state is EnforcerState.DEGRADED  # nobody to disconnect: stays
        assert result.disconnected_after_s == -1
        assert event.details["action"] == "not_disconnected"
        assert event.details["what"] == "unattributed_owner"
    assert result.peak_rss_growth < RSS_GROWTH_BOUND, result


async def test_a_paste_flood_on_the_guard_is_disconnected(setup: Setup) -> None:
    await setup.enforcer.start(policy(mode="block"), Mode.ENFORCE)
    subprocess.run(
        ["xclip", "-i", "-selection", "clipboard"],
        input="x", env=x_env(setup.display), text=True, timeout=5, check=True,
    )  # fmt: skip
    await wait_until(lambda: any(e.kind == "clipboard.blocked" for e in setup.events), "guard owns it")
    result = await storm(setup, "paste", seconds=1.5)
    assert 0 <= result.disconnected_after_s <= DISCONNECT_BOUND_S, result
    assert result.peak_rss_growth < RSS_GROWTH_BOUND, result
    assert (await setup.storm_events())[0].details["what"] == "pastes"


async def test_audit_mode_reports_a_storm_without_disconnecting(setup: Setup) -> None:
    await setup.enforcer.start(policy(mode="block"), Mode.AUDIT)
    result = await storm(setup, seconds=1.0)
    assert result.disconnected_after_s == -1
    assert (await setup.storm_events())[0].details["action"] == "reported"
    assert setup.enforcer.status().state is EnforcerState.ACTIVE
    assert result.peak_rss_growth < RSS_GROWTH_BOUND, result
