"""The Docker SDK is an optional extra: without it the controller still imports and starts, and a container
pool's steps fail with the reason (so its desktops are quarantined, never handed out dirty).

The SDK is installed here (the container driver's tests need it); a child interpreter makes it unimportable
(``sys.modules["docker"] = None``), as on a machine that installed the controller without the extra."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import asyncio, json, sys
sys.modules["docker"] = None
import cleanroom_controller.daemon  # the composition root imports the driver registry
from cleanroom_controller.actions.drivers.desktops import desktop_drivers
driver = desktop_drivers()["container"]
outcome = asyncio.run(driver.wipe(None))
report = asyncio.run(driver.report(None))
print(json.dumps({"type": type(driver).__name__, "result": outcome.result, "detail": outcome.detail,
                  "state": report.state}))
"""


def test_without_the_docker_sdk_the_controller_imports_and_container_steps_fail_with_the_reason() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["type"] == "UnavailableDriver"
    assert seen["result"] == "failed" and seen["state"] == "unknown"
    assert "Docker SDK" in seen["detail"] and "cleanroom-controller[container]" in seen["detail"]
