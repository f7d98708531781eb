#!/usr/bin/env python3
"""Ingest benchmark: how many signed reports per second the controller verifies and stores, how fast it
ends a session after a violation, and how both compare with what Mosquitto itself moves on loopback.

Everything is real and on 127.0.0.1 only: a Mosquitto of our own on a free port, N simulated agents with
real Ed25519 keys enrolled in a fresh controller data dir, real signed Posture messages, K real
`cleanroom-controller run` processes (a shared subscription when K > 1). Four measurements, one run:

(a) ceiling: Mosquitto's loopback rate with its C clients (``mosquitto_pub -l`` publishers → one
    ``mosquitto_sub``), QoS 1 end to end, payloads the size of a posture;
(b) sustained verified reports/s: the N agents' pre-signed postures are pushed at full rate by
    ``mosquitto_pub -l`` processes (one per agent, so per-agent order holds); the rate is what the
    controllers recorded as accepted in controller.db (``messages`` rows per second of receive time);
(c) decision latency: at a paced background load of ``--latency-rate`` reports/s (a Python paho
    publisher), a victim agent publishes a violating posture carrying a running session; latency is until
    its signed ``end_session`` command arrives on its commands topic (measured in one process, one clock);
(d) isolation: one enrolled device floods ``--flood-messages`` (100,000) junk messages (forgeries, garbage,
    envelopes claiming another agent) at full speed and paced (``--flood-rates``, default 0,10000), while
    other devices report
    violations: their decision latency, how fast the junk is counted, and how many audit rows it wrote;
(e) mTLS off vs on: the same N agents push the same pre-signed postures (``--mtls-messages``) through
    (1) a plain anonymous Mosquitto as in (a)-(d) and (2) a Mosquitto started from ``broker-config``
    (TLS 1.2+, client certificates, CRL, ACL) with a PKI from ``Pki.init``: every simulated agent connects
    with its own client certificate (CN = its agent id), each controller with its own; verified reports/s
    of both, their ratio, and each broker's raw ceiling (mosquitto_pub → mosquitto_sub, with and without
    ``--cafile --cert --key``). Each half has a fresh broker and a fresh controller data dir.

Prints N, K, durations, rates, p50/p99 and the controllers' CPU and RSS (psutil). Aims, not assertions:
≥ 10,000 verified reports/s on a 2-core machine; decision p99 ≤ 100 ms at 1,000 reports/s, and while one
device floods.

    uv run python bench/ingest.py [--agents 100] [--controllers 2] [--messages 40000] ...
    uv run python bench/ingest.py --only mtls          # one section (or --skip SECTION, repeatable)
    uv run python bench/ingest.py --database postgres --controllers 1   # a private PostgreSQL (fsync on)

(b) also prints the Ed25519 verify-only ceiling of the K cores used, measured in the same run, and the ratio.
Issue 9's audit figures (audit bytes per routine heartbeat, ``audit verify`` entries/s) are bench/audit.py's.
``--profile DIR`` runs each controller under cProfile (DIR/controller-N.prof); ``--inflight N`` sets the bench
broker's ``max_inflight_messages`` (100 as shipped; 1,000 and 0 measured no different: Mosquitto 2.0.11
sends a window more per PUBACK, docs/data-path.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from cleanroom_protocol import (
    AgentState,
    Channel,
    Event,
    Kind,
    Mode,
    Policy,
    PolicyRef,
    Posture,
    ProcessInfo,
    SessionInfo,
    Status,
    agent_filter,
    agent_topic,
    fingerprint,
    parse_policy,
    policy_hash,
    public_key_pem,
    seal,
    tls_context,
)

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["ceiling", "ingest", "latency", "flood", "mtls"]  # (a)-(e)
POLICY = """\
id = "bench"
version = 1
[report]
heartbeat_s = 60
max_offline_s = 600
[sessions]
clients = ["xfreerdp"]
[processes]
deny = ["anydesk"]
[on_violation]
actions = ["end_session"]
"""


# -- small utilities ------------------------------------------------------------------------------------


# --database: "sqlite" (the controller's default file in its data dir) or "postgres" (a private PostgreSQL
# server started by this run, tests/support/postgres.py, fsync on; one fresh database per controller data dir).
DATABASE = "sqlite"
_postgres: Any = None
_pg_urls: dict[Path, str] = {}
# --profile DIR: each controller process runs under cProfile and writes DIR/controller-<n>.prof when it stops
# (SIGTERM ends it cleanly), for finding where ingest's time goes (`python -m pstats FILE`).
PROFILE: Path | None = None
INFLIGHT = 100  # --inflight: the bench broker's max_inflight_messages
_profiled = 0


def database_url(data_dir: Path) -> str | None:
    """The ``--database`` URL for the controllers of ``data_dir`` (None: SQLite in it)."""
    if DATABASE == "sqlite":
        return None
    key = data_dir.resolve()
    if key not in _pg_urls:
        _pg_urls[key] = _postgres.create_database(f"bench{len(_pg_urls) + 1}")
    return _pg_urls[key]


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read the store of ``db``'s data dir (``controller.db``, or its PostgreSQL database) read-only."""
    url = database_url(db.parent)
    if url is None:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return [tuple(r) for r in con.execute(sql, params).fetchall()]
        finally:
            con.close()
    import psycopg

    from cleanroom_controller.store.postgres import to_pyformat

    with psycopg.connect(url, autocommit=True) as pg:
        return [tuple(r) for r in pg.execute(to_pyformat(sql), list(params)).fetchall()]  # type: ignore[arg-type]


def store_exists(data_dir: Path) -> bool:
    return database_url(data_dir) is not None or (data_dir / "controller.db").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        sys.exit(f"bench/ingest.py needs {tool} (apt-get install mosquitto mosquitto-clients)")
    return path


