"""The launch gate and the local socket, for real: a real agent process, the real `launch` command, real
client processes (a copy of /bin/bash named like the client), other users as real forked processes that
switched to uid `nobody` (the tests run as root)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cleanroom_agent.sessions.localsock import (
    MAX_LINE,
    PENDING_EXEC_S,
    LocalSocketClient,
    LocalSocketServer,
    Peer,
    PeerBudgets,
    may_read_posture,
)
from cleanroom_protocol import Channel, Posture
from tests.agent.conftest import CLIENT, FakeClients, Tap, events, policy_file
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for

NOBODY = 65534
USERS_GID = 100  # the "users" group of Debian's base system


def launch_argv(sock: Path, *command: str) -> list[str]:
    return [sys.executable, "-m", "cleanroom_agent", "launch", "--socket", str(sock), "--", *command]


def launch(sock: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        launch_argv(sock, *command), capture_output=True, text=True, timeout=30, check=False
    )


def as_user(
    fn: Callable[[], Any], *, uid: int = NOBODY, gid: int = NOBODY, groups: tuple[int, ...] = ()
) -> Any:
    """Run ``fn`` in a forked child that became ``uid``/``gid`` with ``groups``; its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.write(write_end, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as r:
        out = r.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def posture_of(agent: Any, tap: Tap) -> Posture:
    body = agent.verify(tap.on(Channel.POSTURE)[-1].payload).body
    assert isinstance(body, Posture)
    return body


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


# --- the launch: one step ------------------------------------------------------------------------------


def test_the_launch_process_itself_becomes_the_session_before_the_client_runs(
    running_agent: Any, tap: Tap, clients: FakeClients, tmp_path: Path
) -> None:
    """The agent registers the asking process (its pid from SO_PEERCRED) and `launch` execs the client in
    it: the client's first look at the agent already finds itself a launched session, under the pid of the
    `launch` process, and the exit code is the client's own."""
    ask = tmp_path / "ask.py"
    ask.write_text(
        textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from cleanroom_agent.sessions.localsock import LocalSocketClient
        answer = LocalSocketClient(Path(sys.argv[1])).request({"op": "posture"})
        mine = [s for s in answer["posture"]["sessions"] if s["pid"] == int(sys.argv[2])]
        print(json.dumps(mine))
        """)
    )
    script = f"{sys.executable} {ask} {running_agent.socket} $$; exit 3"
    proc = subprocess.Popen(
        launch_argv(running_agent.socket, str(clients.binary(CLIENT)), "-c", script),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    first_look = json.loads(out)
    assert len(first_look) == 1 and first_look[0]["launched"] is True
    assert first_look[0]["client"] == CLIENT and first_look[0]["pid"] == proc.pid
    allowed = events(tap, running_agent, "launch.allowed")
    assert allowed and allowed[0]["details"]["uid"] == 0 and allowed[0]["details"]["pid"] == proc.pid
    assert allowed[0]["details"]["session"] == first_look[0]["id"]
    started = wait_for(
        lambda: events(tap, running_agent, "session.started"), timeout=5, what="session.started"
    )
    assert started[0]["details"]["session"] == first_look[0]["id"]
    wait_for(lambda: events(tap, running_agent, "session.ended"), timeout=5, what="session.ended")


def test_launch_is_denied_with_reasons_while_a_denied_process_runs(
    running_agent: Any, tap: Tap, clients: FakeClients
) -> None:
    clients.start("rogue-tool", "sleep 60; true")
    wait_for(
        lambda: events(tap, running_agent, "process.denied_running"), timeout=10, what="denied process seen"
    )

    def denied_in_posture() -> bool:  # a change is reported at once, not at the next heartbeat (30 s)
        return any(p.name == "rogue-tool" for p in posture_of(running_agent, tap).denied_processes)

    wait_for(denied_in_posture, timeout=5, what="the denied process in a posture")
    done = launch(running_agent.socket, str(clients.binary(CLIENT)), "-c", "exit 0")
    assert done.returncode == 77
    assert "denied_process:rogue-tool" in done.stderr and "Traceback" not in done.stderr
    denied = wait_for(lambda: events(tap, running_agent, "launch.denied"), timeout=5, what="launch.denied")
    assert denied[0]["details"]["reasons"] == "denied_process:rogue-tool" and denied[0]["blocked"] is True
    assert "session" not in denied[0]["details"]
    assert not events(tap, running_agent, "session.started")


def test_only_configured_clients_can_be_launched(running_agent: Any) -> None:
    done = launch(running_agent.socket, "/bin/true")
    assert done.returncode == 77 and "not_a_session_client:true" in done.stderr


def test_no_agent_is_a_clear_error(tmp_path: Path) -> None:
    done = launch(tmp_path / "none.sock", "/bin/true")
    assert done.returncode == 69
    assert "no agent is running" in done.stderr and "Traceback" not in done.stderr


def test_register_is_refused_and_a_launch_registers_only_the_asking_process(
    running_agent: Any, tap: Tap, clients: FakeClients
) -> None:
    """`register` took any pid the caller owned, after the client had started: refused now. A `launch`
    registers the kernel's peer pid whatever the request says."""
    root_owned = clients.start(CLIENT, "sleep 60; true")
    path = running_agent.socket

    def ask() -> list[dict[str, Any]]:
        client = LocalSocketClient(path)
        return [
            client.request({"op": "register", "pid": root_owned.pid}),
            client.request({"op": "launch", "client": CLIENT, "pid": root_owned.pid}),
            {"me": os.getpid()},
        ]

    registered, launched, me = as_user(ask)
    assert registered["ok"] is False and "register is refused" in registered["error"]
    assert launched["ok"] is True and launched["allowed"] is True
    assert launched["session"].startswith(f"s-{me['me']}-")
    allowed = wait_for(lambda: events(tap, running_agent, "launch.allowed"), timeout=5, what="launch event")
    assert allowed[0]["details"]["uid"] == NOBODY and allowed[0]["details"]["pid"] == me["me"]

    def root_owned_session() -> Any:
        return next((s for s in posture_of(running_agent, tap).sessions if s.pid == root_owned.pid), None)

    assert wait_for(root_owned_session, timeout=5, what="the root-owned session").launched is False


def test_a_launch_that_does_not_exec_the_client_in_time_is_dropped(
    running_agent: Any, tap: Tap, clients: FakeClients
) -> None:
    """A process that passed the gate but runs the client only after PENDING_EXEC_S is not a launched
    session: a stale decision is not honoured."""
    client = clients.binary(CLIENT)
    helper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
            import json, os, sys
            from pathlib import Path
            from cleanroom_agent.sessions.localsock import LocalSocketClient
            answer = LocalSocketClient(Path(sys.argv[1])).request({"op": "launch", "client": sys.argv[3]})
            print(json.dumps(answer), flush=True)
            sys.stdin.readline()
            os.execv(sys.argv[2], [sys.argv[2], "-c", "sleep 60; true"])
            """),
            str(running_agent.socket),
            str(client),
            CLIENT,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    clients.procs.append(helper)  # type: ignore[arg-type]  # cleaned up with the clients
    assert helper.stdout is not None and helper.stdin is not None
    answer = json.loads(helper.stdout.readline())
    assert answer["allowed"] is True and answer["session"].startswith(f"s-{helper.pid}-")
    started = time.monotonic()
    wait_for(
        lambda: (
            answer["session"] in running_agent.log.read_text()
            and "launch_not_executed" in running_agent.log.read_text()
        ),
        timeout=PENDING_EXEC_S + 5,
        what="the pending launch dropped",
    )
    assert time.monotonic() - started >= PENDING_EXEC_S - 1
    helper.stdin.write("go\n")
    helper.stdin.flush()

    def its_session() -> Any:
        return next((s for s in posture_of(running_agent, tap).sessions if s.pid == helper.pid), None)

    late = wait_for(its_session, timeout=5, what="the late client as a session")
    assert late.id == answer["session"] and late.launched is False


def test_a_client_started_without_launch_is_a_session_judged_like_a_launched_one(
    running_agent: Any, tap: Tap, clients: FakeClients, mosquitto: Mosquitto
) -> None:
    """Found by its executable name, reported (launched=false) and ended by the same judgement: cut off
    from the controller while a denied process runs, the agent fails closed on both sessions."""
    launched = subprocess.Popen(
        launch_argv(running_agent.socket, str(clients.binary(CLIENT)), "-c", "sleep 60; true")
    )
    clients.procs.append(launched)  # type: ignore[arg-type]
    direct = clients.start(CLIENT, "sleep 60; true")

    def both() -> dict[int, bool]:
        found = {s.pid: s.launched for s in posture_of(running_agent, tap).sessions}
        return found if {launched.pid, direct.pid} <= found.keys() else {}

    flags = wait_for(both, timeout=10, what="both sessions in a posture")
    assert flags[launched.pid] is True and flags[direct.pid] is False
    clients.start("rogue-tool", "sleep 60; true")
    wait_for(
        lambda: events(tap, running_agent, "process.denied_running"), timeout=10, what="denied process seen"
    )
    mosquitto.stop()
    assert launched.wait(15) is not None and direct.wait(15) is not None, "a session was not ended"
    fail_closed = wait_for(
        lambda: [e for e in running_agent.outbox_events() if e["kind"] == "agent.fail_closed"],
        timeout=5,
        what="agent.fail_closed in the spool",
    )
    assert fail_closed[0]["details"]["reason"] == "offline_non_compliant:denied_process:rogue-tool"
    ended = set(fail_closed[0]["details"]["sessions"].split(","))
    assert {sid.split("-")[1] for sid in ended} == {str(launched.pid), str(direct.pid)}


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


# --- the socket: budgets per uid ------------------------------------------------------------------------


def flood(path: Path, report: int, connections: int = 40) -> None:
    """Another user's flood, in a forked child that is `nobody`: ``connections`` connections at once,
    each sending 16 pipelined requests and reconnecting as soon as the agent closes it. Writes one line
    to ``report`` once the flood has met both the connection cap and the rate limit, then goes on."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    requests = (json.dumps({"op": "launch_check", "client": CLIENT}) + "\n").encode() * 16
    selector = selectors.DefaultSelector()
    seen: set[str] = set()
    reported = False

    def open_one() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError, ConnectionError):
            s.send(requests)
        selector.register(s, selectors.EVENT_READ)

    for _ in range(connections):
        open_one()
    while True:
        for key, _ in selector.select(1.0):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(65536)
            except (BlockingIOError, ConnectionError):
                data = b""
            if data:
                for line in data.splitlines():
                    with contextlib.suppress(ValueError):
                        seen.add(str(json.loads(line).get("error")))
                if not reported and {"busy", "rate limited"} <= seen:
                    os.write(report, b"saturated\n")
                    reported = True
                continue
            selector.unregister(s)
            s.close()
            open_one()


def test_one_user_flooding_the_socket_cannot_deny_another_users_launch(
    running_agent: Any, clients: FakeClients
) -> None:
    """Before, one bucket and a 32-connection cap were shared by all users: `nobody` holding 40
    connections and sending as fast as it can made every launch `busy` or `rate limited`."""
    client = clients.binary(CLIENT)
    read_end, write_end = os.pipe()
    flooder = os.fork()
    if flooder == 0:
        try:
            os.close(read_end)
            flood(running_agent.socket, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as r:
            assert r.readline() == b"saturated\n", "the flood did not reach the limits"
            took = []
            for _ in range(3):
                started = time.monotonic()
                done = launch(running_agent.socket, str(client), "-c", "exit 3")
                took.append(time.monotonic() - started)
                assert done.returncode == 3, done.stderr
        print(f"launch during the flood: {', '.join(f'{t:.2f}' for t in took)} s")
    finally:
        os.kill(flooder, signal.SIGKILL)
        os.waitpid(flooder, 0)
    assert running_agent.proc.poll() is None


def test_budgets_are_per_uid_and_bounded() -> None:
    clock = [0.0]
    budgets = PeerBudgets(rate=1.0, burst=2, max_connections=2, max_uids=2, now=lambda: clock[0])
    assert budgets.open(1000) is None and budgets.open(1000) is None
    assert budgets.open(1000) == "busy"  # its connection cap
    assert budgets.take(1000) and budgets.take(1000) and not budgets.take(1000)
    assert budgets.open(0) is None and budgets.take(0)  # another uid: its own cap and bucket
    budgets.close(1000)
    assert budgets.open(1000) == "rate limited"  # a free slot, but its bucket is empty
    assert budgets.open(2000) == "busy"  # two uids tracked, neither idle with a full bucket
    budgets.close(0)
    assert (
        budgets.open(2000) == "busy"
    )  # uid 0 is idle but its bucket is not full: forgetting it would refill it
    clock[0] += 5
    assert budgets.open(2000) is None and budgets.tracked() == 2  # uid 0 forgotten: it lost nothing
    assert budgets.open(1000) is None  # refilled


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
        assert ok == {"ok": True, "echo": "ping"} and seen[0].uid == 0 and seen[0].pid == os.getpid()
        assert seen[0].start_time is not None  # this very process, identified through its pidfd

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


async def test_the_kernel_reports_the_peers_supplementary_groups(tmp_path: Path) -> None:
    seen: list[Peer] = []

    async def handler(request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        seen.append(peer)
        return {"ok": True}

    public = Path(tempfile.mkdtemp(prefix="cleanroom-sock-"))
    public.chmod(0o755)
    server = LocalSocketServer(public / "s.sock", handler)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.to_thread(wait_for, (public / "s.sock").exists, timeout=5, what="the socket")
        await asyncio.to_thread(
            as_user,
            lambda: LocalSocketClient(public / "s.sock").request({"op": "x"}),
            groups=(USERS_GID, 4242),
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        public.rmdir()
    assert (seen[0].uid, seen[0].gid, sorted(seen[0].groups)) == (NOBODY, NOBODY, [USERS_GID, 4242])


# --- the posture operation: root and the admin group ---------------------------------------------------


def test_posture_is_for_root_and_the_admin_group_only(
    tmp_path: Path, mosquitto: Mosquitto, tap: Tap, agent_factory: Any, public_dir: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('admin_group = "users"\n')
    agent = agent_factory(
        mosquitto.url, socket_path=public_dir / "agent.sock", extra=["--config", str(config)]
    )
    agent.start()
    path = agent.socket

    def ask() -> dict[str, Any]:
        return LocalSocketClient(path).request({"op": "posture"})

    refused = {"ok": False, "error": "posture is for root and the agent's admin_group only"}
    assert as_user(ask) == refused
    assert as_user(ask, groups=(4242,)) == refused
    assert as_user(ask, groups=(USERS_GID,))["posture"]["agent_id"] == "ep-1"  # a supplementary group
    assert as_user(ask, gid=USERS_GID)["posture"]["agent_id"] == "ep-1"  # the primary group
    assert ask()["ok"] is True  # root


def test_without_an_admin_group_posture_is_for_root_only(running_agent: Any) -> None:
    path = running_agent.socket

    def ask() -> dict[str, Any]:
        return LocalSocketClient(path).request({"op": "posture"})

    assert as_user(ask, gid=USERS_GID, groups=(USERS_GID, 0))["ok"] is False
    assert ask()["ok"] is True


def test_may_read_posture() -> None:
    assert may_read_posture(Peer(1, 0, 0), None)
    assert not may_read_posture(Peer(1, 1000, 100, (100,)), None)
    assert may_read_posture(Peer(1, 1000, 100), 100) and may_read_posture(Peer(1, 1000, 5, (7, 100)), 100)
    assert not may_read_posture(Peer(1, 1000, 5, (7,)), 100)


def test_an_unknown_admin_group_stops_the_agent_with_a_clear_error(
    tmp_path: Path, mosquitto: Mosquitto, agent_factory: Any
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('admin_group = "no-such-group-here"\n')
    agent = agent_factory(mosquitto.url, extra=["--config", str(config)])
    done = subprocess.run(agent.argv(), capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "admin_group 'no-such-group-here': no such group" in done.stderr and "Traceback" not in done.stderr
