"""Text from endpoints is data, never markup: real `cleanroom-controller` processes on a real controller.db
filled through the real ingest with what a local user on an endpoint can choose (a folder named ``x[/]``,
a session id ``[/]``, markup that hides or recolours, terminal escapes, bidi overrides). Every command exits
0 and shows the text literally; ``--json`` carries it unchanged."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanroom_controller import Store
from cleanroom_protocol import Event, Kind, MountInfo, Policy, Severity

from .helpers import Sender, enrol, posture, session, wired_ingest

CLI = str(Path(sys.executable).parent / "cleanroom-controller")

SESSION_ID = "[/]"
CLIENT = "[red]xfreerdp[/red]\x1b[2J\u202e"
USER = "[hidden]clerk"
MOUNT = "/media/x[/][bold]usb"
PATH = "/home/clerk/x[/]/scrot"
DETAILS = {
    "path": PATH,
    "hidden": "[hidden]secret[/hidden] [link=https://evil.example]click[/link]",
    "escapes": "\x1b[2J\x1b[31mFAKE\x07\r\nrow",
    "bidi": "exe\u202egpj.sh",
}
# How a text cell must show the client: as it is, control and bidi characters as visible escapes.
CLIENT_SHOWN = "[red]xfreerdp[/red]\\x1b[2J\\u202e"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """One enrolled agent whose posture (a hostile session on a hostile removable mount: a violation, so a
    decision to end it) and event went through the real ingest."""
    d = tmp_path / "data"
    store = Store.open(d)
    a1 = Sender("a1")
    enrol(store, "a1", a1.key)
    policy = Policy.model_validate(
        {"id": "no-usb", "version": 1, "compliance": {"allow_removable_mounts": False}}
    )
    ingest = wired_ingest(store, policy)
    hostile = session(SESSION_ID, client=CLIENT).model_copy(update={"user": USER})
    mount = MountInfo(device="/dev/sdb1", mountpoint=MOUNT, fstype="vfat", removable=True, writable=True)
    body = posture(policy=policy, sessions=(hostile,)).model_copy(update={"mounts": [mount]})
    ingest.handle("cleanroom/v1/agents/a1/posture", a1.seal(Kind.POSTURE, body))
    event = Event(
        kind="exec.denied", at=time.time(), severity=Severity.WARNING, blocked=True, details=DETAILS
    )
    ingest.handle("cleanroom/v1/agents/a1/events", a1.seal(Kind.EVENT, event))
    assert [s.id for s in store.sessions()] == [SESSION_ID]
    assert store.decisions(), "the hostile mount made no decision: the watch view would not show one"
    store.close()
    return d


def run_all(commands: list[list[str]], data_dir: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run CLI commands side by side (each a real process), wide enough that no cell is folded."""
    env = {**os.environ, "COLUMNS": "500", "NO_COLOR": "1"}
    procs = [
        subprocess.Popen(
            [CLI, *argv, "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for argv in commands
    ]
    done = []
    for argv, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=30)
        done.append(subprocess.CompletedProcess([*argv], proc.returncode, out, err))
    return done


def test_list_tables_show_endpoint_text_literally(data_dir: Path) -> None:
    commands = [["agents", "list"], ["sessions", "list"], ["events", "list"]]
    results = run_all(commands, data_dir)
    for result in results:
        assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stderr}"
        assert "\x1b" not in result.stdout and "\u202e" not in result.stdout, result.args
    agents, sessions, events = (r.stdout for r in results)
    assert f"removable_mount:{MOUNT}" in agents
    assert f"│ {SESSION_ID} │" in sessions and CLIENT_SHOWN in sessions
    # details are shown as JSON (whose escapes neutralise control characters), markup included as it is
    assert json.dumps(DETAILS, sort_keys=True) in events
    assert PATH in events and "[hidden]secret[/hidden]" in events


def test_json_lines_carry_endpoint_text_unchanged(data_dir: Path) -> None:
    commands = [["agents", "list", "--json"], ["sessions", "list", "--json"], ["events", "list", "--json"]]
    agents, sessions, events = (
        [json.loads(line) for line in r.stdout.splitlines()] for r in run_all(commands, data_dir)
    )
    assert f"removable_mount:{MOUNT}" in agents[0]["reasons"]
    assert (sessions[0]["id"], sessions[0]["client"], sessions[0]["user"]) == (SESSION_ID, CLIENT, USER)
    assert events[0]["details"] == DETAILS


@contextlib.contextmanager
def on_a_terminal(argv: list[str], *, columns: int = 400) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``argv`` with a pseudo-terminal as stdout/stderr (as an operator runs ``watch``)."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 60, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env=env, start_new_session=True)
    os.close(child)
    try:
        yield proc, parent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(parent)


def read_until(fd: int, proc: subprocess.Popen[bytes], done: list[bytes], *, timeout: float) -> bytes:
    """What ``proc`` wrote to the terminal until it contains every one of ``done`` (or it exits)."""
    out = b""
    deadline = time.monotonic() + timeout
    while not all(d in out for d in done):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {done} on the terminal; got:\n{out.decode(errors='replace')}"
            )
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
        elif proc.poll() is not None:
            break
    return out


def read_to_exit(fd: int, proc: subprocess.Popen[bytes], *, timeout: float) -> bytes:
    """What ``proc`` writes to the terminal until it exits."""
    out = b""
    deadline = time.monotonic() + timeout
    while proc.poll() is None or select.select([fd], [], [], 0)[0]:
        if time.monotonic() > deadline:
            raise AssertionError(f"still running after {timeout} s:\n{out.decode(errors='replace')}")
        if select.select([fd], [], [], 0.1)[0]:
            try:
                out += os.read(fd, 65536)
            except OSError:  # EIO: nothing more to read
                break
    return out


def test_watch_shows_endpoint_text_literally_on_a_terminal(data_dir: Path) -> None:
    expected = [s.encode() for s in (f"end_session:{SESSION_ID}", CLIENT_SHOWN, f"removable_mount:{MOUNT}")]
    argv = [CLI, "watch", "--interval", "0.2", "--data-dir", str(data_dir)]
    with on_a_terminal(argv) as (proc, terminal):
        shown = read_until(terminal, proc, expected, timeout=20)
        assert proc.poll() is None, f"watch exited {proc.returncode}:\n{shown.decode(errors='replace')}"
        more = read_until(terminal, proc, [b"last decisions"], timeout=10)  # a refresh rendered it again
        os.killpg(proc.pid, signal.SIGINT)
        shown += more + read_to_exit(terminal, proc, timeout=10)
        assert proc.wait(timeout=10) == 0, shown.decode(errors="replace")
    for text in expected:
        assert text in shown
    assert b"\x1b[2J" not in shown and "\u202e".encode() not in shown
