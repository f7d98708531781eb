"""The real ``cleanroom-controller run`` process: embedded broker on loopback, retained policy, clean stop on
SIGTERM (exit 0, ``controller.stopped`` audited, chain intact)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt

from cleanroom_controller import Store, verify_chain
from cleanroom_protocol import POLICY_TOPIC
from tests.support.mosquitto import free_port

from .helpers import POLICY_FILE


def controller_command() -> list[str]:
    exe = shutil.which("cleanroom-controller", path=str(Path(sys.executable).parent))
    assert exe, "cleanroom-controller is not installed in this environment (uv sync)"
    return [exe]


async def test_run_with_embedded_broker_and_stop_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    log = (tmp_path / "controller.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    proc = subprocess.Popen(
        [*controller_command(), "run", "--embedded-broker", "--broker", f"mqtt://127.0.0.1:{port}",
         "--data-dir", str(data), "--policy", str(POLICY_FILE)],
        stdout=log, stderr=log, env=env,
    )  # fmt: skip
    try:
        message: aiomqtt.Message | None = None
        async with asyncio.timeout(20):
            # Until a fresh subscriber gets the policy as a *retained* message (a subscriber that was
            # there before the publish gets it live, without the flag).
            while message is None or not message.retain:
                assert proc.poll() is None, (tmp_path / "controller.log").read_text()
                try:
                    async with aiomqtt.Client("127.0.0.1", port, identifier="probe") as client:
                        await client.subscribe(POLICY_TOPIC, qos=1)
                        async with asyncio.timeout(5):
                            message = await anext(aiter(client.messages))
                except aiomqtt.MqttError:
                    await asyncio.sleep(0.2)  # not listening yet: retry until the deadline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, (tmp_path / "controller.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = Store.open(data)
    entries = list(store.audit_entries())
    assert entries[-1].kind == "controller.stopped"
    assert verify_chain(entries, store.audit_head()) is None
    assert b"Traceback" not in (tmp_path / "controller.log").read_bytes()