def controller_exe() -> str | None:
    exe = REPO / ".venv" / "bin" / "cleanroom-controller"
    found = str(exe) if exe.exists() else shutil.which("cleanroom-controller")
    if found is None:
        return None
    probe = subprocess.run([found, "--help"], capture_output=True, text=True, check=False, timeout=60)
    return found if probe.returncode == 0 else None


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_until(cond: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class BenchPki:
    """A controller site's PKI as ``pki init`` makes it (CA, broker certificate, the controller's client
    certificate), one more controller certificate per extra controller process (``pki issue-controller``:
    with ``use_username_as_clientid`` two processes on one certificate would take each other's connection
    over) and one for the ceiling's reader; plus a client certificate per simulated agent, CN = its agent
    id, as enrolment issues it. Client keys are written 0600 (mosquitto_pub reads them from a file)."""

    CEILING_READER = "bench-ceiling"

    def __init__(self, home: Path, controllers: int) -> None:
        from cleanroom_controller.trust import Pki

        self.pki = Pki.init(home)
        self.controller_names = [self.pki.controller_id, *(f"controller-{i}" for i in range(1, controllers))]
        for name in [*self.controller_names[1:], self.CEILING_READER]:
            self.pki.issue_controller(name)
        self.clients_dir = home / "clients"
        self.clients_dir.mkdir(mode=0o700)
        self._clients: dict[str, tuple[Path, Path]] = {}

    @property
    def ca(self) -> Path:
        return self.pki.ca_cert_path

    def controller(self, i: int) -> tuple[Path, Path]:
        """(certificate, key) of controller process ``i``."""
        return self.pki.controller_paths(self.controller_names[i])

    def ceiling_reader(self) -> tuple[Path, Path]:
        return self.pki.controller_paths(self.CEILING_READER)

    def client(self, common_name: str) -> tuple[Path, Path]:
        """(certificate, key) of the device ``common_name``, issued on first use."""
        if common_name not in self._clients:
            key, cert = self.pki.issue_client_key(common_name)
            key_path = self.clients_dir / f"{common_name}.key"
            with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(key)
            cert_path = key_path.with_suffix(".crt")
            cert_path.write_bytes(cert)
            self._clients[common_name] = (cert_path, key_path)
        return self._clients[common_name]


@dataclass
class Broker:
    """One Mosquitto on 127.0.0.1: the bench's plain, anonymous configuration, or (``config`` and ``pki``
    given) one written by ``broker-config``, which admits only clients with a certificate from ``pki``."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    config: Path | None = None
    pki: BenchPki | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.pki is not None else 'mqtt'}://127.0.0.1:{self.port}"

    def client_args(self, common_name: str) -> list[str]:
        """How mosquitto_pub/mosquitto_sub reach this broker as ``common_name`` (its certificate's CN;
        ignored by the plain broker)."""
        args = ["-h", "127.0.0.1", "-p", str(self.port)]
        if self.pki is not None:
            cert, key = (
                self.pki.ceiling_reader()
                if common_name == BenchPki.CEILING_READER
                else self.pki.client(common_name)
            )
            args += ["--cafile", str(self.pki.ca), "--cert", str(cert), "--key", str(key)]
        return args

    def tls(self, common_name: str) -> ssl.SSLContext | None:
        """A Python client's TLS context as ``common_name``; None for the plain broker."""
        if self.pki is None:
            return None
        return tls_context(self.pki.ca, *self.pki.client(common_name))

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.config or self._plain_config()
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([need("mosquitto"), "-c", str(conf)], stdout=log, stderr=log)

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited {self.proc.returncode}; see {self.workdir}/mosquitto.log"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(listening, 10, f"mosquitto on port {self.port}")

    def _plain_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_inflight_messages {INFLIGHT}\nmax_queued_messages 2000000\nmax_queued_bytes 0\n"
            # each packet at once, as a production broker should: without it an idle link adds ~40 ms
            # (Nagle + the peer's delayed ACK) to every decision
            "set_tcp_nodelay true\n" + ("user root\n" if os.geteuid() == 0 else "")
        )
        return conf

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Usage:
    """CPU seconds and peak RSS of a set of processes over a phase (psutil, sampled every 0.2 s)."""

    def __init__(self, pids: Sequence[int], label: str = "controllers") -> None:
        self.label = label
        self.procs = [psutil.Process(p) for p in pids]
        self.cpu0 = [self._cpu(p) for p in self.procs]
        self.t0 = time.monotonic()
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            rss = 0
            for p in self.procs:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)

    def finish(self) -> str:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self.t0
        cpu = sum(self._cpu(p) - c0 for p, c0 in zip(self.procs, self.cpu0, strict=True))
        return f"{self.label} CPU {cpu:.1f} s over {wall:.1f} s ({100 * cpu / wall:.0f}% of one core), peak RSS {self.peak_rss / 2**20:.0f} MiB total"


# -- simulated agents -----------------------------------------------------------------------------------


@dataclass
class SimAgent:
    agent_id: str
    key_pem: bytes  # private key, PKCS8 PEM (picklable for worker processes)
    seq: int = 0

    @classmethod
    def create(cls, agent_id: str) -> SimAgent:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(agent_id, pem)

    def key(self) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def posture(
    agent_id: str, policy: Policy, *, denied: Sequence[str] = (), session: str | None = None
) -> Posture:
    sessions = []
    if session is not None:
        sessions = [
            SessionInfo(id=session, client="xfreerdp", pid=4242, pids=[4242, 4243], started=time.time() - 60)
        ]
    return Posture(
        agent_id=agent_id,
        agent_version="0.1.0",
        mode=Mode.ENFORCE,
        policy=PolicyRef(id=policy.id, version=policy.version, hash=policy_hash(policy)),
        hostname=agent_id,
        os="Debian GNU/Linux 12 (bookworm)",
        kernel="6.1.0-26-amd64",
        display_server="x11",
        boot_time=time.time() - 7200,
        users=["clerk"],
        mounts=[],
        denied_processes=[ProcessInfo(name=n, pid=5000 + i, user="clerk") for i, n in enumerate(denied)],
        sessions=sessions,
        enforcers=[],
    )


def sign_batch(job: tuple[list[tuple[str, bytes, int]], int, str, Path]) -> int:
    """Worker: sign ``count`` postures per agent into one line file per agent. Returns messages written."""
    agents, count, policy_text, outdir = job
    policy = parse_policy(policy_text)
    written = 0
    for agent_id, key_pem, first_seq in agents:
        key = serialization.load_pem_private_key(key_pem, password=None)
        assert isinstance(key, Ed25519PrivateKey)
        body = posture(agent_id, policy)
        with (outdir / f"{agent_id}.lines").open("wb") as f:
            for i in range(count):
                f.write(seal(Kind.POSTURE, body, sender=agent_id, seq=first_seq + i, key=key) + b"\n")
                written += 1
    return written


# -- controller side ------------------------------------------------------------------------------------


def enrol_all(data_dir: Path, exe: str, agents: Sequence[SimAgent]) -> None:
    """Create the controller key and enrol every agent. Bulk enrolment goes through the controller's own
    Store (``agents add`` per agent would start one CLI process each); one agent also goes through the CLI."""
    subprocess.run(
        [exe, "identity", "--data-dir", str(data_dir)], capture_output=True, check=True, timeout=60
    )
    first, rest = agents[0], agents[1:]
    pub = data_dir.parent / f"{first.agent_id}.pub"
    pub.write_text(public_key_pem(first.key()))
    url = database_url(data_dir)
    subprocess.run(
        [exe, "agents", "add", first.agent_id, "--public-key", str(pub), "--data-dir", str(data_dir)],
        capture_output=True,
        check=True,
        timeout=60,
        env={**os.environ, **({"CLEANROOM_DATABASE": url} if url else {})},
    )
    from cleanroom_controller.store import Store

    store = Store.open(data_dir, url)
    try:
        now = time.time()
        for agent in rest:
            key = agent.key()
            store.add_agent(agent.agent_id, public_key_pem(key), fingerprint(key), now)
    finally:
        store.close()


def accepted_count(
    db: Path, kind: str = "posture", prefix: str = ""
) -> tuple[int, float | None, float | None]:
    (row,) = query(
        db,
        "SELECT COUNT(*), MIN(received), MAX(received) FROM messages WHERE kind = ? AND agent LIKE ?",
        (kind, prefix + "%"),
    )
    return int(row[0]), row[1], row[2]


