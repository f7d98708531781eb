"""Session finding and diffing (pure), and ending real process trees (real processes, real signals).

A VDI client is simulated by a copy of a real binary named like a client (`xfreerdp`): the kernel
reports the copy's name, exactly as for the real client.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cleanroom_agent import (
    ProcessSnapshot,
    PsutilProcessTable,
    PsutilTreeEnder,
    diff_sessions,
    find_sessions,
    session_id,
)
from cleanroom_agent.observing.posture import find_denied
from tests.support.wait import wait_for

CLIENTS = ["xfreerdp", "remote-viewer", "a-very-long-client-name"]


def snap(pid: int, ppid: int, name: str, ctime: float = 100.0, exe: str | None = None) -> ProcessSnapshot:
    return ProcessSnapshot(pid=pid, ppid=ppid, name=name, exe_name=exe, create_time=ctime, user="alice")


def test_a_client_and_its_descendants_form_one_session() -> None:
    procs = [
        snap(1, 0, "init"),
        snap(10, 1, "bash"),
        snap(20, 10, "xfreerdp", 123.4567),
        snap(21, 20, "helper"),
        snap(22, 21, "xfreerdp"),  # a client started by a client belongs to the outer session
        snap(30, 1, "remote-viewer", 200.0),
        snap(40, 1, "a-very-long-cli"),  # comm is cut at 15 characters
        snap(50, 1, "python3", exe="remote-viewer"),  # matched by executable name
    ]
    sessions = find_sessions(procs, CLIENTS, launched={session_id(30, 200.0)})
    assert [(s.pid, s.client) for s in sessions] == [
        (20, "xfreerdp"),
        (30, "remote-viewer"),
        (40, "a-very-long-client-name"),
        (50, "remote-viewer"),
    ]
    first = sessions[0]
    assert first.id == "s-20-123456" and first.pids == [20, 21, 22] and first.user == "alice"
    assert [s.launched for s in sessions] == [False, True, False, False]


def test_diff_reports_started_and_ended() -> None:
    before = find_sessions([snap(20, 1, "xfreerdp"), snap(30, 1, "xfreerdp")], CLIENTS, set())
    after = find_sessions([snap(30, 1, "xfreerdp"), snap(40, 1, "xfreerdp")], CLIENTS, set())
    changes = diff_sessions(before, after)
    assert [s.pid for s in changes.started] == [40]
    assert [s.pid for s in changes.ended] == [20]
    # a reused pid with another create time is another session
    reused = find_sessions([snap(30, 1, "xfreerdp", ctime=999.0)], CLIENTS, set())
    changes = diff_sessions(after, reused)
    assert {s.id for s in changes.started} == {"s-30-999000"}
    assert {s.pid for s in changes.ended} == {30, 40}


@pytest.fixture
def client_binary(tmp_path: Path) -> Path:
    """/bin/bash copied under a VDI client's name, so it can start a tree of children."""
    path = tmp_path / "xfreerdp"
    shutil.copy("/bin/bash", path)
    return path


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:  # a failed test must not leak its tree
            try:
                for child in psutil.Process(p.pid).children(recursive=True):
                    child.kill()
            except psutil.NoSuchProcess:
                pass
            p.kill()
        p.wait()


def _tree(proc: subprocess.Popen[bytes], size: int) -> list[psutil.Process]:
    def ready() -> list[psutil.Process] | None:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        return tree if len(tree) >= size else None

    return wait_for(ready, timeout=5, what=f"a process tree of {size}")


def test_real_tree_is_found_and_ended_with_sigterm(
    client_binary: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    root = subprocess.Popen(
        [str(client_binary), "-c", "sleep 30 & sleep 30 & bash -c 'sleep 30; true' & wait"]
    )
    spawned.append(root)
    tree = _tree(root, 5)
    sessions = wait_for(
        lambda: [
            s for s in find_sessions(PsutilProcessTable().snapshot(), CLIENTS, set()) if s.pid == root.pid
        ],
        timeout=5,
        what="the session in the real process table",
    )
    assert sessions[0].client == "xfreerdp" and set(sessions[0].pids) >= {p.pid for p in tree}
    started = time.monotonic()
    result = PsutilTreeEnder().end_tree(root.pid, sessions[0].started, grace_s=5)
    assert result.ok and set(result.ended) >= {p.pid for p in tree}
    assert time.monotonic() - started < 3  # SIGTERM was enough: no wait for the grace period
    for p in tree:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


def test_a_tree_ignoring_sigterm_is_killed_after_the_grace(
    client_binary: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    root = subprocess.Popen(
        [str(client_binary), "-c", "trap '' TERM; bash -c \"trap '' TERM; sleep 30; true\" & wait"]
    )
    spawned.append(root)
    tree = _tree(root, 3)
    started = time.monotonic()
    result = PsutilTreeEnder().end_tree(root.pid, tree[0].create_time(), grace_s=0.5)
    took = time.monotonic() - started
    assert result.ok, result
    assert 0.5 <= took < 4
    for p in tree:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


def test_a_gone_or_reused_pid_is_not_found(
    client_binary: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    root = subprocess.Popen([str(client_binary), "-c", "sleep 30"])
    spawned.append(root)
    real_ctime = psutil.Process(root.pid).create_time()
    # wrong create time: the pid belongs to another process now, nothing is signalled
    result = PsutilTreeEnder().end_tree(root.pid, real_ctime - 50, grace_s=0.5)
    assert not result.found and root.poll() is None
    root.kill()
    root.wait()
    assert not PsutilTreeEnder().end_tree(root.pid, real_ctime, grace_s=0.5).found


def test_a_process_that_execs_into_a_denied_tool_and_renames_itself_is_still_named_by_its_executable(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """psutil keeps a process's first ``exe`` answer; the table re-reads it. A local user's shell seen once
    as python, then exec'd into a denied tool that set its comm to something harmless, is still denied."""
    tool = tmp_path / "rogue-tool"
    shutil.copy(os.path.realpath(sys.executable), tool)  # a python under the denied name
    rename = (
        "import ctypes, sys; ctypes.CDLL(None).prctl(15, b'innocent', 0, 0, 0); "  # PR_SET_NAME
        "print(1, flush=True); sys.stdin.readline()"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, sys; sys.stdin.readline(); os.execv({str(tool)!r}, ['x', '-c', {rename!r}])",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONHOME": sys.base_prefix},
    )
    spawned.append(proc)
    assert proc.stdin is not None and proc.stdout is not None
    table = PsutilProcessTable()
    before = next(p for p in table.snapshot() if p.pid == proc.pid)
    assert before.exe_name != "rogue-tool" and find_denied([before], ["rogue-tool"]) == []
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"1\n"  # exec'd, renamed
    after = next(p for p in table.snapshot() if p.pid == proc.pid)
    assert after.name == "innocent" and after.exe_name == "rogue-tool"
    assert [d.name for d in find_denied([after], ["rogue-tool"])] == ["rogue-tool"]
