#!/usr/bin/env python3
"""`make run`: a broker, the controller and one local agent in audit mode, live in this terminal.

Evaluation set-up on embedded defaults: everything lives under .run/ in the checkout, the broker listens on
127.0.0.1 only. Mosquitto is used when installed, as in production: the controller's PKI is created once
(`pki init`), `broker-config` writes an mTLS-only configuration (client certificates from that CA, per-agent
ACL, CRL), the controller serves its HTTPS enrolment endpoint, and the local agent is enrolled the way every
endpoint is: `enroll create` prints a one-time token, `cleanroom-agent enroll --token-file` gets the agent its
certificate, the CA and the controller's key (its keys never leave its data dir). Without Mosquitto the
controller embeds an amqtt broker: plain MQTT, keys registered with `agents add`, for evaluation only.
Ctrl-C stops everything.

Environment: CLEANROOM_RUN_DIR (instead of .run/), CLEANROOM_RUN_PORT (the broker's port, else 8883 or
1883 when free), CLEANROOM_RUN_BROKER=embedded (the evaluation broker even with Mosquitto installed).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509

from cleanroom_controller.trust import Pki

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("CLEANROOM_RUN_DIR") or ROOT / ".run")  # its own for a test
BIN = Path(sys.executable).parent
POLICY = ROOT / "policies" / "offshore-billing.toml"


def _stop_like_ctrl_c(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP (a closed terminal, `timeout`) stop the children in order too


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_like_ctrl_c)
    RUN.mkdir(exist_ok=True)
    controller_dir, agent_dir = RUN / "controller", RUN / "agent"
    agent_id = _agent_id()
    mosquitto = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if os.environ.get("CLEANROOM_RUN_BROKER") == "embedded":  # the evaluation broker, Mosquitto or not
        mosquitto = None
    port = _port(8883 if mosquitto else 1883)
    broker_url = f"{'mqtts' if mosquitto else 'mqtt'}://127.0.0.1:{port}"

    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    controller_args = [
        str(BIN / "cleanroom-controller"), "run", "--broker", broker_url,
        "--data-dir", str(controller_dir), "--policy", str(POLICY),
    ]  # fmt: skip
    # Broker URL, TLS files and the controller's key come from the agent's enrolment (mTLS) or are given
    # below (evaluation broker).
    agent_args = [
        str(BIN / "cleanroom-agent"), "run", "--broker", broker_url, "--data-dir", str(agent_dir),
        "--id", agent_id, "--mode", "audit", "--socket", str(RUN / "agent.sock"), "--policy", str(POLICY),
    ]  # fmt: skip
    enrol_port = _port(8443)
    try:
        if mosquitto:
            broker_dir = RUN / "broker"
            controller_tls = _mtls(controller_dir, broker_dir, port)
            controller_args += [
                *controller_tls, "--broker-dir", str(broker_dir),
                "--enroll-listen", f"127.0.0.1:{enrol_port}", "--agent-broker-url", broker_url,
            ]  # fmt: skip
            procs.append(
                ("mosquitto", _start([mosquitto, "-c", str(broker_dir / "mosquitto.conf")], "mosquitto"))
            )
            broker_note = (
                f"Mosquitto ({mosquitto}) on 127.0.0.1:{port}, mTLS only: TLS 1.2+, client certificates "
                f"from the controller's CA ({controller_dir / 'pki'}), per-agent ACL, CRL; "
                f"configuration in {broker_dir}"
            )
        else:
            controller_args += ["--embedded-broker", "--enroll-listen", "off"]
            controller_pub = RUN / "controller.pub"
            agent_pub = RUN / "agent.pub"
            controller_pub.write_text(
                _cli("cleanroom-controller", "identity", "--data-dir", str(controller_dir))
            )
            agent_pub.write_text(_cli("cleanroom-agent", "identity", "--data-dir", str(agent_dir)))
            _cli(
                "cleanroom-controller", "agents", "add", agent_id,
                "--public-key", str(agent_pub), "--data-dir", str(controller_dir),
            )  # fmt: skip
            agent_args += ["--controller-key", str(controller_pub)]
            broker_note = (
                f"embedded amqtt broker on 127.0.0.1:{port}, plain MQTT — FOR EVALUATION ONLY: no TLS, no "
                "client certificates, no ACL (any local process can connect, read every posture and "
                "publish under any agent's topics; signatures still protect what is accepted). "
                "Install mosquitto for the mTLS set-up"
            )
        procs.append(("controller", _start(controller_args, "controller")))
        _wait_port(port, procs)
        if mosquitto:
            _wait_port(enrol_port, procs)
            _enrol(controller_dir, agent_dir, agent_id, enrol_port)
        procs.append(("agent", _start(agent_args, "agent")))
        print(f"cleanroom running: broker {broker_note}")
        print(f"  controller data {controller_dir}, agent '{agent_id}' (audit mode) data {agent_dir}")
        print(f"  logs in {RUN}/*.log; try: cleanroom-agent launch --socket {RUN / 'agent.sock'} -- <client>")
        print("  Ctrl-C stops everything.\n")
        time.sleep(1.0)
        watch = subprocess.Popen(
            [str(BIN / "cleanroom-controller"), "watch", "--data-dir", str(controller_dir)]
        )
        while watch.poll() is None:
            for name, proc in procs:
                if proc.poll() is not None:
                    watch.terminate()
                    print(
                        f"\n{name} exited with {proc.returncode}; see {RUN / (name + '.log')}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
        return watch.returncode or 0
    except KeyboardInterrupt:
        print("\nstopping…")
        return 0
    finally:
        # Stopping is not interrupted by a second signal: `timeout` signals the whole process group and
        # `uv run` forwards the same SIGTERM again, and a second Ctrl-C would leave children running.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        # One at a time, last started first: the agent says goodbye (status offline) while the controller
        # and the broker are still there to hear it.
        for name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within 10 s; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


def _mtls(controller_dir: Path, broker_dir: Path, port: int) -> list[str]:
    """The PKI (created once) and the broker's mTLS configuration (rewritten every run: the port may
    change). Returns the controller's TLS flags."""
    if not (controller_dir / "pki").exists():
        print(_cli("cleanroom-controller", "pki", "init", "--data-dir", str(controller_dir)), end="")
    # Mosquitto keeps running as whoever runs `make run` (root: it would drop to `mosquitto`, which may
    # not reach a checkout under a private home directory).
    user = pwd.getpwuid(os.geteuid()).pw_name
    _cli(
        "cleanroom-controller", "broker-config", "--out", str(broker_dir), "--data-dir", str(controller_dir),
        "--listen", f"127.0.0.1:{port}", "--user", user,
    )  # fmt: skip
    pki = Pki.load(controller_dir)
    return [
        "--tls-ca", str(pki.ca_cert_path),
        "--tls-cert", str(pki.controller_cert_path), "--tls-key", str(pki.controller_key_path),
    ]  # fmt: skip


