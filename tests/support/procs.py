"""Real cleanroom processes for integration tests: a controller, agents, fake VDI sessions and a wire tap.

Everything here is real: `cleanroom-controller run` and `cleanroom-agent run` are the installed console
scripts started as processes, enrolled through their own CLIs, talking over the real Mosquitto fixture.
State is read back through the controller's CLI (`agents list --json`, ...), as an operator would.

What is faked is only what this machine cannot have: a VDI client is a copy of /bin/sleep named like
one (psutil sees the copy's name), with a child `sleep` under it so that it is a process tree. Each fake
session lives under a small "session host" (a subreaper that reaps its descendants, as a desktop session
does), because PID 1 on this machine does not reap orphans and zombies would look like live processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiomqtt
import paho.mqtt.client as paho
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel

from cleanroom_protocol import (
    AgentState,
    Channel,
    Kind,
    Mode,
    Policy,
    PolicyRef,
    Posture,
    ProcessInfo,
    Status,
    agent_topic,
    policy_hash,
    public_key_pem,
    seal,
)
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
CLI_TIMEOUT_S = 30.0
LOG_TAIL_CHARS = 6000


def console_script(name: str) -> str:
    """The installed console script ``name`` (the workspace venv first, then PATH); fail loudly if absent."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `uv sync` in {REPO}")
    return found


def policy_toml(
    *,
    policy_id: str = "it-policy",
    version: int = 1,
    heartbeat_s: int = 1,
    max_offline_s: int = 60,
    clients: Sequence[str] = ("vdi-client",),
    deny: Sequence[str] = ("denied-tool",),
    end_grace_s: float = 1.0,
    actions: Sequence[str] = ("end_session",),
) -> str:
    """A small test policy: a fast heartbeat, one fake VDI client name and one denied process name."""
    return textwrap.dedent(
        f"""\
        id = "{policy_id}"
        version = {version}
        description = "integration test policy"
        [report]
        heartbeat_s = {heartbeat_s}
        max_offline_s = {max_offline_s}
        [sessions]
        clients = {json.dumps(list(clients))}
        end_grace_s = {end_grace_s}
        [processes]
        deny = {json.dumps(list(deny))}
        [on_violation]
        actions = {json.dumps(list(actions))}
        """
    )


