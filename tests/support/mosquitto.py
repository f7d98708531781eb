"""A real Mosquitto on a free loopback port, started in the foreground and stopped by PID: with a plain,
anonymous test configuration, or from a given configuration file (e.g. what `broker-config` writes)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if path is None:
        raise RuntimeError(
            "mosquitto is not installed: these tests need a real broker (apt-get install mosquitto; .ci/run does it)"
        )
    return path


@dataclass
class Mosquitto:
    """One broker process. ``stop()``/``start()`` again keep the port, so clients can reconnect."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # Start from this file as it is (its listener must be on ``port``, on 127.0.0.1); None: the plain,
    # anonymous test configuration written into ``workdir``.
    config: Path | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.config is not None else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration, ACL and CRL (for new connections)."""
        assert self.proc is not None and self.proc.poll() is None, "mosquitto is not running"
        os.kill(self.proc.pid, signal.SIGHUP)

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.config or self._write_test_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}; see {self.log_path}:\n{self.log_text()[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def _write_test_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        # Mosquitto started as root drops to the `mosquitto` user; `user root` keeps it able to write here.
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # persistence: a restart must keep the controller's persistent session (clean_session=False)
            # and its queued QoS 1 messages, as a production broker does.
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_inflight_messages 100\n"
            "max_queued_messages 100000\n"
            "set_tcp_nodelay true\n" + ("user root\n" if os.geteuid() == 0 else "")
        )
        return conf

    def forget_sessions(self) -> None:
        """Delete the stopped broker's persistence file: it restarts with no sessions, subscriptions or
        queued messages (as a replaced broker would)."""
        assert self.proc is None, "stop the broker first"
        (self.workdir / "mosquitto.db").unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
