"""The agent's footprint cannot regrow unnoticed (issue 7: the whole agent idle under 50 MB).

The budgets are the figures measured here (bench/enforce.py --only agent: combined RSS ~69 MB, listener
~15.5 MB RSS) plus a margin for noise; the import checks say what they guard: the agent started through
its entry point never imports ``rich``, and the fanotify listener stays a stdlib-only program (no agent
package, no pydantic, no subprocess/dataclasses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from cleanroom_protocol import Channel, Kind
from tests.agent.conftest import Tap
from tests.integration.enforce.conftest import xvfb as xvfb  # the fixture, used by name
from tests.support.footprint import combined_rss_mb, process_memory
from tests.support.wait import wait_for

ENFORCERS_DIR = Path(__file__).resolve().parents[2] / "agent" / "cleanroom_agent" / "enforcers"

# Measured idle under Xvfb with all four enforcers (test poll 0.2 s): daemon 63 MB RSS, listener 15.5 MB,
# combined (each page once) 69-70 MB. Importing rich again adds ~3 MB; the listener importing the agent
# package would add ~40 MB; dataclasses and ctypes.util back in the listener, ~3 MB.
COMBINED_RSS_BUDGET_MB = 74.0
LISTENER_RSS_BUDGET_MB = 17.0

# Never in the listener: each is the agent's weight (pydantic, cryptography) or a stdlib module it got
# rid of (subprocess/tempfile came with ctypes.util.find_library, inspect with dataclasses).
LISTENER_FORBIDDEN = ("cleanroom_agent", "cleanroom_protocol", "pydantic", "cryptography", "subprocess",
                      "tempfile", "dataclasses", "inspect")  # fmt: skip

LISTENER_IMPORTS = """
import sys, types
p = types.ModuleType('cleanroom_enforcers'); p.__path__ = [sys.argv[1]]
sys.modules['cleanroom_enforcers'] = p
import cleanroom_enforcers.fanotify
print(' '.join(sorted(sys.modules)))
"""


ENTRY_THEN_DAEMON = """
import runpy, sys
sys.argv = ["cleanroom-agent", "run", "--help"]
try:
    runpy.run_module("cleanroom_agent", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
import cleanroom_agent.daemon  # what `run` imports once it runs
print("MODULES:", " ".join(name for name, module in sys.modules.items() if module is not None))
"""


def imported_modules(log: str) -> list[str]:
    """Module names from ``-X importtime`` lines (``import time: self | cumulative | name``), in the
    order their imports finished."""
    return [
        row.rsplit("|", 1)[1].strip()
        for row in log.splitlines()
        if row.startswith("import time:") and row.count("|") == 2
    ]


def test_fanotify_listener_imports_only_what_it_needs() -> None:
    """The listener as capture.py starts it (``-I -S``, a synthetic package): stdlib only, and not the
    stdlib modules it no longer needs."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LISTENER_IMPORTS, str(ENFORCERS_DIR)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    modules = set(done.stdout.split())
    assert "cleanroom_enforcers.fanotify" in modules
    found = sorted(m for m in modules if m.split(".")[0] in LISTENER_FORBIDDEN)
    assert not found, f"the fanotify listener imports {found}"


def test_agent_entry_point_never_imports_rich() -> None:
    """The console script's code (``python -m cleanroom_agent``) printing ``run``'s help, then everything
    ``run`` imports: structlog and typer loaded, rich not (importtime cannot tell: it lists failed
    attempts too, so sys.modules is read), and the help still printed without it."""
    done = subprocess.run(
        [sys.executable, "-c", ENTRY_THEN_DAEMON],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--controller-key" in done.stdout
    modules = set(done.stdout.split("MODULES:", 1)[1].split())
    assert {"structlog", "typer", "cleanroom_agent.cli", "cleanroom_agent.daemon"} <= modules
    assert not {m for m in modules if m.split(".")[0] == "rich"}


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.x11
def test_idle_agent_with_every_enforcer_stays_within_its_memory_budget(
    agent_factory: Any, mosquitto: Any, tap: Tap, xvfb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real agent (``python -m cleanroom_agent run``) on a real Mosquitto with clipboard (real Xvfb),
    capture (its fanotify listener process), usb (an empty sysfs: this machine has no USB bus) and media,
    idle once every enforcer is active: the daemon and its listener together, each page counted once."""
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify; /proc/PID/pagemap for the combined RSS)")
    monkeypatch.setenv("DISPLAY", xvfb)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the daemon's imports, into its log
    sysfs = tmp_path / "sys"
    sysfs.mkdir()
    agent = agent_factory(
        mosquitto.url, extra=["--enforcers", "clipboard,capture,usb,media", "--sysfs-root", str(sysfs)]
    )
    agent.start()

    def every_enforcer_active() -> bool:
        for message in reversed(tap.on(Channel.POSTURE)):
            verdict = agent.verify(message.payload, expected_kind=Kind.POSTURE)
            states = {e["name"]: e["state"] for e in verdict.envelope.body.get("enforcers", [])}
            return states.get("capture") == "active" and states.get("clipboard") == "active"
        return False

    wait_for(every_enforcer_active, timeout=30, what="a posture with capture and clipboard active")
    assert agent.proc is not None
    listeners = [
        child.pid
        for child in psutil.Process(agent.proc.pid).children(recursive=True)
        if "cleanroom_enforcers" in " ".join(child.cmdline())
    ]
    assert len(listeners) == 1, f"expected one fanotify listener child, found {listeners}"
    daemon = process_memory(agent.proc.pid)
    listener = process_memory(listeners[0])
    combined = combined_rss_mb([agent.proc.pid, listeners[0]])
    figures = (
        f"daemon RSS {daemon.rss_mb:.1f} MB, listener RSS {listener.rss_mb:.1f} MB, "
        f"combined {combined:.1f} MB"
    )
    print(figures)

    order = imported_modules(agent.log.read_text())
    # Through its entry point, the agent imports memory.py (lean_process) before the CLI's structlog.
    assert order.index("cleanroom_agent.memory") < order.index("structlog"), "not started as the entry point"
    assert listener.rss_mb <= LISTENER_RSS_BUDGET_MB, figures
    assert combined <= COMBINED_RSS_BUDGET_MB, figures
