"""libvirt-python is an optional extra: without it the controller still imports and starts, and a libvirt
pool's steps fail with the reason (so its desktops are quarantined, never handed out dirty).

libvirt-python is installed here (the other driver tests need it); a child interpreter makes it unimportable
(``sys.modules["libvirt"] = None``), as on a machine that installed the controller without the extra."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import asyncio, json, sys
sys.modules["libvirt"] = None
import cleanroom_controller.daemon  # the composition root imports the driver registry
from cleanroom_controller.actions.drivers.desktops import desktop_drivers
driver = desktop_drivers()["libvirt"]
outcome = asyncio.run(driver.wipe(None))
report = asyncio.run(driver.report(None))
print(json.dumps({"type": type(driver).__name__, "result": outcome.result, "detail": outcome.detail,
                  "state": report.state}))
"""


def test_without_libvirt_python_the_controller_imports_and_libvirt_steps_fail_with_the_reason() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["type"] == "UnavailableDriver"
    assert seen["result"] == "failed" and seen["state"] == "unknown"
    assert "libvirt-python" in seen["detail"] and "cleanroom-controller[libvirt]" in seen["detail"]
