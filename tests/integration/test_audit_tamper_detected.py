"""`cleanroom-controller audit verify` catches a tampered audit trail and names the entry.

One real run (Mosquitto, controller, agent, a compliant session and a few heartbeats) fills a real
controller.db; then each test edits, deletes or reorders one audit row with direct SQLite writes on its own
copy (dropping the append-only triggers first, as an attacker with file access would) and runs the real
`audit verify` on it. The untouched copy verifies with exit 0.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Controller, audit_entries, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

MIN_ENTRIES = 12


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Controller, Path]]:
    """A controller data dir with a real audit trail (the controller stopped cleanly afterwards)."""
    root = tmp_path_factory.mktemp("audit")
    broker = Mosquitto(root / "mosquitto")
    broker.start()
    try:
        with cleanroom(root, broker) as world:
            world.write_policy(heartbeat_s=1)
            ctl = world.start_controller()
            world.spawn_client()
            world.add_agent("it-agent")
            world.wait_agent(
                "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
            )
            wait_for(
                lambda: len(audit_entries(ctl.db_path)) >= MIN_ENTRIES,
                timeout=30,
                what=f"at least {MIN_ENTRIES} audit entries",
            )
            world.agents["it-agent"].stop()
            assert ctl.stop() is not None
            yield ctl, ctl.data_dir
    finally:
        broker.stop()


def _tampered_copy(pristine: Path, dest: Path, tamper: Callable[[sqlite3.Connection], None]) -> Path:
    shutil.copytree(pristine, dest)
    con = sqlite3.connect(dest / "controller.db")
    try:
        con.execute("DROP TRIGGER IF EXISTS audit_no_update")
        con.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        tamper(con)
        con.commit()
    finally:
        con.close()
    return dest


def _middle_id(data_dir: Path) -> int:
    ids = [int(e["id"]) for e in audit_entries(data_dir / "controller.db")]
    assert len(ids) >= MIN_ENTRIES, f"only {len(ids)} audit entries recorded"
    return ids[len(ids) // 2]


def _edit(target: int) -> Callable[[sqlite3.Connection], None]:
    def go(con: sqlite3.Connection) -> None:
        (data,) = con.execute("SELECT data FROM audit WHERE id = ?", (target,)).fetchone()
        value = json.loads(data)
        value = {**value, "tampered": True} if isinstance(value, dict) else {"tampered": value}
        con.execute("UPDATE audit SET data = ? WHERE id = ?", (json.dumps(value, sort_keys=True), target))

    return go


def _delete(target: int) -> Callable[[sqlite3.Connection], None]:
    def go(con: sqlite3.Connection) -> None:
        con.execute("DELETE FROM audit WHERE id = ?", (target,))

    return go


def _reorder(target: int) -> Callable[[sqlite3.Connection], None]:
    """Swap the stored order of entries ``target`` and ``target + 1`` (ids stay, contents trade places)."""

    def go(con: sqlite3.Connection) -> None:
        cols = "ts, kind, actor, subject, data, prev_hash, hash"
        a = con.execute(f"SELECT {cols} FROM audit WHERE id = ?", (target,)).fetchone()  # noqa: S608
        b = con.execute(f"SELECT {cols} FROM audit WHERE id = ?", (target + 1,)).fetchone()  # noqa: S608
        assignments = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
        con.execute(f"UPDATE audit SET {assignments} WHERE id = ?", (*b, target))  # noqa: S608
        con.execute(f"UPDATE audit SET {assignments} WHERE id = ?", (*a, target + 1))  # noqa: S608

    return go


def test_untouched_audit_trail_verifies(recorded: tuple[Controller, Path], tmp_path: Path) -> None:
    ctl, pristine = recorded
    copy = tmp_path / "copy"
    shutil.copytree(pristine, copy)
    done = ctl.audit_verify(copy)
    assert done.returncode == 0, f"audit verify rejected an untouched trail:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize(
    ("how", "make"),
    [("edited", _edit), ("deleted", _delete), ("reordered", _reorder)],
    ids=["edit", "delete", "reorder"],
)
def test_tampered_audit_row_fails_verify_naming_the_entry(
    recorded: tuple[Controller, Path],
    tmp_path: Path,
    how: str,
    make: Callable[[int], Callable[[sqlite3.Connection], None]],
) -> None:
    ctl, pristine = recorded
    target = _middle_id(pristine)
    copy = _tampered_copy(pristine, tmp_path / "copy", make(target))
    done = ctl.audit_verify(copy)
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"audit verify passed a trail with entry {target} {how}:\n{output}"
    assert re.search(rf"\bentry {target}\b", output), (
        f"audit verify did not name entry {target} ({how}):\n{output}"
    )
