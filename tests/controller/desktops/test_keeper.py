"""The desktops keeper: a change to the desktops file (saved the way editors save: a new file renamed over
it) is picked up by the same file watch as the policy's, within a second; a broken edit is refused and
audited, and the desktops in force stay. Real files, a real inotify watch, a real SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.desktops.keeper import DesktopsKeeper
from cleanroom_controller.store import Store
from tests.support.wait import async_wait_for

FILE = """
[[pool]]
id = "hz"
driver = "command"
[pool.command]
log_off = ["/bin/true"]
wipe = ["/bin/true"]
{desktops}
"""
DESKTOP = '[[pool.desktop]]\nid = "{id}"\naddress = "{address}"\n'


def write(path: Path, text: str) -> None:
    new = path.with_name(path.name + ".tmp")
    new.write_text(text)
    new.replace(path)


async def test_an_edit_is_in_force_within_a_second_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "desktops.toml"
    write(path, FILE.format(desktops=DESKTOP.format(id="hz-01", address="10.1.0.1")))
    store = Store.open(tmp_path)
    keeper = DesktopsKeeper(recorder=Recorder(store, "controller:test"), path=path)
    keeper.load_initial()
    changes: list[int] = []

    async def on_change() -> None:
        changes.append(len(keeper.desktops))

    started = asyncio.Event()
    task = asyncio.create_task(keeper.watch(on_change, started))
    try:
        await asyncio.wait_for(started.wait(), timeout=5)
        edited = time.monotonic()
        two = DESKTOP.format(id="hz-01", address="10.1.0.1") + DESKTOP.format(id="hz-02", address="10.1.0.2")
        write(path, FILE.format(desktops=two))

        async def in_force() -> bool:
            return changes == [2]

        await async_wait_for(in_force, timeout=5, what="the second desktop in force")
        assert time.monotonic() - edited < 1.0, "the edit took a second or more to be in force"
        assert keeper.desktops.get("hz-02") is not None

        write(path, FILE.format(desktops='[[pool.desktop]]\nid = "hz-03"\n'))  # no address

        async def refused() -> bool:
            return any(e.kind == "desktops.rejected" for e in store.audit_entries())

        await async_wait_for(refused, timeout=5, what="the broken edit refused")
        assert changes == [2] and len(keeper.desktops) == 2, "a broken file replaced the one in force"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