def received_times(db: Path, prefix: str) -> list[float]:
    rows = query(
        db,
        "SELECT received FROM messages WHERE kind = 'posture' AND agent LIKE ? ORDER BY received",
        (prefix + "%",),
    )
    return [float(r[0]) for r in rows]


def reject_total(db: Path) -> int:
    return int(query(db, "SELECT COALESCE(SUM(count), 0) FROM rejects")[0][0])


@contextlib.contextmanager
def controllers(
    exe: str, k: int, *, data_dir: Path, broker: Broker, policy: Path, share_group: bool, logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    global _profiled
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(k):
            prefix: list[str] = []
            if PROFILE is not None:
                _profiled += 1
                out = PROFILE / f"controller-{_profiled}.prof"
                prefix = [sys.executable, "-m", "cProfile", "-o", str(out)]
            argv = [
                *prefix,
                exe,
                "run",
                "--broker",
                broker.url,
                "--data-dir",
                str(data_dir),
                "--policy",
                str(policy),
                "--log-level",
                "warning",
            ]
            if share_group:
                argv += ["--share-group", "bench"]
            url = database_url(data_dir)
            if url is not None:
                argv += ["--database", url]
            if broker.pki is not None:  # its own certificate: the broker takes the client id from its CN
                cert, key = broker.pki.controller(i)
                argv += ["--tls-ca", str(broker.pki.ca), "--tls-cert", str(cert), "--tls-key", str(key)]
            log = (logs / f"controller-{i}.log").open("ab")
            # A stable client id per process (persistent session), as a production group would use; without
            # it a share-group member takes a pid-derived id and a clean session.
            env = {**os.environ, "CLEANROOM_CLIENT_ID": f"cleanroom-bench-{i}"}
            procs.append(subprocess.Popen(argv, stdout=log, stderr=log, env=env))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def connected_to(pid: int, port: int) -> bool:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in conns)


