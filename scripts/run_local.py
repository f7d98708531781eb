#!/usr/bin/env python3
"""`make run`: a broker, the controller and one local agent in audit mode, live in this terminal.

Evaluation set-up on embedded defaults: everything lives under .run/ in the checkout, the broker listens on
127.0.0.1 only. Mosquitto is used when installed; otherwise the controller embeds an amqtt broker (for
evaluation only: no shared subscriptions, no enforced client certificates). Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
BIN = Path(sys.executable).parent
POLICY = ROOT / "policies" / "offshore-billing.toml"


def main() -> int:
    RUN.mkdir(exist_ok=True)
    controller_dir, agent_dir = RUN / "controller", RUN / "agent"
    agent_id = _agent_id()
    port = _port()
    broker_url = f"mqtt://127.0.0.1:{port}"

    controller_pub = RUN / "controller.pub"
    agent_pub = RUN / "agent.pub"
    controller_pub.write_text(_cli("cleanroom-controller", "identity", "--data-dir", str(controller_dir)))
    agent_pub.write_text(_cli("cleanroom-agent", "identity", "--data-dir", str(agent_dir)))
    _cli(
        "cleanroom-controller", "agents", "add", agent_id,
        "--public-key", str(agent_pub), "--data-dir", str(controller_dir),
    )  # fmt: skip

    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    mosquitto = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if os.environ.get("CLEANROOM_RUN_BROKER") == "embedded":  # the evaluation broker, Mosquitto or not
        mosquitto = None
    controller_args = [
        str(BIN / "cleanroom-controller"), "run", "--broker", broker_url,
        "--data-dir", str(controller_dir), "--policy", str(POLICY),
    ]  # fmt: skip
    try:
        if mosquitto:
            conf = RUN / "mosquitto.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                + ("user root\n" if os.geteuid() == 0 else "")
            )
            procs.append(("mosquitto", _start([mosquitto, "-c", str(conf)], "mosquitto")))
            broker_note = f"Mosquitto ({mosquitto}) on 127.0.0.1:{port}"
        else:
            controller_args.append("--embedded-broker")
            broker_note = (
                f"embedded amqtt broker on 127.0.0.1:{port} — FOR EVALUATION ONLY "
                "(install mosquitto for anything real)"
            )
        procs.append(("controller", _start(controller_args, "controller")))
        _wait_port(port, procs)
        agent_args = [
            str(BIN / "cleanroom-agent"), "run", "--broker", broker_url, "--data-dir", str(agent_dir),
            "--id", agent_id, "--mode", "audit", "--controller-key", str(controller_pub),
            "--socket", str(RUN / "agent.sock"), "--policy", str(POLICY),
        ]  # fmt: skip
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


def _port() -> int:
    wanted = int(os.environ.get("CLEANROOM_RUN_PORT", "1883"))
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