PEM_BLOCK = re.compile(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----\n?", re.S)


def extract_pem(text: str, *, what: str) -> str:
    match = PEM_BLOCK.search(text)
    if match is None:
        raise AssertionError(f"{what} printed no PEM public key; output was:\n{text}")
    pem = match.group(0)
    return pem if pem.endswith("\n") else pem + "\n"


def run_cli(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one CLI command to completion; with ``check`` fail naming the command and its output."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"`{' '.join(argv)}` exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


def json_lines(text: str, *, what: str) -> list[dict[str, Any]]:
    """Parse ``--json`` output: one JSON object per line (blank lines ignored)."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{what}: line {number} is not JSON ({exc}): {line!r}") from exc
        if not isinstance(value, dict):
            raise AssertionError(f"{what}: line {number} is not a JSON object: {line!r}")
        rows.append(value)
    return rows


@dataclass
class Daemon:
    """One long-running process with its stdout/stderr captured to a log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"--- start: {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=self._log, env=self.env)

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self) -> None:
        if not self.alive:
            code = self.proc.returncode if self.proc else None
            raise AssertionError(f"{self.name} is not running (exit {code}); log:\n{self.log_tail()}")

    def signal(self, signum: int) -> None:
        self.assert_alive()
        os.kill(self.pid, signum)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, the broker delivers the Last Will."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (clean shutdown); SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        text = self.log_text()
        return text if len(text) <= chars else "[...]\n" + text[-chars:]


class Controller(Daemon):
    """`cleanroom-controller run` plus its read-side CLI on the same data dir."""

    def __init__(self, *, data_dir: Path, broker_url: str, policy: Path, extra: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.exe = console_script("cleanroom-controller")
        argv = [
            self.exe,
            "run",
            "--broker",
            broker_url,
            "--data-dir",
            str(data_dir),
            "--policy",
            str(policy),
            "--log-level",
            "debug",
            *extra,
        ]
        super().__init__("controller", argv, data_dir.parent / f"{data_dir.name}.log")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "controller.db"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli([self.exe, *args, "--data-dir", str(self.data_dir)], check=check)

    def identity_pem(self) -> str:
        return extract_pem(self.cli("identity").stdout, what="cleanroom-controller identity")

    def enrol(self, agent_id: str, public_key: Path) -> None:
        self.cli("agents", "add", agent_id, "--public-key", str(public_key))

    def agents(self) -> list[dict[str, Any]]:
        return json_lines(self.cli("agents", "list", "--json").stdout, what="agents list --json")

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        return next((a for a in self.agents() if a.get("id") == agent_id), None)

    def sessions(self) -> list[dict[str, Any]]:
        return json_lines(self.cli("sessions", "list", "--json").stdout, what="sessions list --json")

    def session(self, session_id: str) -> dict[str, Any] | None:
        return next((s for s in self.sessions() if s.get("id") == session_id), None)

    def events(self) -> list[dict[str, Any]]:
        return json_lines(self.cli("events", "list", "--json").stdout, what="events list --json")

    def audit_verify(self, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(
            [self.exe, "audit", "verify", "--data-dir", str(data_dir or self.data_dir)], check=False
        )

    def db_rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query on the live controller.db (a cheap pre-check; the CLI is the authority)."""
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, tuple(params))]
        finally:
            con.close()

    def db_gate(self, table: str, key_col: str, key: str, expected: dict[str, Any]) -> bool:
        """Does controller.db already show what we wait for? Polled before the (slow, ~1.5 s) CLI so that
        waits react fast; any surprise in the schema opens the gate and leaves the decision to the CLI."""
        try:
            rows = self.db_rows(f"SELECT * FROM {table} WHERE {key_col} = ?", (key,))  # noqa: S608
        except sqlite3.Error:
            return True
        if not rows:
            return False
        row = rows[0]
        for name, want in expected.items():
            if name not in row:
                continue
            got = row[name]
            if isinstance(want, bool) and got is not None:
                got = bool(got)
            if got != want:
                return False
        return True

    def snapshot_db(self, dest_dir: Path) -> Path:
        """A consistent copy of controller.db (WAL included, via SQLite's backup API) in ``dest_dir``."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        for item in self.data_dir.iterdir():
            if item.is_file() and not item.name.startswith("controller.db"):
                shutil.copy2(item, dest_dir / item.name)
        dest = dest_dir / "controller.db"
        src = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return dest


class Agent(Daemon):
    """`cleanroom-agent run` in its own data dir, enrolled with the controller and trusting its key."""

    def __init__(
        self,
        *,
        agent_id: str,
        data_dir: Path,
        broker_url: str,
        controller_key: Path,
        policy: Path,
        socket_path: Path,
        mode: str = "enforce",
        keepalive: float = 2,
        poll_interval: float = 0.2,
        enforcers: str = "",
        extra: Sequence[str] = (),
    ) -> None:
        self.agent_id = agent_id
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.exe = console_script("cleanroom-agent")
        argv = [
            self.exe,
            "run",
            "--broker",
            broker_url,
            "--data-dir",
            str(data_dir),
            "--id",
            agent_id,
            "--mode",
            mode,
            "--controller-key",
            str(controller_key),
            "--policy",
            str(policy),
            "--socket",
            str(socket_path),
            "--keepalive",
            f"{keepalive:g}",
            "--poll-interval",
            f"{poll_interval:g}",
            "--log-level",
            "debug",
            # Enforcers act on the whole machine (a fanotify exec listener, USB root hubs in /sys,
            # unmounting): only tests about them switch them on, the others see them reported `off`.
            "--enforcers",
            enforcers,
            *extra,
        ]
        super().__init__(f"agent {agent_id}", argv, data_dir.parent / f"{data_dir.name}.log")

    def identity_pem(self) -> str:
        done = run_cli([self.exe, "identity", "--data-dir", str(self.data_dir)])
        return extract_pem(done.stdout, what="cleanroom-agent identity")


# A session host: a subreaper (like a desktop session) that starts one fake client and reaps everything
# under it. The client is exec'd from a process that first forked a child `sleep`, so the client has a
# child: a real process tree. Prints {"client": pid, "child": pid|null} once the client is exec'd.
_SESSION_HOST = r"""
import ctypes, json, os, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
exe, with_child, args = sys.argv[1], sys.argv[2] == "1", sys.argv[3:] or ["3600"]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    child = 0
    if with_child:
        child = os.fork()
        if child == 0:
            os.execv("/bin/sleep", ["sleep", "3600"])
    os.write(w, str(child).encode())
    os.close(w)
    os.execv(exe, [exe, *args])
os.close(w)
child = int(os.read(r, 64) or b"0")
print(json.dumps({"client": pid, "child": child or None}), flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


@dataclass
class FakeProcess:
    """A process named like a VDI client or a denied program (a renamed copy of /bin/sleep)."""

    name: str
    host: subprocess.Popen[bytes]
    pid: int
    child: int | None
    session_id: str = ""  # the agent's id for it as a session: ``s-{pid}-{int(create_time*1000)}``

    def tree_pids(self) -> list[int]:
        return [self.pid] + ([self.child] if self.child else [])

    def live_pids(self) -> list[int]:
        """Pids of the tree still alive (a zombie counts as gone: it runs nothing)."""
        alive = []
        for pid in self.tree_pids():
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def end(self) -> None:
        """End the tree as a user closing the client would (SIGTERM), and reap it."""
        for pid in self.tree_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait_for(
            lambda: not self.live_pids(), timeout=10, what=f"{self.name} tree {self.tree_pids()} to exit"
        )

    def cleanup(self) -> None:
        for pid in self.tree_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            self.host.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.host.kill()
            self.host.wait(timeout=5)


def spawn_fake(
    bin_dir: Path,
    name: str,
    *,
    with_child: bool = True,
    program: str = "/bin/sleep",
    args: Sequence[str] = (),
) -> FakeProcess:
    """Start a renamed copy of ``program`` (/bin/sleep) called ``name`` (with a child ``sleep`` when
    ``with_child``), run with ``args`` (default: sleep's ``3600``)."""
    exe = bin_dir / name
    if not exe.exists():
        bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(program, exe)
    host = subprocess.Popen(
        [sys.executable, "-c", _SESSION_HOST, str(exe), "1" if with_child else "0", *args],
        stdout=subprocess.PIPE,
    )
    assert host.stdout is not None
    line = host.stdout.readline()
    if not line:
        raise AssertionError(f"session host for {name} exited {host.wait()} before starting it")
    pids = json.loads(line)
    fake = FakeProcess(name=name, host=host, pid=int(pids["client"]), child=pids["child"])

    def execd() -> bool:
        try:
            return psutil.Process(fake.pid).name() == name
        except psutil.NoSuchProcess:
            return False

    wait_for(execd, timeout=5, what=f"{name} (pid {fake.pid}) to be exec'd (refused by an exec enforcer?)")
    fake.session_id = f"s-{fake.pid}-{int(psutil.Process(fake.pid).create_time() * 1000)}"
    return fake


@dataclass
class Tapped:
    at: float  # time.monotonic() when received
    topic: str
    payload: bytes
    retain: bool

    def envelope(self) -> dict[str, Any]:
        value = json.loads(self.payload)
        assert isinstance(value, dict), f"{self.topic}: not a JSON object"
        return value


class WireTap:
    """A passive MQTT subscriber (paho, its own thread) recording every message on ``topic_filter``.

    It reconnects and resubscribes by itself after a broker restart.
    """

    def __init__(self, port: int, topic_filter: str = "cleanroom/v1/#") -> None:
        self.topic_filter = topic_filter
        self.messages: list[Tapped] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"it-tap-{os.getpid()}-{id(self)}")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise AssertionError(f"wire tap could not connect to 127.0.0.1:{port}")

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        client.subscribe(self.topic_filter, qos=1)
        self._connected.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._connected.clear()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Tapped(time.monotonic(), msg.topic, bytes(msg.payload), bool(msg.retain)))

    def wait_connected(self, timeout: float = 15) -> None:
        if not self._connected.wait(timeout):
            raise AssertionError("wire tap did not reconnect")

    def on(self, suffix: str) -> list[Tapped]:
        """Messages whose topic ends with ``suffix`` (e.g. ``"it-agent/posture"``), in arrival order."""
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish(
    port: int, messages: Sequence[tuple[str, bytes, bool]], *, client_id: str = "it-publisher"
) -> None:
    """Publish crafted ``(topic, payload, retain)`` messages with aiomqtt (QoS 1, in order, each PUBACKed)."""

    async def go() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=client_id) as client:
            for topic, payload, retain in messages:
                await client.publish(topic, payload, qos=1, retain=retain)

    asyncio.run(go())


@dataclass
class Cleanroom:
    """One test's world: a broker, a controller, agents and fake processes, all torn down at the end."""

    root: Path
    broker: Mosquitto
    policy_path: Path = field(init=False)
    controller_key: Path = field(init=False)
    controller: Controller | None = None
    agents: dict[str, Agent] = field(default_factory=dict)
    fakes: list[FakeProcess] = field(default_factory=list)
    taps: list[WireTap] = field(default_factory=list)
    _sock_dir: Path = field(init=False)
    # Names unique to this test: agents see every process on the machine, so a fixed name would let
    # tests running side by side (or leftovers) end or flag each other's processes.
    client_name: str = field(default_factory=lambda: f"vdi-{secrets.token_hex(4)}")
    denied_name: str = field(default_factory=lambda: f"denied-{secrets.token_hex(3)}")

    def __post_init__(self) -> None:
        self.policy_path = self.root / "policy.toml"
        self.controller_key = self.root / "controller.pub"
        # A Unix socket path must stay under 108 bytes; pytest's tmp_path can be longer.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="cr-it-"))

    def write_policy(self, **kwargs: Any) -> Path:
        """The test policy (see :func:`policy_toml`); clients and deny default to this test's names."""
        kwargs.setdefault("clients", [self.client_name])
        kwargs.setdefault("deny", [self.denied_name])
        self.policy_path.write_text(policy_toml(**kwargs))
        return self.policy_path

    def start_controller(self, *extra: str) -> Controller:
        if not self.policy_path.exists():
            self.write_policy()
        ctl = Controller(
            data_dir=self.root / "controller",
            broker_url=self.broker.url,
            policy=self.policy_path,
            extra=extra,
        )
        self.controller = ctl
        self.controller_key.write_text(ctl.identity_pem())
        ctl.start()
        return ctl

    def add_agent(
        self,
        agent_id: str = "it-agent",
        *,
        start: bool = True,
        mode: str = "enforce",
        keepalive: float = 2,
        enforcers: str = "",
        extra: Sequence[str] = (),
    ) -> Agent:
        """Create the agent's key (`identity`), enrol it (`agents add`) and start it."""
        assert self.controller is not None, "start the controller first"
        agent = Agent(
            agent_id=agent_id,
            data_dir=self.root / f"agent-{agent_id}",
            broker_url=self.broker.url,
            controller_key=self.controller_key,
            policy=self.policy_path,
            socket_path=self._sock_dir / f"{agent_id}.sock",
            mode=mode,
            keepalive=keepalive,
            enforcers=enforcers,
            extra=extra,
        )
        pub = self.root / f"{agent_id}.pub"
        pub.write_text(agent.identity_pem())
        self.controller.enrol(agent_id, pub)
        self.agents[agent_id] = agent
        if start:
            agent.start()
        return agent

    def spawn_client(self) -> FakeProcess:
        """A fake VDI client session (with a child process) under this test's client name."""
        return self.spawn(self.client_name)

    def spawn_denied(self) -> FakeProcess:
        """A running process the test policy denies (``processes.deny``)."""
        return self.spawn(self.denied_name, with_child=False)

    def spawn(
        self, name: str, *, with_child: bool = True, program: str = "/bin/sleep", args: Sequence[str] = ()
    ) -> FakeProcess:
        fake = spawn_fake(self.root / "bin", name, with_child=with_child, program=program, args=args)
        self.fakes.append(fake)
        return fake

    def tap(self, topic_filter: str = "cleanroom/v1/#") -> WireTap:
        tap = WireTap(self.broker.port, topic_filter)
        self.taps.append(tap)
        return tap

    # -- waiting on the controller's view -------------------------------------------------------------

    def wait_agent(self, agent_id: str, *, timeout: float, what: str, **expected: Any) -> dict[str, Any]:
        """Wait until `agents list --json` shows ``agent_id`` with every ``expected`` field value."""
        assert self.controller is not None
        ctl = self.controller
        return self._wait_row(
            ("endpoints", "agent", agent_id),
            lambda: ctl.agent(agent_id),
            lambda: f"`agents list` row for {agent_id} now: {ctl.agent(agent_id)}",
            timeout=timeout,
            what=what,
            expected=expected,
        )

    def wait_session(self, session_id: str, *, timeout: float, what: str, **expected: Any) -> dict[str, Any]:
        """Wait until `sessions list --json` shows ``session_id`` with every ``expected`` field value."""
        assert self.controller is not None
        ctl = self.controller
        return self._wait_row(
            ("sessions", "id", session_id),
            lambda: next((s for s in ctl.sessions() if s.get("id") == session_id), None),
            lambda: f"`sessions list` now: {ctl.sessions()}",
            timeout=timeout,
            what=what,
            expected=expected,
        )

    def _wait_row(
        self,
        gate: tuple[str, str, str],
        fetch: Callable[[], dict[str, Any] | None],
        describe: Callable[[], str],
        *,
        timeout: float,
        what: str,
        expected: dict[str, Any],
    ) -> dict[str, Any]:
        """Poll the cheap read-only DB gate, then confirm through the real CLI row from ``fetch``."""
        assert self.controller is not None
        ctl = self.controller
        table, column, key = gate

        def matches() -> dict[str, Any] | None:
            ctl.assert_alive()
            if not ctl.db_gate(table, column, key, expected):
                return None
            row = fetch()
            if row is not None and all(row.get(k) == v for k, v in expected.items()):
                return row
            return None

        try:
            found = wait_for(matches, timeout=timeout, what=what, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{describe()}") from None
        assert found is not None
        return found

    def close(self) -> None:
        for tap in self.taps:
            tap.close()
        for agent in self.agents.values():
            agent.stop()
        if self.controller is not None:
            self.controller.stop()
        for fake in self.fakes:
            fake.cleanup()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def print_logs(self) -> None:
        """Print every process's log tail; pytest shows it only when the test failed."""
        daemons: list[Daemon] = [*self.agents.values()]
        if self.controller is not None:
            daemons.insert(0, self.controller)
        for daemon in daemons:
            print(f"\n===== {daemon.name} log ({daemon.log_path}) =====\n{daemon.log_tail()}")
        broker_log = self.broker.workdir / "mosquitto.log"
        if broker_log.exists():
            print(f"\n===== mosquitto log =====\n{broker_log.read_text(errors='replace')[-2000:]}")


@contextlib.contextmanager
def cleanroom(tmp_path: Path, broker: Mosquitto) -> Iterator[Cleanroom]:
    world = Cleanroom(tmp_path / "cleanroom", broker)
    world.root.mkdir(parents=True, exist_ok=True)
    try:
        yield world
    finally:
        try:
            world.close()
        finally:
            world.print_logs()


def audit_table(con: sqlite3.Connection) -> str:
    """The controller's audit-chain table: the one with ``prev_hash`` and ``hash`` columns."""
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        cols = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
        if {"prev_hash", "hash", "kind"} <= cols:
            return str(table)
    raise AssertionError(f"no audit chain table (with prev_hash, hash, kind columns) among {tables}")


def audit_entries(db: Path) -> list[dict[str, Any]]:
    """Every audit entry in storage order, as column → value (read-only; the controller may be running)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        table = audit_table(con)
        rows = [dict(r) for r in con.execute(f"SELECT * FROM {table} ORDER BY id")]  # noqa: S608
    finally:
        con.close()
    for row in rows:
        if "data_json" not in row:
            row["data_json"] = str(row.get("data", ""))
    return rows


@dataclass
class SimulatedAgent:
    """An enrolled agent identity driven by the test: real Ed25519 key, real signed messages, no daemon.

    For crafting good and bad input to a running controller.
    """

    agent_id: str
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    seq: int = 0

    def public_pem(self) -> str:
        return public_key_pem(self.key)

    def topic(self, channel: Channel) -> str:
        return agent_topic(self.agent_id, channel)

    def seal(
        self, kind: Kind, body: BaseModel, *, seq: int | None = None, key: Ed25519PrivateKey | None = None
    ) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return seal(kind, body, sender=self.agent_id, seq=seq, key=key or self.key)

    def online(self) -> tuple[str, bytes, bool]:
        return (self.topic(Channel.STATUS), self.seal(Kind.STATUS, Status(state=AgentState.ONLINE)), True)

    def posture_body(self, policy: Policy, *, denied: Sequence[str] = ()) -> Posture:
        return simulated_posture(self.agent_id, policy, denied=denied)

    def posture(self, policy: Policy, *, denied: Sequence[str] = ()) -> tuple[str, bytes, bool]:
        return (
            self.topic(Channel.POSTURE),
            self.seal(Kind.POSTURE, self.posture_body(policy, denied=denied)),
            False,
        )


def simulated_posture(agent_id: str, policy: Policy, *, denied: Sequence[str] = ()) -> Posture:
    """A plausible posture of an endpoint running ``policy`` (compliant unless ``denied`` names run)."""
    return Posture(
        agent_id=agent_id,
        agent_version="0.1.0",
        mode=Mode.ENFORCE,
        policy=PolicyRef(id=policy.id, version=policy.version, hash=policy_hash(policy)),
        hostname=agent_id,
        os="Debian GNU/Linux 12",
        kernel="6.1.0",
        display_server="none",
        boot_time=time.time() - 3600,
        users=["clerk"],
        mounts=[],
        denied_processes=[ProcessInfo(name=n, pid=4000 + i, user="clerk") for i, n in enumerate(denied)],
        sessions=[],
        enforcers=[],
    )
