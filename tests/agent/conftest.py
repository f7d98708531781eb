"""Fixtures for agent tests: a controller key pair, a real `cleanroom-agent run` process and a wire tap.

The agent runs as a real subprocess (`python -m cleanroom_agent run`) against the real Mosquitto fixture;
the tap is a real MQTT client recording what reaches the broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel

from cleanroom_protocol import (
    POLICY_TOPIC,
    Channel,
    Command,
    CommandAction,
    Kind,
    Policy,
    PolicyDocument,
    Verdict,
    Watermark,
    agent_topic,
    load_private_key,
    policy_hash,
    public_key_pem,
    seal,
    verify,
)
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for

AGENT_ID = "ep-1"
# The agent sees every process on the machine: a client name unique to this test run keeps other tests'
# fake clients (and real ones) out of its sessions, and fail-closed from ending them. ≤ 15 chars (comm).
CLIENT = f"vdi-{secrets.token_hex(4)}"


@dataclass
class Controller:
    key: Ed25519PrivateKey
    public_key_file: Path
    seq: int = 1000

    def sign(
        self, kind: Kind, body: BaseModel, *, sender: str = "controller", seq: int | None = None
    ) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return seal(kind, body, sender=sender, seq=seq, key=self.key)

    def watermark(self, stored: list[tuple[int, int]], *, agent: str = AGENT_ID) -> bytes:
        high = max((last for _, last in stored), default=0)
        return self.sign(Kind.WATERMARK, Watermark(agent=agent, seq=high, stored=stored))

    def command(
        self,
        command_id: str,
        session_id: str | None = None,
        *,
        agent: str = AGENT_ID,
        nonce: str | None = None,
        expires_at: float | None = None,
    ) -> bytes:
        """A signed end_session for ``agent``, valid for a minute, with a fresh nonce unless given."""
        body = Command(
            id=command_id,
            action=CommandAction.END_SESSION,
            session_id=session_id,
            reason="test",
            agent=agent,
            nonce=nonce or secrets.token_hex(16),
            expires_at=time.time() + 60 if expires_at is None else expires_at,
        )
        return self.sign(Kind.COMMAND, body)

    def policy(self, policy: Policy) -> bytes:
        return self.sign(Kind.POLICY, PolicyDocument(policy=policy, hash=policy_hash(policy)))


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "controller.pub"
    pub.write_text(public_key_pem(key))
    return Controller(key, pub)


def policy_file(path: Path, version: int = 1, **sections: dict[str, Any]) -> Path:
    """A bootstrap policy. Its capture deny list is empty unless given: the agent under test runs the real
    enforcers, and a fanotify exec block is machine-wide (it would hit other tests running meanwhile)."""
    sections.setdefault("capture", {"deny": []})
    sections.setdefault("sessions", {"clients": [CLIENT]})
    lines = ['id = "test-policy"', f"version = {version}"]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def signed_policy(policy_id: str, version: int) -> Policy:
    """A policy for the controller to sign, with the same test-safe sections as :func:`policy_file`."""
    return Policy.model_validate(
        {"id": policy_id, "version": version, "sessions": {"clients": [CLIENT]}, "capture": {"deny": []}}
    )


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Tap:
    """A real MQTT client that records every message under the agent's topics (and re-subscribes on
    reconnect, so it survives a broker restart)."""

    broker: Mosquitto
    messages: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"tap-{os.getpid()}-{id(self)}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.connected = threading.Event()

    def _on_connect(self, client: paho.Client, *_: object) -> None:
        client.subscribe("cleanroom/v1/agents/#", qos=1)
        self.connected.set()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.broker.port, keepalive=5)
        self.client.loop_start()
        assert self.connected.wait(5), "tap did not connect"

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def on(self, channel: Channel, agent_id: str = AGENT_ID) -> list[Message]:
        topic = agent_topic(agent_id, channel)
        with self.lock:
            return [m for m in self.messages if m.topic == topic]

    def all(self) -> list[Message]:
        with self.lock:
            return list(self.messages)


@pytest.fixture
def tap(mosquitto: Mosquitto) -> Iterator[Tap]:
    t = Tap(mosquitto)
    t.start()
    yield t
    t.stop()


@dataclass
class AgentProcess:
    """`cleanroom-agent run` as a real process, with its data dir, socket and log in a temp dir."""

    workdir: Path
    broker_url: str
    controller: Controller
    mode: str = "enforce"
    policy: Path | None = None
    extra: list[str] = field(default_factory=list)
    socket_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "agent-data"

    @property
    def socket(self) -> Path:
        return self.socket_path or self.workdir / "agent.sock"

    @property
    def log(self) -> Path:
        return self.workdir / "agent.log"

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "cleanroom_agent", "run",
            "--broker", self.broker_url,
            "--data-dir", str(self.data_dir),
            "--id", AGENT_ID,
            "--mode", self.mode,
            "--controller-key", str(self.controller.public_key_file),
            "--socket", str(self.socket),
            "--keepalive", "2",
            "--poll-interval", "0.2",
            "--log-level", "debug",
            # the enforcers act on the whole machine; their own tests switch them on
            "--enforcers", "",
        ]  # fmt: skip
        if self.policy is not None:
            argv += ["--policy", str(self.policy)]
        return argv + self.extra

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log)
        wait_for(
            lambda: self.socket.exists() or self.proc.poll() is not None, timeout=15, what="agent socket"
        )  # type: ignore[union-attr]
        assert self.proc.poll() is None, f"agent exited with {self.proc.returncode}:\n{self.log.read_text()}"

    def public_key(self) -> Ed25519PublicKey:
        return load_private_key(self.data_dir / "agent.key").public_key()

    def verify(self, raw: bytes, **kw: Any) -> Verdict:
        pub = self.public_key()
        return verify(raw, public_key_for=lambda s: pub if s == AGENT_ID else None, **kw)

    def outbox_seqs(self) -> list[int]:
        """Rows not yet acknowledged by the broker (sent rows stay until a watermark lists them:
        :meth:`kept_seqs`)."""
        with contextlib.closing(
            sqlite3.connect(f"file:{self.data_dir / 'agent.db'}?mode=ro", uri=True)
        ) as db:
            return [
                int(r[0]) for r in db.execute("SELECT seq FROM outbox WHERE sent_at IS NULL ORDER BY seq")
            ]

    def kept_seqs(self) -> list[int]:
        """Every row the spool keeps: unsent, and sent but not yet listed by a controller watermark."""
        with contextlib.closing(
            sqlite3.connect(f"file:{self.data_dir / 'agent.db'}?mode=ro", uri=True)
        ) as db:
            return [int(r[0]) for r in db.execute("SELECT seq FROM outbox ORDER BY seq")]

    def outbox_events(self) -> list[dict[str, Any]]:
        with contextlib.closing(
            sqlite3.connect(f"file:{self.data_dir / 'agent.db'}?mode=ro", uri=True)
        ) as db:
            rows = db.execute(
                "SELECT payload FROM outbox WHERE topic LIKE '%/events' AND sent_at IS NULL ORDER BY seq"
            ).fetchall()
        return [json.loads(r[0])["body"] for r in rows]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"agent did not stop on signal {sig}:\n{self.log.read_text()[-3000:]}"
            ) from None


@pytest.fixture
def agent_factory(tmp_path: Path, controller: Controller) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def make(broker_url: str, **kw: Any) -> AgentProcess:
        workdir = tmp_path / f"agent{len(started)}"
        workdir.mkdir()
        if "policy" not in kw:
            kw["policy"] = policy_file(workdir / "policy.toml")
        agent = AgentProcess(workdir, broker_url, controller, **kw)
        started.append(agent)
        return agent

    yield make
    for agent in started:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


def events(tap: Tap, agent: AgentProcess, kind: str | None = None) -> list[dict[str, Any]]:
    """Verified event bodies that reached the broker, optionally of one kind."""
    out = []
    for m in tap.on(Channel.EVENTS):
        verdict = agent.verify(m.payload, expected_kind=Kind.EVENT)
        assert verdict.ok, verdict
        body = verdict.envelope.body  # type: ignore[union-attr]
        if kind is None or body["kind"] == kind:
            out.append(body)
    return out


@dataclass
class FakeClients:
    """VDI clients for tests: /bin/bash copied under a client's name (the kernel reports the copy's name),
    so a "client" can start a tree of children."""

    directory: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def binary(self, name: str) -> Path:
        path = self.directory / name
        if not path.exists():
            shutil.copy("/bin/bash", path)
        return path

    def start(self, name: str = CLIENT, script: str = "sleep 60 & sleep 60; true") -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([str(self.binary(name)), "-c", script])
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(p.pid).children(recursive=True):
                        child.kill()
                p.kill()
            p.wait()


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[FakeClients]:
    d = tmp_path / "bin"
    d.mkdir()
    fc = FakeClients(d)
    yield fc
    fc.cleanup()


__all__ = ["AGENT_ID", "CLIENT", "POLICY_TOPIC"]
