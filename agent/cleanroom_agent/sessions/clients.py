"""VDI client sessions: found by pure diffing of process snapshots, ended as process trees.

A session is a running process whose executable name is in ``policy.sessions.clients``; its tree is the
process and its descendants. Its id ``s-{pid}-{create_time_ms}`` is stable across agent restarts and
cannot be confused with a later process that reuses the pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from cleanroom_protocol import SessionInfo

from .vdiargs import KNOWN_CLIENTS, parse_client_args


@dataclass(frozen=True, slots=True)
class ProcessSnapshot:
    """What the agent needs to know about one process (taken with psutil, or made up in tests)."""

    pid: int
    ppid: int
    name: str  # the kernel's comm (truncated to 15 chars)
    exe_name: str | None  # basename of the executable, when readable
    create_time: float
    user: str | None = None
    # Read for VDI clients only (vdiargs.KNOWN_CLIENTS): what the session connects to comes from it.
    cmdline: tuple[str, ...] = ()

    def names(self) -> set[str]:
        return {self.name} | ({self.exe_name} if self.exe_name else set())


def session_id(pid: int, create_time: float) -> str:
    return f"s-{pid}-{int(create_time * 1000)}"


def client_name(proc: ProcessSnapshot, clients: Iterable[str]) -> str | None:
    """Which configured client this process is, if any (comm or executable basename)."""
    names = proc.names()
    for client in clients:
        # comm is cut at 15 characters: a long client name matches its truncated form too.
        if client in names or client[:15] == proc.name:
            return client
    return None


def find_sessions(
    procs: Sequence[ProcessSnapshot], clients: Sequence[str], launched: set[str]
) -> list[SessionInfo]:
    """Sessions in a snapshot. A client started by another client (a helper process) belongs to the outer
    session rather than being a session of its own."""
    by_pid = {p.pid: p for p in procs}
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    client_of = {p.pid: c for p in procs if (c := client_name(p, clients)) is not None}

    def has_client_ancestor(pid: int) -> bool:
        seen: set[int] = set()
        parent = by_pid[pid].ppid
        while parent in by_pid and parent not in seen:
            if parent in client_of:
                return True
            seen.add(parent)
            parent = by_pid[parent].ppid
        return False

    sessions = []
    for pid, client in sorted(client_of.items()):
        if has_client_ancestor(pid):
            continue
        proc = by_pid[pid]
        sid = session_id(pid, proc.create_time)
        target = parse_client_args(client, proc.cmdline)
        sessions.append(
            SessionInfo(
                id=sid,
                client=client,
                pid=pid,
                pids=descendants(pid, children)[:4096],
                started=proc.create_time,
                user=proc.user,
                launched=sid in launched,
                desktop_address=target.address,
                desktop_user=target.user,
                desktop_name=target.desktop_name,
            )
        )
    return sessions


def descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
    """``pid`` and every descendant, parents first."""
    out, stack, seen = [], [pid], set()
    while stack:
        current = stack.pop(0)
        if current in seen:
            continue
        seen.add(current)
        out.append(current)
        stack.extend(sorted(children.get(current, [])))
    return out


@dataclass(frozen=True, slots=True)
class SessionChanges:
    started: list[SessionInfo] = field(default_factory=list)
    ended: list[SessionInfo] = field(default_factory=list)


def diff_sessions(before: Sequence[SessionInfo], after: Sequence[SessionInfo]) -> SessionChanges:
    old = {s.id: s for s in before}
    new = {s.id: s for s in after}
    return SessionChanges(
        started=[s for sid, s in new.items() if sid not in old],
        ended=[s for sid, s in old.items() if sid not in new],
    )


# --- I/O: reading processes and ending trees -------------------------------------------------------


class ProcessTable(Protocol):
    def snapshot(self) -> list[ProcessSnapshot]: ...


def read_exe(pid: int) -> str | None:
    """The path of ``pid``'s executable, read now (``None``: a kernel thread, or gone). Not psutil's
    ``exe``: psutil keeps its first answer for the life of the process, so a process that exec'd since (a
    shell that became a denied tool, then renamed its comm) would keep the name it had. /proc is not
    user-writable, and readlink follows nothing."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return exe.removesuffix(" (deleted)") or None


class PsutilProcessTable:
    """The real process table."""

    def snapshot(self) -> list[ProcessSnapshot]:
        out = []
        for proc in psutil.process_iter(["pid", "ppid", "name", "create_time", "username"]):
            info = proc.info
            try:
                exe = read_exe(int(info["pid"]))
                name = str(info.get("name") or "")
                exe_name = os.path.basename(exe) if exe else None
                cmdline: tuple[str, ...] = ()
                if name in KNOWN_CLIENTS or exe_name in KNOWN_CLIENTS:
                    with contextlib.suppress(psutil.Error):
                        cmdline = tuple(proc.cmdline())
                out.append(
                    ProcessSnapshot(
                        pid=int(info["pid"]),
                        ppid=int(info.get("ppid") or 0),
                        name=name,
                        exe_name=exe_name,
                        create_time=float(info.get("create_time") or 0.0),
                        user=info.get("username"),
                        cmdline=cmdline,
                    )
                )
            except (TypeError, ValueError):
                continue
        return out


@dataclass(frozen=True, slots=True)
class EndResult:
    ended: list[int]  # pids verified gone
    survivors: list[int]  # pids still alive after SIGKILL
    found: bool  # was the session's root process there at all

    @property
    def ok(self) -> bool:
        return self.found and not self.survivors


class TreeEnder(Protocol):
    def end_tree(self, pid: int, create_time: float, grace_s: float) -> EndResult: ...


def _gone(proc: psutil.Process) -> bool:
    # A zombie is dead: it only waits for its parent to reap it (which may not be us).
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    # psutil.wait_procs reaps our own children; for the others it polls existence, where a zombie
    # still "exists": check status too, so a tree whose parent has not reaped it yet counts as gone.
    _, alive = psutil.wait_procs(procs, timeout=0)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in alive if not _gone(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


class PsutilTreeEnder:
    """SIGTERM the tree, wait the grace period, SIGKILL what is left, verify everything is gone."""

    def end_tree(self, pid: int, create_time: float, grace_s: float) -> EndResult:
        try:
            root = psutil.Process(pid)
            if abs(root.create_time() - create_time) > 0.01:
                return EndResult([], [], found=False)  # the pid now belongs to another process
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return EndResult([], [], found=False)
        pids = [p.pid for p in tree]
        self._signal(tree, signal.SIGTERM)
        alive = _wait_gone(tree, grace_s)
        if alive:
            # Children forked during the grace period are ended too.
            extra = []
            for p in list(alive):
                with contextlib.suppress(psutil.NoSuchProcess):
                    extra.extend(p.children(recursive=True))
            alive = list({p.pid: p for p in [*alive, *extra]}.values())
            pids.extend(p.pid for p in extra if p.pid not in pids)
            self._signal(alive, signal.SIGKILL)
            alive = _wait_gone(alive, 2.0)
        survivors = [p.pid for p in alive]
        return EndResult([p for p in pids if p not in survivors], survivors, found=True)

    @staticmethod
    def _signal(procs: list[psutil.Process], sig: signal.Signals) -> None:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
