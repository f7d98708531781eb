"""A controller killed with -9 while a desktop is ``wiping`` finishes the wipe after it is restarted: the
state was persisted before the wipe ran, and the restarted controller's poll resumes it.

Real controller processes, real Mosquitto, the command driver running a real script; the desktop itself is
simulated by that script (a VDI broker's refresh call is what this machine cannot have)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Controller, audit_entries, policy_toml
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def test_wipe_interrupted_by_kill_9_completes_after_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "wipe-calls"
    wipe = bin_dir / "refresh"
    # The first wipe hangs (the controller is killed in it); the next one succeeds.
    wipe.write_text(
        f'#!/bin/sh\necho "$1" >> {calls}\n[ $(wc -l < {calls}) -ge 2 ] && exit 0\necho $$ > {tmp_path}/hung.pid\nexec sleep 60\n'
    )
    wipe.chmod(wipe.stat().st_mode | stat.S_IXUSR)
    logoff = bin_dir / "logoff"
    logoff.write_text("#!/bin/sh\nexit 0\n")
    logoff.chmod(0o755)
    desktops = tmp_path / "desktops.toml"
    desktops.write_text(f"""
[[pool]]
id = "hz"
driver = "command"
timeout_s = 120
[pool.command]
log_off = ["{logoff}", "{{desktop}}"]
wipe = ["{wipe}", "{{desktop}}"]
[[pool.desktop]]
id = "hz-01"
address = "10.1.0.1"
""")
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml())
    data_dir = tmp_path / "controller"

    def controller() -> Controller:
        ctl = Controller(
            data_dir=data_dir, broker_url=mosquitto.url, policy=policy, extra=("--desktops", str(desktops))
        )
        ctl.start()
        return ctl

    def state(ctl: Controller) -> str | None:
        ctl.assert_alive()
        if not ctl.db_path.exists():
            return None
        try:
            rows = ctl.db_rows("SELECT state FROM desktops WHERE id = 'hz-01'")
        except sqlite3.OperationalError:  # the database is there, its schema not yet
            return None
        return str(rows[0]["state"]) if rows else None

    ctl = controller()
    try:
        wait_for(lambda: state(ctl) == "clean", timeout=15, what="hz-01 stored clean")
        ctl.cli("desktops", "wipe", "hz-01", "--reason", "test")
        wait_for(lambda: calls.exists(), timeout=10, what="the first wipe running")
        assert state(ctl) == "wiping"
        ctl.kill()  # -9, in the middle of the wipe
    finally:
        ctl.stop()
    ctl = controller()
    try:
        wait_for(lambda: state(ctl) == "clean", timeout=15, what="hz-01 clean after the restart")
    finally:
        ctl.stop()
        hung = tmp_path / "hung.pid"
        if hung.exists():  # the first wipe's script, orphaned by the kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(hung.read_text()), signal.SIGKILL)
    assert calls.read_text().split() == ["hz-01", "hz-01"]
    kinds = [e["kind"] for e in audit_entries(ctl.db_path) if e["subject"] == "hz-01"]
    assert kinds == ["desktop.added", "operator.desktops_wipe", "desktop.clean"]
    assert ctl.audit_verify().returncode == 0