class Publisher:
    """A paho client on its own network thread (QoS 1); through an mTLS broker, as the device
    ``common_name`` (its certificate; the broker makes the CN its client id)."""

    def __init__(self, broker: Broker, client_id: str, common_name: str | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        ctx = broker.tls(common_name or client_id)
        if ctx is not None:
            self.client.tls_set_context(ctx)
        self.client.connect("127.0.0.1", broker.port, keepalive=60)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- the three measurements -----------------------------------------------------------------------------


def measure_ceiling(
    broker: Broker, tmp: Path, *, messages: int, publishers: int, size: int, as_agents: bool = False
) -> tuple[float, int]:
    """Messages/s from ``publishers`` mosquitto_pub -l processes to one mosquitto_sub (QoS 1 both ways).

    ``as_agents``: publisher i is the device ``ceiling-i`` on its own posture topic and the reader is a
    controller on ``cleanroom/v1/agents/+/posture``, which is what an mTLS broker's ACL lets through (else
    ``bench/ceiling/i`` → ``bench/ceiling/#``). Counts what the subscriber printed; returns (rate, received).
    Stops when all arrived or nothing arrived for 5 s (a lost message must not hang the bench)."""
    line = json.dumps({"pad": "x" * max(0, size - 12)}) + "\n"
    per = messages // publishers
    total = per * publishers
    data = tmp / "ceiling.lines"
    data.write_text(line * per)
    names = [f"ceiling-{i}" for i in range(publishers)]
    topics = [
        agent_topic(n, Channel.POSTURE) if as_agents else f"bench/ceiling/{i}" for i, n in enumerate(names)
    ]
    sub = subprocess.Popen(
        [
            need("mosquitto_sub"),
            *broker.client_args(BenchPki.CEILING_READER),
            "-t",
            agent_filter(Channel.POSTURE) if as_agents else "bench/ceiling/#",
            "-q",
            "1",
        ],
        stdout=subprocess.PIPE,
    )
    assert sub.stdout is not None
    fd = sub.stdout.fileno()
    count = [0, time.monotonic()]

    def read() -> None:
        while chunk := os.read(fd, 1 << 16):
            count[0] += chunk.count(b"\n")
            count[1] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Subscribed once a marker gets through (mosquitto_sub says nothing about its SUBACK without -d).
    deadline = time.monotonic() + 15
    while count[0] == 0:
        if time.monotonic() > deadline or sub.poll() is not None:
            sub.kill()
            raise RuntimeError(f"mosquitto_sub on {broker.url} received no marker within 15 s")
        marker = [
            need("mosquitto_pub"),
            *broker.client_args(names[0]),
            "-t",
            topics[0],
            "-q",
            "1",
            "-m",
            "ready",
        ]
        subprocess.run(marker, check=True, timeout=10, capture_output=True)
        with contextlib.suppress(RuntimeError):
            wait_until(lambda: count[0] > 0, 0.5, "marker")
    base = count[0]
    t0 = time.monotonic()
    pubs = []
    for name, topic in zip(names, topics, strict=True):
        with data.open("rb") as f:
            pubs.append(
                subprocess.Popen(
                    [need("mosquitto_pub"), *broker.client_args(name), "-t", topic, "-q", "1", "-l"],
                    stdin=f,
                )
            )
    for p in pubs:
        p.wait(600)
    while count[0] - base < total and time.monotonic() - float(count[1]) < 5:
        time.sleep(0.05)
    elapsed = float(count[1]) - t0
    received = int(count[0] - base)
    sub.terminate()
    sub.wait(10)
    return received / elapsed, received


def await_ready(broker: Broker, data_dir: Path, probe: SimAgent, timeout: float = 60) -> None:
    """The controllers listen once a probe posture (an agent outside the load; a fresh seq each try) is
    stored; then 1 s more so that every member of the shared subscription has subscribed."""
    pub = Publisher(broker, f"bench-probe-{probe.seq}", probe.agent_id)
    pol = parse_policy(POLICY)
    key = probe.key()
    start = (
        accepted_count(data_dir / "controller.db", prefix=probe.agent_id)[0] if store_exists(data_dir) else 0
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            seq = probe.next_seq()
            pub.send(
                agent_topic(probe.agent_id, Channel.POSTURE),
                seal(Kind.POSTURE, posture(probe.agent_id, pol), sender=probe.agent_id, seq=seq, key=key),
            )
            with contextlib.suppress(RuntimeError):
                wait_until(
                    lambda: accepted_count(data_dir / "controller.db", prefix=probe.agent_id)[0] > start,
                    1.0,
                    "probe",
                )
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the controllers stored no probe posture within {timeout:.0f} s")
    finally:
        pub.close()
    time.sleep(1.0)


def sign_postures(agents: list[SimAgent], per_agent: int, signers: int, lines_dir: Path) -> int:
    """``per_agent`` signed postures per agent, one line file each (``{agent id}.lines``), signed by
    ``signers`` processes; the agents' seqs move past them. Returns how many were signed."""
    lines_dir.mkdir()
    print(f"    signing {len(agents)} × {per_agent} postures with {signers} processes ...", flush=True)
    t0 = time.monotonic()
    jobs = []
    for i in range(signers):
        chunk = [(a.agent_id, a.key_pem, a.seq + 1) for a in agents[i::signers]]
        jobs.append((chunk, per_agent, POLICY, lines_dir))
    with multiprocessing.get_context("spawn").Pool(signers) as pool:
        signed = sum(pool.map(sign_batch, jobs))
    for a in agents:
        a.seq += per_agent
    sign_s = time.monotonic() - t0
    print(f"    signed {signed} in {sign_s:.1f} s ({signed / sign_s:,.0f}/s, Ed25519 + canonical JSON)")
    return signed


@dataclass
class IngestResult:
    signed: int
    stored: int  # accepted postures in controller.db
    rejects: int  # rejects counted meanwhile (none expected: every posture is valid and in order)
    published_s: float  # until the last mosquitto_pub exited
    wall_s: float  # from the first publish until the controllers caught up (or stopped progressing)
    overall: float  # stored / (last receive time - first), the sustained verified reports/s
    middle: float  # the same over the middle 80% of receive times (no ramp-up, no tail)
    usage: str  # the controllers' CPU and RSS
    broker_usage: str  # Mosquitto's
    publishers_cpu: float  # CPU seconds of the mosquitto_pub processes
    alive: tuple[int, int]  # controllers alive afterwards, of K


def run_ingest(
    *,
    exe: str,
    broker: Broker,
    data_dir: Path,
    policy: Path,
    logs: Path,
    agents: list[SimAgent],
    lines_dir: Path,
    signed: int,
    probe: SimAgent,
    k: int,
    share: bool,
    max_wait: float,
) -> IngestResult:
    """K controllers on ``data_dir``; then every agent's line file at full rate, one ``mosquitto_pub -l``
    per agent (per-agent order holds; through an mTLS broker each with the agent's own certificate);
    returns what the controllers stored as accepted and how fast."""
    db = data_dir / "controller.db"
    with controllers(
        exe, k, data_dir=data_dir, broker=broker, policy=policy, share_group=share, logs=logs
    ) as procs:
        for p in procs:
            wait_until(
                lambda p=p: connected_to(p.pid, broker.port) or p.poll() is not None, 30, "controller connect"
            )
            if p.poll() is not None:
                raise RuntimeError(f"controller exited {p.returncode}; see {logs}/controller-*.log")
        await_ready(broker, data_dir, probe)
        base, _, _ = accepted_count(db, prefix="agent-")
        usage = Usage([p.pid for p in procs])
        assert broker.proc is not None
        broker_usage = Usage([broker.proc.pid], "Mosquitto")
        reaped0 = os.times()
        t_pub = time.monotonic()
        pubs = []
        for a in agents:
            with (lines_dir / f"{a.agent_id}.lines").open("rb") as f:
                pubs.append(
                    subprocess.Popen(
                        [
                            need("mosquitto_pub"),
                            *broker.client_args(a.agent_id),
                            "-q",
                            "1",
                            "-t",
                            agent_topic(a.agent_id, Channel.POSTURE),
                            "-l",
                        ],
                        stdin=f,
                    )
                )
        for p in pubs:
            p.wait(600)
        pub_s = time.monotonic() - t_pub
        reaped = os.times()  # the publishers are the only children reaped meanwhile
        pub_cpu = (
            reaped.children_user + reaped.children_system - reaped0.children_user - reaped0.children_system
        )
        # Wait until the controllers have caught up or stop making progress.
        # Progress is accepted + rejected (with K > 1 a lagging process may reject for a while).
        last, last_change = -1, time.monotonic()
        deadline = t_pub + max_wait
        rejects0 = reject_total(db)
        while time.monotonic() < deadline:
            n, _, _ = accepted_count(db, prefix="agent-")
            done = n - base + reject_total(db) - rejects0
            if done >= signed:
                break
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > 5:
                print(f"    no progress for 5 s at {done} of {signed} processed: giving up waiting")
                break
            time.sleep(0.5)
        wall = time.monotonic() - t_pub
        usage_line = usage.finish()
        broker_line = broker_usage.finish()
        stored = accepted_count(db, prefix="agent-")[0] - base
        times = received_times(db, "agent-")[base:]
        rejects = reject_total(db) - rejects0
        overall = middle = float("nan")
        if len(times) > 10:
            span = times[-1] - times[0]
            overall = stored / span if span > 0 else float("nan")
            lo, hi = times[len(times) // 10], times[(len(times) * 9) // 10]
            middle = (len(times) * 8 // 10) / (hi - lo) if hi > lo else float("nan")
        alive = sum(p.poll() is None for p in procs)
        return IngestResult(
            signed,
            stored,
            rejects,
            pub_s,
            wall,
            overall,
            middle,
            usage_line,
            broker_line,
            pub_cpu,
            (alive, len(procs)),
        )


def _verify_loop(job: tuple[bytes, bytes, float]) -> int:
    """Ed25519 verifications of one signature over ``message`` for ``seconds`` (one process, one core)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw_key, message, seconds = job
    key = Ed25519PublicKey.from_public_bytes(raw_key[:32])
    signature = raw_key[32:]
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(200):
            key.verify(signature, message)
        n += 200
    return n


def measure_verify_ceiling(processes: int, seconds: float = 2.0, size: int = 760) -> float:
    """What ``processes`` cores do verifying Ed25519 signatures and nothing else: the ceiling that
    verified reports/s is compared with (the same run, the same machine)."""
    key = Ed25519PrivateKey.generate()
    message = os.urandom(size)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    job = (raw + key.sign(message), message, seconds)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        counts = pool.map(_verify_loop, [job] * processes)
    return sum(counts) / seconds


def measure_ingest(
    *,
    exe: str,
    broker: Broker,
    tmp: Path,
    agents: list[SimAgent],
    probe: SimAgent,
    per_agent: int,
    k: int,
    share: bool,
    signers: int,
    max_wait: float,
) -> None:
    print("(b) sustained ingest", flush=True)
    lines_dir = tmp / "lines"
    signed = sign_postures(agents, per_agent, signers, lines_dir)
    sample = (lines_dir / f"{agents[0].agent_id}.lines").open("rb").readline()
    print(f"    posture size {len(sample) - 1} bytes")
    print(
        f"(b) publishing {signed} postures at full rate: {len(agents)} mosquitto_pub -l processes (one per agent)",
        flush=True,
    )
    r = run_ingest(
        exe=exe,
        broker=broker,
        data_dir=tmp / "controller",
        policy=tmp / "policy.toml",
        logs=tmp,
        agents=agents,
        lines_dir=lines_dir,
        signed=signed,
        probe=probe,
        k=k,
        share=share,
        max_wait=max_wait,
    )
    print(f"    published in {r.published_s:.1f} s ({signed / r.published_s:,.0f}/s into the broker)")
    print(
        f"    stored {r.stored} of {signed} postures as accepted ({r.rejects} rejects counted) in {r.wall_s:.1f} s"
    )
    print(
        f"    processed (verified, accepted or rejected) {(r.stored + r.rejects) / r.wall_s:,.0f}/s over {r.wall_s:.1f} s"
    )
    if r.rejects:
        print(
            "    note: every posture here is valid and in order; rejects mean a bug (with K > 1 the replay"
            " rule is per process, see controller/README.md)"
        )
    print(f"    sustained verified reports/s: {r.overall:,.0f} overall, {r.middle:,.0f} over the middle 80%")
    cores = min(k, os.cpu_count() or 1)
    ceiling = measure_verify_ceiling(cores)
    print(
        f"    Ed25519 verify-only ceiling of {cores} core(s) (same run): {ceiling:,.0f}/s; "
        f"verified reports/s = {r.overall / ceiling:.2f} of it ({DATABASE}, K = {k})"
    )
    print(f"    {r.usage}")
    print(f"    {r.broker_usage}; {len(agents)} mosquitto_pub CPU {r.publishers_cpu:.1f} s")
    print("    audit bytes per heartbeat and `audit verify` entries/s: bench/audit.py")
    print(f"    controllers alive afterwards: {r.alive[0]}/{r.alive[1]}")


def measure_latency(
    *,
    exe: str,
    broker: Broker,
    tmp: Path,
    background: list[SimAgent],
    victims: list[SimAgent],
    rate: int,
    k: int,
    share: bool,
    spacing: float,
) -> None:
    data_dir = tmp / "controller"
    policy_file = tmp / "policy.toml"
    pol = parse_policy(POLICY)
    received: dict[str, float] = {}
    lock = threading.Lock()

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        agent = msg.topic.split("/")[3]
        with lock:
            received.setdefault(agent, now)

    with controllers(
        exe, k, data_dir=data_dir, broker=broker, policy=policy_file, share_group=share, logs=tmp
    ) as procs:
        for p in procs:
            wait_until(
                lambda p=p: connected_to(p.pid, broker.port) or p.poll() is not None, 30, "controller connect"
            )
        await_ready(broker, data_dir, background[-1])
        listener = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-victims")
        listener.on_message = on_message
        listener.connect("127.0.0.1", broker.port)
        listener.subscribe("cleanroom/v1/agents/+/commands", qos=1)
        listener.loop_start()
        pub = Publisher(broker, "bench-latency")
        # Victims announce themselves (online, compliant) before the measurement.
        for v in victims:
            v_key = v.key()
            pub.send(
                agent_topic(v.agent_id, Channel.STATUS),
                seal(
                    Kind.STATUS,
                    Status(state=AgentState.ONLINE),
                    sender=v.agent_id,
                    seq=v.next_seq(),
                    key=v_key,
                ),
                retain=True,
            )
            pub.send(
                agent_topic(v.agent_id, Channel.POSTURE),
                seal(Kind.POSTURE, posture(v.agent_id, pol), sender=v.agent_id, seq=v.next_seq(), key=v_key),
            )
        db = data_dir / "controller.db"
        wait_until(
            lambda: accepted_count(db, prefix="victim-")[0] >= len(victims),
            60,
            "victims' first postures stored",
        )

        # Background load: pre-signed, paced at `rate` per second in 10 ms slots.
        duration = len(victims) * spacing + 4.0
        total_bg = int(rate * duration)
        bg_keys = {a.agent_id: a.key() for a in background}
        bg_msgs = []
        body_of = {a.agent_id: posture(a.agent_id, pol) for a in background}
        for i in range(total_bg):
            a = background[i % len(background)]
            bg_msgs.append(
                (
                    agent_topic(a.agent_id, Channel.POSTURE),
                    seal(
                        Kind.POSTURE,
                        body_of[a.agent_id],
                        sender=a.agent_id,
                        seq=a.next_seq(),
                        key=bg_keys[a.agent_id],
                    ),
                )
            )
        stop = threading.Event()
        bg_pub = Publisher(broker, "bench-background")

        def pace() -> None:
            t0 = time.monotonic()
            for i, (topic, payload) in enumerate(bg_msgs):
                if stop.is_set():
                    return
                due = t0 + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                bg_pub.send(topic, payload)

        base_bg, _, _ = accepted_count(db, prefix="bg-")
        usage = Usage([p.pid for p in procs])
        pacer = threading.Thread(target=pace, daemon=True)
        t_bg = time.monotonic()
        pacer.start()
        time.sleep(2.0)  # let the background load settle before the first violation
        sent: dict[str, float] = {}
        violations = []
        for v in victims:
            body = posture(v.agent_id, pol, denied=["anydesk"], session=f"s-4242-{v.agent_id}")
            violations.append((v, seal(Kind.POSTURE, body, sender=v.agent_id, seq=v.next_seq(), key=v.key())))
        for v, payload in violations:
            sent[v.agent_id] = time.monotonic()
            pub.send(agent_topic(v.agent_id, Channel.POSTURE), payload)
            time.sleep(spacing)
        with contextlib.suppress(RuntimeError):  # missing commands are reported below, not fatal
            wait_until(lambda: len(received) >= len(victims), 10, "end_session commands for every victim")
        stop.set()
        pacer.join()
        bg_wall = time.monotonic() - t_bg
        usage_line = usage.finish()
        bg_done, _, _ = accepted_count(db, prefix="bg-")
        listener.loop_stop()
        pub.close()
        bg_pub.close()
        lat = [1000 * (received[a] - sent[a]) for a in sent if a in received]
        print(
            f"(c) background {rate} reports/s for {bg_wall:.1f} s: {bg_done - base_bg} verified ({(bg_done - base_bg) / bg_wall:,.0f}/s)"
        )
        print(f"    violations {len(sent)}, end_session received {len(lat)}")
        if lat:
            print(
                f"    decision latency (violation published → end_session received): p50 {percentile(lat, 0.5):.1f} ms, "
                f"p99 {percentile(lat, 0.99):.1f} ms, max {max(lat):.1f} ms, mean {statistics.fmean(lat):.1f} ms"
            )
        print(f"    {usage_line}")


def junk_lines(flooder: SimAgent, claimed: str, count: int = 500) -> list[bytes]:
    """One cycle of junk from ``flooder``'s connection (no newlines): 60% forgeries (well-formed envelopes
    whose signature does not verify: the dearest junk to refuse), 20% garbage, 20% envelopes claiming to be
    another agent (``claimed``), each signed with a key nobody enrolled."""
    forged_key, claim_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    body = Event(kind="clipboard.blocked", at=time.time())
    lines = []
    for i in range(count):
        kind = i % 5
        if kind < 3:
            lines.append(seal(Kind.EVENT, body, sender=flooder.agent_id, seq=10**6 + i, key=forged_key))
        elif kind == 3:
            lines.append(b'{"v":1,"kind":"event","sender":"' + str(i).encode() + b'", not json')
        else:
            lines.append(seal(Kind.EVENT, body, sender=claimed, seq=10**6 + i, key=claim_key))
    return lines


class Flooder:
    """One enrolled device's client flooding its own events topic with ``total`` junk messages, from a
    thread: at full speed (mosquitto_pub -l, 20,000 lines per connection: one mosquitto_pub loses messages
    when its stdin holds ~100,000 lines) or paced at ``rate``/s (one mosquitto_pub fed through a pipe)."""

    CHUNK = 20_000

    def __init__(self, port: int, topic: str, lines: list[bytes], total: int, rate: int, tmp: Path) -> None:
        self.port, self.topic, self.lines, self.total, self.rate, self.tmp = (
            port,
            topic,
            lines,
            total,
            rate,
            tmp,
        )
        self.sent = 0
        self.started = self.finished = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def running(self) -> bool:
        return self._thread.is_alive()

    def _argv(self) -> list[str]:
        return [
            need("mosquitto_pub"),
            "-p",
            str(self.port),
            "-q",
            "1",
            "-i",
            "bench-flooder",
            "-l",
            "-t",
            self.topic,
        ]

    def _block(self, n: int) -> bytes:
        reps = -(-n // len(self.lines))
        return b"".join(line + b"\n" for line in (self.lines * reps)[:n])

    def _run(self) -> None:
        if self.rate <= 0:
            chunk = self.tmp / "flood.lines"
            while self.sent < self.total:
                n = min(self.CHUNK, self.total - self.sent)
                chunk.write_bytes(self._block(n))
                with chunk.open("rb") as f:
                    subprocess.run(self._argv(), stdin=f, check=True, timeout=600)
                self.sent += n
        else:
            proc = subprocess.Popen(self._argv(), stdin=subprocess.PIPE)
            assert proc.stdin is not None
            step = max(1, self.rate // 100)  # 10 ms worth per write
            block = self._block(step)
            while self.sent < self.total:
                n = min(step, self.total - self.sent)
                due = self.started + (self.sent + n) / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                proc.stdin.write(block if n == step else self._block(n))
                proc.stdin.flush()
                self.sent += n
            proc.stdin.close()
            proc.wait(600)
        self.finished = time.monotonic()


def rejects_of(db: Path, sender: str) -> dict[str, int]:
    rows = query(db, "SELECT status, count FROM rejects WHERE sender = ?", (sender,))
    return {str(r[0]): int(r[1]) for r in rows}


def summary_rows(db: Path, sender: str) -> int:
    (row,) = query(db, "SELECT COUNT(*) FROM audit WHERE kind = 'verdict.summary' AND subject = ?", (sender,))
    return int(row[0])


def measure_flood(
    *,
    exe: str,
    broker: Broker,
    tmp: Path,
    flooder: SimAgent,
    victims: list[SimAgent],
    messages: int,
    rate: int,
    k: int,
    share: bool,
) -> None:
    """(d) One enrolled device floods ``messages`` junk messages; meanwhile each victim reports a violation
    with a running session; latency = violation published → its end_session received."""
    data_dir = tmp / "controller"
    policy_file = tmp / "policy.toml"
    db = data_dir / "controller.db"
    pol = parse_policy(POLICY)
    received: dict[str, float] = {}
    lock = threading.Lock()

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        with lock:
            received.setdefault(msg.topic.split("/")[3], now)

    with controllers(
        exe, k, data_dir=data_dir, broker=broker, policy=policy_file, share_group=share, logs=tmp
    ) as procs:
        for p in procs:
            wait_until(
                lambda p=p: connected_to(p.pid, broker.port) or p.poll() is not None, 30, "controller connect"
            )
        listener = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-flood-victims")
        listener.on_message = on_message
        listener.connect("127.0.0.1", broker.port)
        listener.subscribe("cleanroom/v1/agents/+/commands", qos=1)
        listener.loop_start()
        pub = Publisher(broker, "bench-flood-latency")
        for v in victims:
            key = v.key()
            online = Status(state=AgentState.ONLINE)
            pub.send(
                agent_topic(v.agent_id, Channel.STATUS),
                seal(Kind.STATUS, online, sender=v.agent_id, seq=v.next_seq(), key=key),
                retain=True,
            )
            pub.send(
                agent_topic(v.agent_id, Channel.POSTURE),
                seal(Kind.POSTURE, posture(v.agent_id, pol), sender=v.agent_id, seq=v.next_seq(), key=key),
            )
        wait_until(
            lambda: accepted_count(db, prefix=victims[0].agent_id.split("-")[0] + "-")[0] >= len(victims),
            60,
            "flood victims' first postures stored",
        )
        violations = []
        for v in victims:
            body = posture(v.agent_id, pol, denied=["anydesk"], session=f"s-4242-{v.agent_id}")
            violations.append((v, seal(Kind.POSTURE, body, sender=v.agent_id, seq=v.next_seq(), key=v.key())))
        lines = junk_lines(flooder, victims[0].agent_id)
        flood = Flooder(
            broker.port, agent_topic(flooder.agent_id, Channel.EVENTS), lines, messages, rate, tmp
        )
        before = sum(rejects_of(db, flooder.agent_id).values())
        rows_before = summary_rows(db, flooder.agent_id)
        usage = Usage([p.pid for p in procs])
        flood.start()
        # Let the flood build up first, then one violation after another while it lasts.
        time.sleep(0.3)
        expected_s = messages / rate if rate > 0 else 2.0
        spacing = max(0.005, 0.8 * expected_s / len(victims))
        sent: dict[str, float] = {}
        during: set[str] = set()
        for v, payload in violations:
            if not flood.running():
                break
            sent[v.agent_id] = time.monotonic()
            pub.send(agent_topic(v.agent_id, Channel.POSTURE), payload)
            during.add(v.agent_id)
            time.sleep(spacing)
        flood.join()
        with contextlib.suppress(RuntimeError):
            wait_until(lambda: len(received) >= len(sent), 30, "end_session for every victim")
        published_s = flood.finished - flood.started
        last, last_change = -1, time.monotonic()
        while True:  # every junk message accounted for (counted per batch and per second)
            counted = sum(rejects_of(db, flooder.agent_id).values()) - before
            if counted >= messages or time.monotonic() - last_change > 10:
                break
            if counted != last:
                last, last_change = counted, time.monotonic()
            time.sleep(0.2)
        drained_s = time.monotonic() - flood.started
        usage_line = usage.finish()
        listener.loop_stop()
        pub.close()
        lat = [1000 * (received[a] - sent[a]) for a in sent if a in received]
        how = "at full speed" if rate <= 0 else f"paced at {rate:,}/s"
        print(
            f"(d) flood: {messages:,} junk messages from one enrolled device {how}: published in {published_s:.1f} s "
            f"({messages / published_s:,.0f}/s); counted {counted:,} ({counted / drained_s:,.0f}/s) after {drained_s:.1f} s "
            f"(all runs so far: {rejects_of(db, flooder.agent_id)})"
        )
    # The controllers stopped: their open windows are written now.
    rows = summary_rows(db, flooder.agent_id) - rows_before
    print(f"    audit rows for the flood: {rows} verdict.summary entries (one per 10 s window)")
    print(f"    violations during the flood {len(sent)}, end_session received {len(lat)}")
    if lat:
        print(
            f"    decision latency of the other devices while one floods: p50 {percentile(lat, 0.5):.1f} ms, "
            f"p99 {percentile(lat, 0.99):.1f} ms, max {max(lat):.1f} ms"
        )
    print(f"    {usage_line}")


@contextlib.contextmanager
def plain_broker(workdir: Path) -> Iterator[Broker]:
    """A fresh Mosquitto with the bench's plain, anonymous configuration."""
    broker = Broker(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def broker_from_config(pki: BenchPki, workdir: Path) -> Iterator[Broker]:
    """A fresh Mosquitto started from what ``broker-config`` writes for ``pki`` (listener on a free
    loopback port), exactly as shipped. Started as root, Mosquitto drops to the ``mosquitto`` user, which
    must reach the files: they go to a directory of their own (0711), not under the bench's 0700 temp dir."""
    from cleanroom_controller.trust import Listen, write_broker_config

    root = Path(tempfile.mkdtemp(prefix="cr-bench-broker-"))
    root.chmod(0o711)
    try:
        port = free_port()
        files = write_broker_config(root / "broker", pki.pki, listen=Listen("127.0.0.1", port))
        broker = Broker(workdir, port=port, config=files.conf, pki=pki)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def negotiated(broker: Broker, common_name: str) -> str:
    """The TLS version and cipher a Python client (the controller's TLS context) gets from ``broker``."""
    ctx = broker.tls(common_name)
    assert ctx is not None
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else '?'}"


def measure_mtls(
    *,
    exe: str,
    tmp: Path,
    agents: list[SimAgent],
    probe: SimAgent,
    per_agent: int,
    k: int,
    share: bool,
    signers: int,
    max_wait: float,
    ceiling_messages: int,
    ceiling_publishers: int,
    rounds: int,
) -> None:
    """(e) Per round, the same agents and the same signed postures through a plain broker and an mTLS
    one (in turn first); each half with a fresh broker (its ceiling measured before any controller
    connects, so no session queues the ceiling's messages) and a fresh controller data dir with the same
    enrolments."""
    print(
        f"(e) mTLS off vs on: N = {len(agents)} agents × {per_agent} postures, K = {k} controller processes, "
        f"{rounds} round(s)",
        flush=True,
    )
    t0 = time.monotonic()
    pki = BenchPki(tmp / "e-pki", k)
    devices = [
        *(a.agent_id for a in agents),
        probe.agent_id,
        *(f"ceiling-{i}" for i in range(ceiling_publishers)),
    ]
    for name in devices:
        pki.client(name)
    print(
        f"    PKI (Pki.init, ECDSA P-256) with {k + 1} controller and {len(devices)} device certificates "
        f"(CN = agent id) in {time.monotonic() - t0:.1f} s"
    )
    print(
        "    note: broker-config's Mosquitto differs from the plain one in more than TLS: persistence on "
        "(autosave 30 s), max_queued_messages 100000, an ACL, no set_tcp_nodelay"
    )
    halves = {
        "off": "plain anonymous Mosquitto",
        "on": "broker-config Mosquitto: TLS 1.2+, client certificates, CRL, ACL",
    }
    got: dict[str, list[tuple[float, IngestResult]]] = {"off": [], "on": []}
    for r in range(rounds):
        lines_dir = tmp / f"e{r}-lines"
        signed = sign_postures(agents, per_agent, signers, lines_dir)
        size = len((lines_dir / f"{agents[0].agent_id}.lines").open("rb").readline()) - 1
        # Rounds alternate which half goes first, so that a drift in the machine's load (other jobs on
        # these 2 cores) does not always favour the same half.
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            what = halves[mode]
            work = tmp / f"e{r}-{mode}"
            work.mkdir()
            opened = (
                plain_broker(work / "mosquitto")
                if mode == "off"
                else broker_from_config(pki, work / "mosquitto")
            )
            with opened as broker:
                tls = f", {negotiated(broker, probe.agent_id)}" if broker.pki is not None else ""
                ceiling, received = measure_ceiling(
                    broker,
                    work,
                    messages=ceiling_messages,
                    publishers=ceiling_publishers,
                    size=size,
                    as_agents=True,
                )
                data_dir = work / "controller"
                enrol_all(data_dir, exe, [*agents, probe])
                res = run_ingest(
                    exe=exe,
                    broker=broker,
                    data_dir=data_dir,
                    policy=tmp / "policy.toml",
                    logs=work,
                    agents=agents,
                    lines_dir=lines_dir,
                    signed=signed,
                    probe=probe,
                    k=k,
                    share=share,
                    max_wait=max_wait,
                )
            got[mode].append((ceiling, res))
            print(f"    mTLS {mode} ({what}{tls}):")
            print(
                f"      Mosquitto ceiling {ceiling:,.0f} msgs/s ({received} of {ceiling_messages // ceiling_publishers * ceiling_publishers} "
                f"× {size} B, {ceiling_publishers} mosquitto_pub -l → 1 mosquitto_sub, QoS 1)"
            )
            print(
                f"      verified reports/s {res.overall:,.0f} overall, {res.middle:,.0f} over the middle 80%: stored "
                f"{res.stored} of {signed} ({res.rejects} rejects) in {res.wall_s:.1f} s, published in {res.published_s:.1f} s "
                f"({signed / res.published_s:,.0f}/s into the broker)"
            )
            print(f"      {res.usage}; controllers alive afterwards {res.alive[0]}/{res.alive[1]}")
            print(
                f"      {res.broker_usage}; {len(agents)} mosquitto_pub CPU {res.publishers_cpu:.1f} s",
                flush=True,
            )
        (c_off, off), (c_on, on) = got["off"][-1], got["on"][-1]
        print(
            f"    round {r + 1}: verified reports/s on/off = {on.overall / off.overall:.2f} ({on.overall:,.0f} vs "
            f"{off.overall:,.0f}; middle 80% {on.middle / off.middle:.2f}); Mosquitto ceiling on/off = "
            f"{c_on / c_off:.2f} ({c_on:,.0f} vs {c_off:,.0f} msgs/s)"
        )
    if rounds > 1:
        v_off, v_on = (statistics.median(res.overall for _, res in got[m]) for m in ("off", "on"))
        c_off, c_on = (statistics.median(c for c, _ in got[m]) for m in ("off", "on"))
        print(
            f"    median of {rounds} rounds: verified reports/s on/off = {v_on / v_off:.2f} ({v_on:,.0f} vs {v_off:,.0f}); "
            f"Mosquitto ceiling on/off = {c_on / c_off:.2f} ({c_on:,.0f} vs {c_off:,.0f} msgs/s)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--agents", type=int, default=100, help="simulated agents for (b) (default 100)")
    ap.add_argument("--messages", type=int, default=40_000, help="postures published in (b) (default 40000)")
    ap.add_argument("--controllers", type=int, default=2, help="controller processes K (default 2)")
    ap.add_argument("--no-share-group", action="store_true", help="do not pass --share-group (K must be 1)")
    ap.add_argument("--signers", type=int, default=max(1, os.cpu_count() or 1), help="signing processes")
    ap.add_argument("--ceiling-messages", type=int, default=100_000, help="messages for (a) (default 100000)")
    ap.add_argument("--ceiling-publishers", type=int, default=4, help="mosquitto_pub processes for (a)")
    ap.add_argument(
        "--latency-rate", type=int, default=1000, help="background reports/s in (c) (default 1000)"
    )
    ap.add_argument(
        "--latency-samples", type=int, default=200, help="violations measured in (c) (default 200)"
    )
    ap.add_argument("--latency-spacing", type=float, default=0.025, help="seconds between violations in (c)")
    ap.add_argument("--max-wait", type=float, default=120.0, help="cap on (b)'s drain time, seconds")
    ap.add_argument(
        "--flood-messages", type=int, default=100_000, help="junk messages one device floods in (d)"
    )
    ap.add_argument(
        "--flood-rates",
        default="0,10000",
        help="junk messages/s in (d), one run each (default 0,10000); 0: as fast as mosquitto_pub can",
    )
    ap.add_argument("--flood-samples", type=int, default=100, help="violations measured during (d)")
    ap.add_argument(
        "--mtls-messages",
        type=int,
        default=40_000,
        help="postures published in each half of each round of (e) (default 40000)",
    )
    ap.add_argument(
        "--mtls-ceiling-messages",
        type=int,
        default=50_000,
        help="messages for each ceiling in (e) (default 50000)",
    )
    ap.add_argument(
        "--mtls-rounds",
        type=int,
        default=3,
        help="(e) off/on pairs, each with fresh brokers and signatures; medians printed (default 3)",
    )
    ap.add_argument(
        "--skip", choices=SECTIONS, action="append", default=[], help="leave a section out (repeatable)"
    )
    ap.add_argument(
        "--only", choices=SECTIONS, action="append", default=[], help="run only these sections (repeatable)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, controller.db)")
    ap.add_argument(
        "--database",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="the controllers' store: SQLite in their data dir, or a private PostgreSQL this run starts",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="run each controller under cProfile, writing DIR/controller-N.prof (slower: for finding hot spots)",
    )
    ap.add_argument("--inflight", type=int, default=100, help="the broker's max_inflight_messages")
    args = ap.parse_args(argv)
    if args.controllers > 1 and args.no_share_group:
        ap.error("--controllers > 1 needs the shared subscription")
    if args.mtls_rounds < 1 or args.mtls_messages < args.agents:
        ap.error("--mtls-rounds must be ≥ 1 and --mtls-messages ≥ --agents")
    share = args.controllers > 1
    run = set(args.only or SECTIONS) - set(args.skip)

    global DATABASE, _postgres, PROFILE, INFLIGHT
    DATABASE = args.database
    INFLIGHT = args.inflight
    if args.profile is not None:
        PROFILE = args.profile.resolve()
        PROFILE.mkdir(parents=True, exist_ok=True)
    if DATABASE == "postgres":
        sys.path.insert(0, str(REPO))
        from tests.support.postgres import Postgres

        _postgres = Postgres(durable=True)
        _postgres.__enter__()
    tmp = Path(tempfile.mkdtemp(prefix="cr-bench-"))
    broker = Broker(tmp / "mosquitto")
    broker.start()
    print(f"cleanroom ingest bench: Mosquitto on 127.0.0.1:{broker.port}, {os.cpu_count()} CPUs, temp {tmp}")
    if _postgres is not None:
        print(f"store: PostgreSQL (private server, fsync on) on 127.0.0.1:{_postgres.port}")
    try:
        if "ceiling" in run:
            rate, got = measure_ceiling(
                broker, tmp, messages=args.ceiling_messages, publishers=args.ceiling_publishers, size=760
            )
            print(
                f"(a) ceiling: {rate:,.0f} msgs/s ({got} received) through Mosquitto on loopback ({args.ceiling_messages} × 760 B, QoS 1, "
                f"{args.ceiling_publishers} mosquitto_pub -l → 1 mosquitto_sub)"
            )
        exe = controller_exe()
        if exe is None:
            print("(b)-(e): cleanroom-controller is not installed or does not start yet; skipped")
            return 1
        agents = [SimAgent.create(f"agent-{i:05d}") for i in range(args.agents)]
        background = [SimAgent.create(f"bg-{i:04d}") for i in range(50)]
        victims = [SimAgent.create(f"victim-{i:04d}") for i in range(args.latency_samples)]
        flooder = SimAgent.create("flood-0000")
        try:
            flood_rates = [int(r) for r in args.flood_rates.split(",") if r.strip()]
        except ValueError:
            ap.error(f"--flood-rates: comma-separated integers, not {args.flood_rates!r}")
        # Fresh victims per run: a victim's session is ended once, so it can be measured once.
        flood_victims = [
            [SimAgent.create(f"fv{n}-{i:04d}") for i in range(args.flood_samples)]
            for n in range(len(flood_rates))
        ]
        data_dir = tmp / "controller"
        (tmp / "policy.toml").write_text(POLICY)
        print(
            f"N = {args.agents} agents, K = {args.controllers} controller processes{' (--share-group bench)' if share else ''}"
        )
        if run & {"ingest", "latency", "flood"}:
            t0 = time.monotonic()
            everyone = [*agents, *background, *victims, flooder, *(v for fv in flood_victims for v in fv)]
            enrol_all(data_dir, exe, everyone)
            print(f"enrolled {len(everyone)} agents in {time.monotonic() - t0:.1f} s")
        if "ingest" in run:
            measure_ingest(
                exe=exe,
                broker=broker,
                tmp=tmp,
                agents=agents,
                probe=background[-1],
                per_agent=max(1, args.messages // args.agents),
                k=args.controllers,
                share=share,
                signers=args.signers,
                max_wait=args.max_wait,
            )
        if "latency" in run:
            measure_latency(
                exe=exe,
                broker=broker,
                tmp=tmp,
                background=background,
                victims=victims,
                rate=args.latency_rate,
                k=args.controllers,
                share=share,
                spacing=args.latency_spacing,
            )
        for rate, run_victims in zip(flood_rates, flood_victims, strict=True):
            if "flood" not in run:
                break
            measure_flood(
                exe=exe,
                broker=broker,
                tmp=tmp,
                flooder=flooder,
                victims=run_victims,
                messages=args.flood_messages,
                rate=rate,
                k=args.controllers,
                share=share,
            )
        if "mtls" in run:
            measure_mtls(
                exe=exe,
                tmp=tmp,
                agents=agents,
                probe=SimAgent.create("probe-mtls"),
                per_agent=args.mtls_messages // args.agents,
                k=args.controllers,
                share=share,
                signers=args.signers,
                max_wait=args.max_wait,
                ceiling_messages=args.mtls_ceiling_messages,
                ceiling_publishers=args.ceiling_publishers,
                rounds=args.mtls_rounds,
            )
        return 0
    finally:
        broker.stop()
        if _postgres is not None:
            _postgres.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
