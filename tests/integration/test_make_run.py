"""`make run`'s script (scripts/run_local.py), for real: the mTLS broker, the controller, the enrolled agent and
the watch view, started in a run directory of the test's own, then stopped the way `timeout` and a closing
terminal stop it: SIGTERM to the whole process group, and the same SIGTERM again (`uv run` forwards it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_make_run_starts_everything_and_a_repeated_sigterm_stops_every_child_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run_local.py")],
        env={**os.environ, "CLEANROOM_RUN_DIR": str(tmp_path / "run")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as `make run` in a terminal
    )
    out: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr
    reader = threading.Thread(target=lambda: out.extend(iter(stdout.readline, "")), daemon=True)
    reader.start()
    children: list[psutil.Process] = []  # in sessions of their own: a process-group kill misses them
    try:
        wait_for(
            lambda: any("Ctrl-C stops everything" in line for line in out) or proc.poll() is not None,
            timeout=60,
            what="make run's 'cleanroom running' banner",
        )
        if proc.poll() is not None:
            raise AssertionError(f"run_local exited with {proc.returncode}: {''.join(out)}{stderr.read()}")
        # The broker, the controller, the agent and (a second after the banner) the watch view.
        wait_for(lambda: len(psutil.Process(proc.pid).children()) >= 4, timeout=15, what="four children")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert "mosquitto" in {c.name() for c in children}
        os.killpg(proc.pid, signal.SIGTERM)
        wait_for(lambda: any("stopping" in line for line in out), timeout=10, what="'stopping…'")
        os.kill(proc.pid, signal.SIGTERM)  # uv run forwards the same signal, into the stop sequence
        code = proc.wait(timeout=40)
        _, alive = psutil.wait_procs(children, timeout=15)
    finally:
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = stderr.read()
    assert code == 0 and "Traceback" not in err, f"exit {code}: {err}"
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
