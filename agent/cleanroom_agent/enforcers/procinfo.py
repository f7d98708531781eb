"""Who is a process: its name and whether it belongs to a VDI client session (it or an ancestor is a
configured client). Reads /proc through psutil; bounded ancestor walk."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

_MAX_DEPTH = 32


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int | None
    name: str | None
    in_session: bool
    session_client: str | None = None


def identify(pid: int | None, clients: frozenset[str]) -> ProcessIdentity:
    if pid is None:
        return ProcessIdentity(None, None, False)
    try:
        proc: psutil.Process | None = psutil.Process(pid)
        name = proc.name() if proc else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ProcessIdentity(pid, None, False)
    depth = 0
    while proc is not None and depth < _MAX_DEPTH:
        try:
            candidate = proc.name()
            if candidate in clients:
                return ProcessIdentity(pid, name, True, candidate)
            proc = proc.parent()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            break
        depth += 1
    return ProcessIdentity(pid, name, False)
