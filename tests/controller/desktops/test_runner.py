"""The desktop runner with a real store (SQLite file), real audit chain and the command driver running real
scripts: retries with back-off then quarantine, never handed out while quarantined, release only through a
clean wipe, every transition persisted and audited in order."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from cleanroom_controller.actions.drivers.command import CommandDriver
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.desktops import operations
from cleanroom_controller.desktops.config import Desktops, parse_desktops
from cleanroom_controller.desktops.machine import DesktopState
from cleanroom_controller.desktops.runner import DesktopRunner
from cleanroom_controller.store import Store
from tests.support.wait import async_wait_for


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def pool(tmp_path: Path, *, retries: int = 3, backoff_s: float = 0.05) -> Desktops:
    return parse_desktops(f"""
[[pool]]
id = "hz"
driver = "command"
retries = {retries}
backoff_s = {backoff_s}
timeout_s = 5
[pool.command]
log_off = ["{tmp_path}/logoff", "{{desktop}}", "{{user}}"]
session_gone = ["{tmp_path}/gone", "{{desktop}}"]
wipe = ["{tmp_path}/wipe", "{{desktop}}"]
env = ["HZ_TOKEN"]
poll_s = 0.05
[[pool.desktop]]
id = "hz-01"
address = "10.1.0.1"
""")


class Harness:
    def __init__(self, tmp_path: Path, desktops: Desktops) -> None:
        self.store = Store.open(tmp_path)
        self.recorder = Recorder(self.store, "controller:test")
        self.tasks: list[asyncio.Task[None]] = []
        self.runner = DesktopRunner(
            store=self.store,
            recorder=self.recorder,
            desktops=lambda: desktops,
            drivers={"command": CommandDriver({"HZ_TOKEN": "s3cr3t-token"})},
            spawn=self.spawn,
        )
        self.runner.sync()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    def state(self) -> DesktopState:
        d = self.store.desktop("hz-01")
        assert d is not None
        return d.state

    def kinds(self) -> list[str]:
        return [e.kind for e in self.store.audit_entries() if e.kind.startswith(("desktop.", "operator."))]

    def audit_text(self) -> str:
        return "\n".join(e.data_json for e in self.store.audit_entries())


async def settle(h: Harness, until: DesktopState, timeout: float = 10.0) -> None:
    """Drive (as the daemon's poll does) until the desktop is in ``until`` and nothing is being driven."""

    async def reached() -> bool:
        h.runner.poll()
        await asyncio.sleep(0)
        return h.state() is until and all(t.done() for t in h.tasks)

    await async_wait_for(reached, timeout=timeout, what=f"desktop {until.value}")


def test_session_end_logs_off_polls_until_gone_then_wipes_clean(tmp_path: Path) -> None:
    marker = tmp_path / "polls"
    script(tmp_path / "logoff", f'echo "$1 $2 $HZ_TOKEN" > {tmp_path}/logoff.args\n')
    # Asynchronous log-off: the session is still there for the first two polls.
    script(tmp_path / "gone", f"echo x >> {marker}; [ $(wc -l < {marker}) -ge 3 ]\n")
    script(tmp_path / "wipe", f'echo "$1" > {tmp_path}/wiped; echo "token $HZ_TOKEN" >&2\n')
    h = Harness(tmp_path, pool(tmp_path))

    async def main() -> None:
        with h.store.transaction():
            assert h.runner.session_started(
                "a1", "s1", address="10.1.0.1:3389", name=None, user="w123", now=1.0
            )
        assert h.state() is DesktopState.IN_USE
        with h.store.transaction():
            h.runner.session_ended("a1", "s1", reason="gone_from_posture", now=2.0)
        await settle(h, DesktopState.CLEAN)

    asyncio.run(main())
    assert (tmp_path / "logoff.args").read_text() == "hz-01 w123 s3cr3t-token\n"  # the secret reached it
    assert len(marker.read_text().splitlines()) == 3
    assert (tmp_path / "wiped").read_text() == "hz-01\n"
    assert h.kinds() == [
        "desktop.added",
        "desktop.in_use",
        "desktop.ending",
        "desktop.ended",
        "desktop.wiping",
        "desktop.clean",
    ]
    assert "s3cr3t-token" not in h.audit_text()  # never audited, even when a script prints it
    sessions = h.store.desktop_sessions("hz-01")
    assert sessions[0]["user_name"] == "w123" and sessions[0]["ended"] is not None


def test_failing_wipe_is_retried_with_backoff_then_quarantined_and_never_handed_out(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    script(tmp_path / "logoff", "exit 0\n")
    script(tmp_path / "gone", "exit 0\n")
    script(tmp_path / "wipe", f"date +%s.%N >> {calls}; echo broken >&2; exit 3\n")
    h = Harness(tmp_path, pool(tmp_path, retries=3, backoff_s=0.2))

    async def main() -> None:
        operations.wipe(h.store, "hz-01", operator="alice", reason="suspected leftovers")
        await settle(h, DesktopState.QUARANTINED)
        with h.store.transaction():
            assert (
                h.runner.session_started("a2", "s9", address="10.1.0.1", name=None, user="w9", now=5.0)
                is None
            )

    asyncio.run(main())
    times = [float(t) for t in calls.read_text().split()]
    assert len(times) == 3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # doubling back-off
    assert h.kinds() == [
        "desktop.added",
        "operator.desktops_wipe",
        "desktop.retry",
        "desktop.retry",
        "desktop.quarantined",
        "desktop.refused",
    ]
    d = h.store.desktop("hz-01")
    assert d is not None and d.agent is None and "exited 3: broken" in d.detail


def test_release_hands_out_again_only_after_a_clean_wipe(tmp_path: Path) -> None:
    script(tmp_path / "logoff", "exit 0\n")
    script(tmp_path / "gone", "exit 0\n")
    wipe = script(tmp_path / "wipe", "exit 1\n")
    h = Harness(tmp_path, pool(tmp_path, retries=1, backoff_s=0.0))

    async def main() -> None:
        operations.wipe(h.store, "hz-01", operator="alice", reason="x")
        await settle(h, DesktopState.QUARANTINED)
        operations.release(h.store, "hz-01", operator="bob", reason="looked: still broken")
        await settle(h, DesktopState.QUARANTINED)  # the wipe failed again: not released
        with h.store.transaction():
            assert (
                h.runner.session_started("a1", "s1", address="10.1.0.1", name=None, user="w", now=1.0) is None
            )
        script(wipe, "exit 0\n")
        operations.release(h.store, "hz-01", operator="bob", reason="fixed the image")
        await settle(h, DesktopState.CLEAN)
        with h.store.transaction():
            assert h.runner.session_started("a1", "s2", address="10.1.0.1", name=None, user="w", now=2.0)

    asyncio.run(main())
    released = [e for e in h.store.audit_entries() if e.kind == "operator.desktops_release"]
    assert [e.actor for e in released] == ["operator:bob", "operator:bob"]
    assert "fixed the image" in released[1].data_json


def test_a_step_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    script(tmp_path / "logoff", "exit 0\n")
    script(tmp_path / "gone", "exit 0\n")
    script(tmp_path / "wipe", f"sleep 30 & echo $! > {tmp_path}/child; wait\n")
    desktops = parse_desktops(_with_timeout(tmp_path))
    h = Harness(tmp_path, desktops)
    started = time.monotonic()

    async def main() -> None:
        operations.wipe(h.store, "hz-01", operator="alice", reason="x")
        await settle(h, DesktopState.QUARANTINED)

    asyncio.run(main())
    assert time.monotonic() - started < 5
    child = int((tmp_path / "child").read_text())
    assert not os.path.exists(f"/proc/{child}") or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    d = h.store.desktop("hz-01")
    assert d is not None and "took longer than 0.5 s" in d.detail


def _with_timeout(tmp_path: Path) -> str:
    return f"""
[[pool]]
id = "hz"
driver = "command"
retries = 1
timeout_s = 0.5
[pool.command]
log_off = ["{tmp_path}/logoff"]
wipe = ["{tmp_path}/wipe"]
[[pool.desktop]]
id = "hz-01"
address = "10.1.0.1"
"""