def _enrol(controller_dir: Path, agent_dir: Path, agent_id: str, enrol_port: int) -> None:
    """Enrol the local agent as any endpoint is enrolled: a one-time token (in a 0600 file, removed after),
    then `cleanroom-agent enroll`. Skipped once it holds a certificate from this CA: the running agent
    renews it itself (proving itself with its signing key, no token)."""
    pki = Pki.load(controller_dir)
    if _enrolled_with(agent_dir / "tls" / "agent.crt", pki.ca_cert):
        return
    token = _cli(
        "cleanroom-controller", "enroll", "create", "--site", "make-run", "--expires", "10m",
        "--data-dir", str(controller_dir),
    ).strip()  # fmt: skip
    token_file = RUN / "enrol.token"
    token_file.unlink(missing_ok=True)
    token_file.touch(mode=0o600)
    try:
        token_file.write_text(token + "\n")
        print(
            _cli(
                "cleanroom-agent", "enroll", "--controller", f"https://127.0.0.1:{enrol_port}",
                "--token-file", str(token_file), "--data-dir", str(agent_dir), "--id", agent_id,
            ),
            end="",
        )  # fmt: skip
    finally:
        token_file.unlink(missing_ok=True)


def _enrolled_with(cert_path: Path, ca: x509.Certificate) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.issuer == ca.subject


def _cli(*args: str) -> str:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def _start(args: list[str], name: str) -> subprocess.Popen[bytes]:
    log = (RUN / f"{name}.log").open("ab")
    # own process group: Ctrl-C reaches this script, which then stops the children in order
    return subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)


def _agent_id() -> str:
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:64]
    return host if host and host[0].isalnum() else f"agent-{host}"[:64]


def _port(default: int) -> int:
    wanted = int(os.environ.get("CLEANROOM_RUN_PORT", str(default)))
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _wait_port(port: int, procs: list[tuple[str, subprocess.Popen[bytes]]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs:
            if proc.poll() is not None:
                sys.exit(f"{name} exited with {proc.returncode}; see {RUN / (name + '.log')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"no broker listening on 127.0.0.1:{port} after {timeout:.0f} s; see {RUN}/*.log")


if __name__ == "__main__":
    raise SystemExit(main())
