"""The session lifecycle as pure bookkeeping: which sessions the agent knows, in which state, what to report.

Per session id (``s-{pid}-{create_time_ms}``, see sessions.py) one state::

    launch allowed ──▶ pending_launch ──found──▶ running ──not found──▶ exited
                             │                   │    ▲
                  settled, not the client    end begun  survivors
                             ▼                   ▼    │
                     (registration dropped)      ending ──tree gone──▶ ended_by_us
                                                        └─gone before the end─▶ exited

A client started without the gate enters at ``running`` when a digest first finds it. ``exited`` and
``ended_by_us`` are final: such an id is never reported again, even if a snapshot taken before it ended is
digested afterwards. A session being ended is neither reported nor judged: the end reports it.

Nothing here does I/O, keeps time or emits: :meth:`SessionBook.digest` takes what a process snapshot showed
and returns the facts to report (sessions started, sessions exited, denied processes seen for the first
time); the observer reports them. Memory is bounded: final ids are remembered up to ``max_final`` (oldest
forgotten first), pending launches up to ``max_pending`` (oldest dropped first), denied processes only while
they run, and the running sessions are those of the process table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cleanroom_protocol import ProcessInfo, SessionInfo

MAX_FINAL_IDS = 10_000
# Registrations the gate settles are gone within seconds; one that outlives its settle (the client ran and
# exited between two observes, unseen) waits here until it is the oldest beyond this bound.
MAX_PENDING_IDS = 10_000


class SessionState(StrEnum):
    PENDING_LAUNCH = (
        "pending_launch"  # allowed by the gate; the asking process has not been found as a client
    )
    RUNNING = "running"
    ENDING = "ending"  # the agent is ending its process tree
    ENDED_BY_US = "ended_by_us"
    EXITED = "exited"  # gone by itself (or found gone when the agent came to end it)


_FINAL = (SessionState.ENDED_BY_US, SessionState.EXITED)


@dataclass(slots=True)
class _Live:
    state: SessionState  # PENDING_LAUNCH, RUNNING or ENDING
    info: SessionInfo | None  # as last found; None until then
    launched: bool  # registered through the gate (and not dropped since)


@dataclass(frozen=True, slots=True)
class Digest:
    """What one process snapshot changed, to report, and the sessions the posture names."""

    running: list[SessionInfo] = field(default_factory=list)  # found, and not being ended or over
    started: list[SessionInfo] = field(default_factory=list)  # report ``session.started``
    exited: list[SessionInfo] = field(default_factory=list)  # report ``session.ended`` (reason ``exited``)
    denied_new: list[ProcessInfo] = field(default_factory=list)  # report ``process.denied_running``


class SessionBook:
    """Per session id its state; the only owner of what the agent believes about its sessions."""

    def __init__(self, *, max_final: int = MAX_FINAL_IDS, max_pending: int = MAX_PENDING_IDS) -> None:
        if max_final < 1 or max_pending < 1:
            raise ValueError("SessionBook: max_final and max_pending must be at least 1")
        self._max_final = max_final
        self._max_pending = max_pending
        self._live: dict[str, _Live] = {}
        self._final: dict[str, SessionState] = {}  # insertion order: the oldest is forgotten first
        self._denied_seen: set[tuple[int, str]] = set()

    # --- queries ---------------------------------------------------------------------------------------
    def state(self, sid: str) -> SessionState | None:
        """The state of ``sid``; ``None`` if never known, dropped or forgotten."""
        live = self._live.get(sid)
        return live.state if live is not None else self._final.get(sid)

    def launched_ids(self) -> set[str]:
        """Sessions registered through the gate: what :func:`sessions.find_sessions` marks ``launched``."""
        return {sid for sid, live in self._live.items() if live.launched}

    def running(self) -> list[SessionInfo]:
        """Running sessions as last found, in process order (the posture's and the targets' list)."""
        found = [
            live.info
            for live in self._live.values()
            if live.state is SessionState.RUNNING and live.info is not None
        ]
        return sorted(found, key=lambda s: (s.pid, s.started))

    @property
    def pending_launches(self) -> int:
        return sum(1 for live in self._live.values() if live.state is SessionState.PENDING_LAUNCH)

    # --- the gate ----------------------------------------------------------------------------------------
    def register_launch(self, sid: str) -> None:
        """The gate allowed a launch by the process ``sid`` names: it is a session once found as the client."""
        if sid in self._final:
            return  # that very process is over: it cannot be asking
        live = self._live.get(sid)
        if live is not None:
            live.launched = True  # a session asking again: it passed the gate now
            return
        self._live[sid] = _Live(SessionState.PENDING_LAUNCH, None, launched=True)
        pending = [s for s, live in self._live.items() if live.state is SessionState.PENDING_LAUNCH]
        for stale in pending[: max(0, len(pending) - self._max_pending)]:
            del self._live[stale]

    def settle_launch(self, sid: str, *, running_client: bool) -> bool:
        """The gate's deadline for ``sid`` to exec the client passed. If it does not run the client, its
        registration is dropped (a later exec of the client is a session that never passed the gate).
        Returns True when a registration was dropped."""
        live = self._live.get(sid)
        if running_client or live is None or not live.launched:
            return False
        if live.state is SessionState.PENDING_LAUNCH:
            del self._live[sid]
        else:
            live.launched = False
        return True

    # --- snapshots ---------------------------------------------------------------------------------------
    def digest(self, found: Sequence[SessionInfo], denied: Sequence[tuple[ProcessInfo, float]]) -> Digest:
        """Take one snapshot's sessions (found with :meth:`launched_ids`) and its denied processes, each
        with its create time; return what to report. Snapshots must be digested in the order taken."""
        running: list[SessionInfo] = []
        started: list[SessionInfo] = []
        seen: set[str] = set()
        for s in found:
            live = self._live.get(s.id)
            if s.id in self._final or (live is not None and live.state is SessionState.ENDING):
                continue  # being ended or over: the end reports it, an older snapshot cannot revive it
            seen.add(s.id)
            running.append(s)
            if live is None:
                self._live[s.id] = _Live(SessionState.RUNNING, s, launched=s.launched)
                started.append(s)
                continue
            if live.state is SessionState.PENDING_LAUNCH:
                live.state = SessionState.RUNNING
                started.append(s)
            live.info = s
        exited: list[SessionInfo] = []
        for sid, live in list(self._live.items()):
            if live.state is SessionState.RUNNING and sid not in seen:
                assert live.info is not None  # running means found
                exited.append(live.info)
                self._finish(sid, SessionState.EXITED)
        current: set[tuple[int, str]] = set()
        denied_new: list[ProcessInfo] = []
        for info, create_time in denied:
            key = (info.pid, f"{create_time:.3f}")
            current.add(key)
            if key not in self._denied_seen:
                denied_new.append(info)
        self._denied_seen = current  # first sight only: forget processes that are gone
        return Digest(running=running, started=started, exited=exited, denied_new=denied_new)

    # --- ending ------------------------------------------------------------------------------------------
    def begin_end(self, session: SessionInfo) -> bool:
        """The agent is about to end ``session``'s tree. Marked before the kill, so a probe digested
        meanwhile does not report it as exited. False when it is already over (nothing left to end)."""
        if session.id in self._final:
            return False
        live = self._live.get(session.id)
        if live is None:
            self._live[session.id] = _Live(SessionState.ENDING, session, launched=session.launched)
        else:
            live.state = SessionState.ENDING
            live.info = live.info or session
        return True

    def end_failed(self, sid: str) -> None:
        """The end left survivors: the session runs on (and will be reported ended once it is)."""
        live = self._live.get(sid)
        if live is not None and live.state is SessionState.ENDING:
            live.state = SessionState.RUNNING

    def end_done(self, sid: str, *, found: bool) -> SessionState:
        """The tree is gone; ``found`` False when it was gone before the agent came (it exited itself)."""
        final = SessionState.ENDED_BY_US if found else SessionState.EXITED
        self._finish(sid, final)
        return final

    def _finish(self, sid: str, final: SessionState) -> None:
        assert final in _FINAL
        self._live.pop(sid, None)
        self._final.pop(sid, None)
        self._final[sid] = final
        while len(self._final) > self._max_final:
            del self._final[next(iter(self._final))]
