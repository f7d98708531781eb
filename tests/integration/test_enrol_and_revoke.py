"""A device's whole life with real parts: Mosquitto from `broker-config` (mTLS only), `cleanroom-controller
run` with its PKI and enrolment endpoint, `cleanroom-controller enroll create`, `cleanroom-agent enroll`
with the token from a file, then `cleanroom-agent run` with nothing but its data dir (broker, TLS files,
controller key all from the enrolment). A second use of the token is refused. `agents revoke` closes the
device's broker connection within 5 s, its reconnects fail the handshake, the controller judges it in
violation, and the agent's own fail-closed rule ends its session once it has been cut off for
`max_offline_s`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_broker_mtls import mtls_broker
from tests.support.mosquitto import free_port
from tests.support.procs import audit_entries, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cleanroom_agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_enrol_with_a_token_then_revoke_within_5_s(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root: the broker drops to the mosquitto user and reads files written for it")
    with (
        mtls_broker(tmp_path / "cleanroom" / "controller", tmp_path) as world,
        cleanroom(tmp_path, world.broker) as cr,
    ):
        pki = world.pki
        cr.write_policy(heartbeat_s=1, max_offline_s=3)
        enrol_port = free_port()
        ctl = cr.start_controller(
            "--tls-ca", str(pki.ca_cert_path),
            "--tls-cert", str(pki.controller_cert_path),
            "--tls-key", str(pki.controller_key_path),
            "--broker-dir", str(world.files.out),
            "--enroll-listen", f"127.0.0.1:{enrol_port}",
            "--agent-broker-url", world.broker.url,
        )  # fmt: skip
        wait_for(lambda: listening(enrol_port), timeout=20, what="the enrolment endpoint listening")
        token = ctl.cli("enroll", "create", "--site", "it", "--expires", "10m").stdout.strip()
        token_file = tmp_path / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        agent_dir = tmp_path / "agent"
        url = f"https://127.0.0.1:{enrol_port}"
        enrolled = agent_cli("enroll", "--controller", url, "--token-file", str(token_file),
                             "--data-dir", str(agent_dir), "--id", "it-agent")  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        again = agent_cli("enroll", "--controller", url, "--token-file", str(token_file),
                          "--data-dir", str(tmp_path / "thief"), "--id", "it-thief")  # fmt: skip
        assert again.returncode != 0 and "token_used_up" in again.stderr, again.stderr

        session = cr.spawn_client()
        log = (tmp_path / "agent.log").open("wb")
        agent = subprocess.Popen(
            [sys.executable, "-m", "cleanroom_agent", "run", "--data-dir", str(agent_dir), "--id", "it-agent",
             "--socket", str(tmp_path / "agent.sock"), "--enforcers", "", "--keepalive", "2",
             "--poll-interval", "0.2", "--log-level", "debug"],
            stdout=log, stderr=log,
        )  # fmt: skip
        try:
            cr.wait_agent("it-agent", timeout=30, what="the enrolled agent online over mTLS", online=True,
                          compliant=True)  # fmt: skip
            cr.wait_session(session.session_id, timeout=15, what="its session running", state="running")
            agent_log = tmp_path / "agent.log"
            connects = agent_log.read_text().count("broker_connected")

            started = time.monotonic()
            revoked = ctl.cli("agents", "revoke", "it-agent", "--reason", "laptop stolen",
                              "--broker", world.broker.url, "--broker-dir", str(world.files.out), check=False)  # fmt: skip
            assert revoked.returncode == 0, revoked.stderr
            wait_for(
                lambda: "broker_connection_lost" in agent_log.read_text(),
                timeout=max(0.1, 5 - (time.monotonic() - started)),
                what="the revoked agent's broker connection closed within 5 s of `agents revoke`",
            )
            row = cr.wait_agent("it-agent", timeout=10, what="the revoked agent judged in violation",
                                compliant=False)  # fmt: skip
            assert any(r.startswith("agent_revoked") for r in row["reasons"]), row
            # cut off for max_offline_s (3 s): the agent ends the session itself
            wait_for(lambda: not session.live_pids(), timeout=20, what="the revoked endpoint's session ended")
            assert agent_log.read_text().count("broker_connected") == connects, (
                "the revoked agent got back in"
            )
            steps = {e["kind"]: json.loads(e["data_json"]) for e in audit_entries(ctl.db_path)}
            assert steps["operator.agents_revoke"]["reason"] == "laptop stolen"
            assert steps["revocation.certificates"]["serials"], steps
            assert steps["revocation.disconnected"] == {"ok": True}
            assert "revocation.broker_reloaded" in steps
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
            log.close()
