"""N controllers on one store never run the same desktop step at once: the claim in the store (one conditional
upsert) raced by two Store objects on one real SQLite file (and on a real PostgreSQL) from two threads, its lease, and two DesktopRunners
(two stores, two owners) driving one desktop whose wipe is a real script that logs when it starts and ends.

Simulated: the second controller process, by a second Store and runner in this process (each with its own
SQLite connection to the same file, as two processes have)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from cleanroom_controller.actions.drivers.command import CommandDriver
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.desktops import operations
from cleanroom_controller.desktops.config import Desktops, parse_desktops
from cleanroom_controller.desktops.machine import DesktopState
from cleanroom_controller.desktops.runner import DesktopRunner
from cleanroom_controller.store import Store
from tests.support.wait import async_wait_for

ROUNDS = 200


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    """``Store.open``'s database: SQLite in the test's data dir, or a fresh database on a real PostgreSQL."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))


def test_two_stores_racing_for_one_desktop_never_both_win(tmp_path: Path, database: str | None) -> None:
    """Each round both threads claim the same desktop at once (a barrier lines them up); exactly one wins,
    counted on both sides; the winner releases it for the next round."""
    Store.open(tmp_path, database).close()  # the schema, before the race
    barrier = threading.Barrier(2)
    wins: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def contender(i: int) -> None:
        try:
            store = Store.open(tmp_path, database)  # each thread its own connection, as each process has
            try:
                for r in range(ROUNDS):
                    barrier.wait(timeout=10)
                    if store.claim_desktop("d1", f"owner-{i}", now=time.time(), lease_s=30):
                        wins[i].append(r)
                    barrier.wait(timeout=10)  # both have tried: the winner lets go
                    store.release_desktop_claim("d1", f"owner-{i}")
                    barrier.wait(timeout=10)
            finally:
                store.close()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=contender, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    both = set(wins[0]) & set(wins[1])
    assert not both, f"both stores won rounds {sorted(both)[:10]}"
    assert len(wins[0]) + len(wins[1]) == ROUNDS, f"rounds nobody won: {ROUNDS - len(wins[0]) - len(wins[1])}"


def test_a_claim_is_kept_while_renewed_and_taken_over_once_its_lease_lapses(
    tmp_path: Path, database: str | None
) -> None:
    a, b = Store.open(tmp_path, database), Store.open(tmp_path, database)
    t0 = 1000.0
    assert a.claim_desktop("d1", "A", now=t0, lease_s=5)
    assert not b.claim_desktop("d1", "B", now=t0 + 4, lease_s=5), "taken while A's lease runs"
    assert a.renew_desktop_claims("A", now=t0 + 4, lease_s=5) == 1
    assert not b.claim_desktop("d1", "B", now=t0 + 8, lease_s=5), "taken although A renewed it"
    assert a.claim_desktop("d1", "A", now=t0 + 8, lease_s=5), "the holder must keep its own claim"
    assert b.claim_desktop("d1", "B", now=t0 + 13.5, lease_s=5), "a lapsed lease must be taken over"
    assert not a.claim_desktop("d1", "A", now=t0 + 14, lease_s=5), "A got it back from B's live lease"
    assert not a.release_desktop_claim("d1", "A"), "A released B's claim"
    assert b.desktop_claims()["d1"][0] == "B"
    a.close()
    b.close()


def _pool(tmp_path: Path) -> Desktops:
    return parse_desktops(f"""
[[pool]]
id = "hz"
driver = "command"
timeout_s = 10
backoff_s = 0
[pool.command]
log_off = ["/bin/true"]
wipe = ["{tmp_path}/wipe", "{{desktop}}"]
[[pool.desktop]]
id = "hz-01"
address = "10.1.0.1"
""")


class Controller:
    """One controller's desktop side: its own Store (connection) on the shared file, its own owner name."""

    def __init__(self, tmp_path: Path, desktops: Desktops, owner: str, lease_s: float = 5.0) -> None:
        self.store = Store.open(tmp_path)
        self.tasks: list[asyncio.Task[None]] = []
        self.runner = DesktopRunner(
            store=self.store,
            recorder=Recorder(self.store, f"controller:{owner}"),
            desktops=lambda: desktops,
            drivers={"command": CommandDriver({})},
            spawn=lambda coro, name: self.tasks.append(
                asyncio.get_running_loop().create_task(coro, name=name)
            ),
            owner=owner,
            lease_s=lease_s,
        )
        self.runner.sync()

    def idle(self) -> bool:
        return all(t.done() for t in self.tasks)


def _wipe_script(tmp_path: Path) -> Path:
    log = tmp_path / "wipe.log"
    wipe = tmp_path / "wipe"
    wipe.write_text(f'#!/bin/sh\necho "start $$" >> {log}\nsleep 0.3\necho "end $$" >> {log}\n')
    wipe.chmod(0o755)
    return log


async def test_two_runners_polling_one_store_run_each_wipe_once_never_overlapping(tmp_path: Path) -> None:
    log = _wipe_script(tmp_path)
    desktops = _pool(tmp_path)
    a, b = Controller(tmp_path, desktops, "A"), Controller(tmp_path, desktops, "B")
    for n in range(3):
        operations.wipe(a.store, "hz-01", operator="test", reason=f"round {n}")

        async def clean() -> bool:
            a.runner.poll()  # both poll every tick, as two daemons do
            b.runner.poll()
            await asyncio.sleep(0.02)
            d = a.store.desktop("hz-01")
            return d is not None and d.state is DesktopState.CLEAN and a.idle() and b.idle()

        await async_wait_for(clean, timeout=10, what=f"hz-01 clean (round {n})")
    calls = [tuple(line.split()) for line in log.read_text().splitlines()]
    # start/end strictly alternate, each end by the script that started: no second wipe began while one ran,
    # and one wipe per request (not one per runner).
    assert [c[0] for c in calls] == ["start", "end"] * 3, calls
    assert all(calls[i][1] == calls[i + 1][1] for i in range(0, len(calls), 2)), calls
    cleans = [e for e in a.store.audit_entries() if e.kind == "desktop.clean"]
    assert len(cleans) == 3, [e.actor for e in cleans]
    assert a.store.desktop_claims() == {}, "a claim was left behind after the step"


async def test_a_dead_controllers_claim_holds_the_step_until_its_lease_lapses(tmp_path: Path) -> None:
    log = _wipe_script(tmp_path)
    desktops = _pool(tmp_path)
    b = Controller(tmp_path, desktops, "B")
    operations.wipe(b.store, "hz-01", operator="test", reason="kill test")
    # A controller that claimed the desktop and was killed (-9) before its step ran: its lease runs 1 s more.
    assert b.store.claim_desktop("hz-01", "dead", now=time.time(), lease_s=1.0)
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        b.runner.poll()
        await asyncio.sleep(0.05)
    assert not log.exists(), "the step ran under another controller's live claim"

    async def clean() -> bool:
        b.runner.poll()
        await asyncio.sleep(0.05)
        d = b.store.desktop("hz-01")
        return d is not None and d.state is DesktopState.CLEAN and b.idle()

    await async_wait_for(clean, timeout=10, what="hz-01 wiped by B once the dead claim lapsed")
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["start", "end"]
