"""Process events that make the agent re-observe at once instead of at its next poll.

The kernel's proc connector announces every exec and every process exit (``enforcers/procconn.py``). The
agent does not re-read the process table for each: most execs on a desktop are of no interest to a posture.
An exec matters when the new image carries a name the policy cares about (``processes.deny``,
``sessions.clients``, matched as :func:`posture.find_denied` and :func:`sessions.client_name` match them)
or replaces a process the posture already tracks; an exit matters when it ends a tracked process (a
session's client, a denied process). That check costs two small /proc reads per exec in the reader
thread (about 10 µs) where a full observe reads every process (about 65 µs per process, 5 ms for 80):
filtering keeps an exec-heavy minute (a build, a login script) from turning into back-to-back observes.

Bursts are coalesced (:class:`ObserveCoalescer`, pure): the first interesting event asks for an observe
after a short settle time, later ones ride on it, and full observes draw on a token bucket (a few at once,
then ``rate_per_s``), so a storm of interesting execs costs a bounded share of a core while an isolated
event is never held back by the rate. A lost notification (ENOBUFS,
the kernel's queue overflowed) asks for an immediate full observe: it may have hidden anything.

Pieces: :class:`Interest` and :class:`ObserveCoalescer` decide (no I/O); :class:`ProcConnectorEvents` is
the real source (a thread on a filtered netlink socket); :class:`ProcessEventsOff` is the source when
events are switched off. Without a source the agent's periodic poll is what finds processes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cleanroom_protocol import ProcessInfo, SessionInfo

from ..enforcers.procconn import RECV_BYTES, ProcEvent, open_proc_connector, parse_proc_events
from ..sessions.clients import ProcessSnapshot, client_name, read_exe
from .posture import find_denied

SETTLE_S = 0.010  # a shell pipeline's execs land within a few ms: one observe for the burst
RATE_PER_S = 10.0  # sustained full observes a second under a storm of interesting events (~10 % of a core)
BURST = 3  # observes allowed back to back before the rate applies (a session start, then a denied exec)
MAX_TRACKED_PIDS = 4096  # sessions (≤ 256) and denied processes (≤ 1024) as reported, with room
RCVBUF_BYTES = 1 << 20  # ~13,000 filtered events queued before the kernel drops (then: a full observe)
_COMM_BYTES = 64  # comm is at most 16 bytes; read a little more to see the newline


class ProcessEventsUnavailable(Exception):
    """No process events (not root, a kernel without the proc connector, switched off); says why."""


# --- decisions (pure) --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Interest:
    """What makes a process event worth an observe: names the policy names, pids the posture tracks."""

    deny: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    pids: frozenset[int] = frozenset()

    def wants_exec(self, pid: int, names: tuple[str, str | None] | None) -> bool:
        """An exec of ``pid`` whose new image is ``(comm, exe basename)``; ``None``: it is already gone."""
        if pid in self.pids:
            return True  # a tracked process became something else
        if names is None:
            return False  # exited before we looked: there is nothing left to observe
        comm, exe_name = names
        snapshot = ProcessSnapshot(pid=pid, ppid=0, name=comm, exe_name=exe_name, create_time=0.0)
        return bool(find_denied([snapshot], self.deny)) or client_name(snapshot, self.clients) is not None

    def wants_exit(self, pid: int) -> bool:
        return pid in self.pids


def interest_for(
    deny: Iterable[str],
    clients: Iterable[str],
    sessions: Iterable[SessionInfo],
    denied: Iterable[ProcessInfo],
) -> Interest:
    """The interest after an observe: the policy's names, each session's client and each denied process."""
    pids = {s.pid for s in sessions} | {d.pid for d in denied}
    return Interest(tuple(deny), tuple(clients), frozenset(sorted(pids)[:MAX_TRACKED_PIDS]))


@dataclass(slots=True)
class ObserveCoalescer:
    """When an observe is owed because of process events, and when to run it.

    ``event(now)`` and ``observed(started, now)`` return the delay after which to run one (arm a timer),
    or ``None`` when one is already armed or nothing is owed; ``fired()`` says an armed timer ran and
    whether the observe is still owed (another observe may have covered the events meanwhile). An observe
    covers the events before its snapshot started; events during it stay owed. Every full observe (whoever
    asked for it) takes a token from a bucket of ``burst`` refilled at ``rate_per_s``; an owed observe
    waits for a token.
    """

    settle_s: float = SETTLE_S
    rate_per_s: float = RATE_PER_S
    burst: int = BURST
    owed: bool = False
    armed: bool = False
    last_event: float = float("-inf")
    last_started: float = float("-inf")
    tokens: float = field(init=False)
    refilled: float = float("-inf")

    def __post_init__(self) -> None:
        if self.settle_s < 0 or self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError("ObserveCoalescer: settle_s >= 0, rate_per_s > 0 and burst >= 1 are required")
        self.tokens = float(self.burst)

    def event(self, now: float) -> float | None:
        self.last_event = max(self.last_event, now)
        self.owed = True
        return self._arm(now)

    def fired(self) -> bool:
        self.armed = False
        return self.owed

    def observed(self, started: float, now: float) -> float | None:
        self._refill(started)
        self.tokens = max(self.tokens - 1.0, 0.0)
        self.last_started = max(self.last_started, started)
        if self.owed and self.last_event < started:
            self.owed = False
        return self._arm(now) if self.owed else None

    def _refill(self, now: float) -> None:
        if now > self.refilled:
            elapsed = now - self.refilled
            self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate_per_s)
            self.refilled = now

    def _arm(self, now: float) -> float | None:
        if self.armed:
            return None
        self.armed = True
        self._refill(now)
        wait_for_token = max(0.0, (1.0 - self.tokens) / self.rate_per_s)
        return max(self.settle_s, wait_for_token)


# --- sources -----------------------------------------------------------------------------------------------
class ProcessEventSource(Protocol):
    """Calls ``wake`` (from any thread) after an interesting process event, at most once until ``rearm``."""

    def start(self, wake: Callable[[], None]) -> None:
        """Begin watching; raises :class:`ProcessEventsUnavailable` naming why it cannot."""
        ...

    def set_interest(self, interest: Interest) -> None: ...

    def rearm(self) -> None:
        """The last wake was taken: wake again on the next interesting event."""
        ...

    @property
    def failure(self) -> str | None:
        """Why a started source stopped delivering (then the poll must carry posture), else ``None``."""
        ...

    def stop(self) -> None: ...


@dataclass
class ProcessEventsOff:
    """No process events: ``start`` says why (the settings switched them off)."""

    reason: str = "switched off in the settings (process_events = false)"

    def start(self, wake: Callable[[], None]) -> None:
        raise ProcessEventsUnavailable(self.reason)

    def set_interest(self, interest: Interest) -> None:
        pass

    def rearm(self) -> None:
        pass

    @property
    def failure(self) -> str | None:
        return None

    def stop(self) -> None:
        pass


def read_names(pid: int) -> tuple[str, str | None] | None:
    """``(comm, exe basename)`` of a live process, ``None`` if it is gone. /proc is not user-writable."""
    try:
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        comm = os.read(fd, _COMM_BYTES).rstrip(b"\n").decode("utf-8", "replace")
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    exe = read_exe(pid)  # None: a kernel thread, or gone meanwhile (the comm still names it)
    return comm, (os.path.basename(exe) if exe else None)


@dataclass
class ProcConnectorEvents:
    """The real source: a thread reading exec and process-exit events from a filtered proc-connector socket.

    Counters (read by benchmarks and tests): ``execs``/``exits`` seen, ``wakes`` given, ``lost`` (ENOBUFS).
    """

    names_of: Callable[[int], tuple[str, str | None] | None] = read_names
    rcvbuf: int = RCVBUF_BYTES
    execs: int = 0
    exits: int = 0
    wakes: int = 0
    lost: int = 0
    _interest: Interest = field(default_factory=Interest)
    _latched: bool = False
    _failure: str | None = None
    _wake: Callable[[], None] | None = None
    _thread: threading.Thread | None = None
    _stop_w: int = -1

    def start(self, wake: Callable[[], None]) -> None:
        try:
            sock = open_proc_connector(exec_events=True, exit_events=True, rcvbuf=self.rcvbuf)
        except OSError as exc:
            raise ProcessEventsUnavailable(f"proc connector: {exc.strerror or exc}") from exc
        stop_r, self._stop_w = os.pipe()
        self._wake = wake
        self._thread = threading.Thread(
            target=self._run, args=(sock, stop_r), name="process-events", daemon=True
        )
        self._thread.start()

    def set_interest(self, interest: Interest) -> None:
        self._interest = interest  # one reference swap: the reader thread sees the old or the new

    def rearm(self) -> None:
        self._latched = False

    @property
    def failure(self) -> str | None:
        return self._failure

    def stop(self) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._stop_w)
        self._thread = None

    def _signal(self) -> None:
        if self._latched:
            return
        self._latched = True
        self.wakes += 1
        assert self._wake is not None
        self._wake()

    def _interesting(self, event: ProcEvent) -> bool:
        interest = self._interest
        if event.is_exec:
            self.execs += 1
            if self._latched:
                return False  # an observe is already on its way and will see this process
            return interest.wants_exec(event.tgid, self.names_of(event.tgid))
        if event.is_process_exit:
            self.exits += 1
            return interest.wants_exit(event.tgid)
        return False

    def _run(self, sock: socket.socket, stop_r: int) -> None:
        try:
            while True:
                ready, _, _ = select.select([sock.fileno(), stop_r], [], [])
                if stop_r in ready:
                    return
                try:
                    data = sock.recv(RECV_BYTES)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self.lost += 1  # the kernel dropped events: anything may have happened
                    self._signal()
                    continue
                for event in parse_proc_events(data):
                    if self._interesting(event):
                        self._signal()
        except Exception as exc:  # never end silently: the agent falls back to its poll
            self._failure = f"process events stopped: {exc!r}"[:500]
            self._latched = False
            with contextlib.suppress(Exception):
                self._signal()
        finally:
            sock.close()
            os.close(stop_r)
