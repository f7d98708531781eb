"""libvirt-python and the Docker SDK are optional extras: without one, the controller still imports and
starts, and a pool of that driver has its steps fail with the reason (so its desktops are quarantined, never
handed out dirty).

Both are installed here (the driver tests need them); a child interpreter makes one unimportable
(``sys.modules[NAME] = None``), as on a machine that installed the controller without that extra."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = """
import asyncio, json, sys
sys.modules[sys.argv[1]] = None
import cleanroom_controller.daemon  # the composition root imports the driver registry
from cleanroom_controller.actions.drivers.desktops import desktop_drivers
driver = desktop_drivers()[sys.argv[2]]
outcome = asyncio.run(driver.wipe(None))
report = asyncio.run(driver.report(None))
print(json.dumps({"type": type(driver).__name__, "result": outcome.result, "detail": outcome.detail,
                  "state": report.state}))
"""


@pytest.mark.parametrize(
    ("module", "driver", "library", "extra"),
    [
        ("libvirt", "libvirt", "libvirt-python", "cleanroom-controller[libvirt]"),
        ("docker", "container", "Docker SDK", "cleanroom-controller[container]"),
    ],
)
def test_without_its_library_the_controller_imports_and_the_drivers_steps_fail_with_the_reason(
    module: str, driver: str, library: str, extra: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, module, driver], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["type"] == "UnavailableDriver"
    assert seen["result"] == "failed" and seen["state"] == "unknown"
    assert library in seen["detail"] and extra in seen["detail"]
