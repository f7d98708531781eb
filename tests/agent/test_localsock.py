"""The launch gate over the real unix socket: a real agent process, the real `launch` command, real
client processes (a copy of /bin/bash named like the client)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cleanroom_agent.localsock import MAX_LINE, LocalSocketClient, LocalSocketServer, Peer
from cleanroom_protocol import Channel
from tests.agent.conftest import CLIENT, FakeClients, Tap, events, policy_file
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for


def launch(sock: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cleanroom_agent", "launch", "--socket", str(sock), "--", *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp_path is 0700 to root), for the socket."""
    with tempfile.TemporaryDirectory(prefix="cleanroom-sock-") as d:
        Path(d).chmod(0o755)
        yield Path(d)


@pytest.fixture
def running_agent(
    tmp_path: Path, mosquitto: Mosquitto, tap: Tap, agent_factory: Any, public_dir: Path
) -> Any:
    policy = policy_file(tmp_path / "p.toml", processes={"deny": ["rogue-tool"]})
    agent = agent_factory(mosquitto.url, policy=policy, socket_path=public_dir / "agent.sock")
    agent.start()
    wait_for(lambda: tap.on(Channel.POSTURE), timeout=15, what="the agent online")
    return agent


def test_a_compliant_endpoint_launches_registers_and_returns_the_exit_code(
    running_agent: Any, tap: Tap, clients: FakeClients
) -> None:
    client = clients.binary(CLIENT)
    done = launch(running_agent.socket, str(client), "-c", "sleep 1; exit 3")
    assert done.returncode == 3, done.stderr
    allowed = events(tap, running_agent, "launch.allowed")
    assert allowed and allowed[0]["details"]["client"] == CLIENT and allowed[0]["details"]["uid"] == 0
    started = wait_for(
        lambda: events(tap, running_agent, "session.started"), timeout=5, what="session.started"
    )
    sid = started[0]["details"]["session"]

    def launched_in_posture() -> bool:
        for m in tap.on(Channel.POSTURE):
            body = running_agent.verify(m.payload).body
            if any(s.id == sid and s.launched for s in body.sessions):
                return True
        return False

    wait_for(launched_in_posture, timeout=5, what="the session reported as launched")
    wait_for(lambda: events(tap, running_agent, "session.ended"), timeout=5, what="session.ended")


def test_launch_is_denied_with_reasons_while_a_denied_process_runs(
    running_agent: Any, tap: Tap, clients: FakeClients
) -> None:
    clients.start("rogue-tool", "sleep 60; true")
    wait_for(
        lambda: events(tap, running_agent, "process.denied_running"), timeout=10, what="denied process seen"
    )

    def denied_in_posture() -> bool:  # a change is reported at once, not at the next heartbeat (30 s)
        last = running_agent.verify(tap.on(Channel.POSTURE)[-1].payload).body
        return any(p.name == "rogue-tool" for p in last.denied_processes)

    wait_for(denied_in_posture, timeout=5, what="the denied process in a posture")
    done = launch(running_agent.socket, str(clients.binary(CLIENT)), "-c", "exit 0")
    assert done.returncode == 77
    assert "denied_process:rogue-tool" in done.stderr and "Traceback" not in done.stderr
    denied = wait_for(lambda: events(tap, running_agent, "launch.denied"), timeout=5, what="launch.denied")
    assert denied[0]["details"]["reasons"] == "denied_process:rogue-tool" and denied[0]["blocked"] is True
    assert not events(tap, running_agent, "session.started")


def test_only_configured_clients_can_be_launched(running_agent: Any) -> None:
    done = launch(running_agent.socket, "/bin/true")
    assert done.returncode == 77 and "not_a_session_client:true" in done.stderr


def test_another_user_cannot_register_a_process_it_does_not_own(
    running_agent: Any, clients: FakeClients
) -> None:
    """The socket is 0666; the kernel's peer credentials decide what a user may register."""
    assert running_agent.socket.stat().st_mode & 0o777 == 0o666
    root_owned = clients.start(CLIENT, "sleep 60; true")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes user nobody and asks over the socket
        try:
            os.setgid(65534)
            os.setuid(65534)
            answer = LocalSocketClient(running_agent.socket).request(
                {"op": "register", "pid": root_owned.pid}
            )
            os.write(write_end, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as r:
        out = r.read()
    os.waitpid(pid, 0)
    answer = json.loads(out)
    assert answer == {"ok": False, "error": f"process {root_owned.pid} does not belong to uid 65534"}


def test_no_agent_is_a_clear_error(tmp_path: Path) -> None:
    done = launch(tmp_path / "none.sock", "/bin/true")
    assert done.returncode == 69
    assert "no agent is running" in done.stderr and "Traceback" not in done.stderr


async def test_server_bounds_and_rejects_bad_requests(tmp_path: Path) -> None:
    seen: list[Peer] = []

    async def handler(request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        seen.append(peer)
        return {"ok": True, "echo": request["op"]}

    server = LocalSocketServer(tmp_path / "s.sock", handler, rate=0.001, burst=5)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.to_thread(
            wait_for, lambda: (tmp_path / "s.sock").exists(), timeout=5, what="the socket"
        )
        client = LocalSocketClient(tmp_path / "s.sock")
        ok = await asyncio.to_thread(client.request, {"op": "ping"})
        assert ok == {"ok": True, "echo": "ping"} and seen[0].uid == 0

        def raw(data: bytes) -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(tmp_path / "s.sock"))
                s.sendall(data)
                return json.loads(s.makefile().readline())  # type: ignore[no-any-return]

        assert (await asyncio.to_thread(raw, b"{nope\n"))["error"] == "request is not JSON"
        assert "op" in (await asyncio.to_thread(raw, b"[1]\n"))["error"]
        too_long = await asyncio.to_thread(raw, b"x" * (MAX_LINE * 2) + b"\n")
        assert "longer than" in too_long["error"]
        answers = [await asyncio.to_thread(client.request, {"op": "ping"}) for _ in range(5)]
        assert {"ok": False, "error": "rate limited"} in answers
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not (tmp_path / "s.sock").exists()


def test_freerdp_is_launched_with_its_own_clipboard_redirection_off(
    tmp_path: Path, mosquitto: Mosquitto, tap: Tap, agent_factory: Any, public_dir: Path
) -> None:
    """The second clipboard layer: in enforce mode with the clipboard blocked, `launch` adds FreeRDP's
    `-clipboard`. The "client" is /bin/echo copied as `xfreerdp`, so it prints the arguments it got."""
    policy = policy_file(tmp_path / "p.toml", sessions={"clients": ["xfreerdp"]}, clipboard={"mode": "block"})
    agent = agent_factory(mosquitto.url, policy=policy, socket_path=public_dir / "agent.sock")
    agent.start()
    wait_for(lambda: tap.on(Channel.POSTURE), timeout=15, what="the agent online")
    client = tmp_path / "bin" / "xfreerdp"
    client.parent.mkdir(exist_ok=True)
    client.write_bytes(Path("/bin/echo").read_bytes())
    client.chmod(0o755)
    done = launch(agent.socket, str(client), "/v:desktop.example")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["-clipboard", "/v:desktop.example"]
