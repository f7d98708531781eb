"""The local launch gate: the requests of the launch socket (localsock.py) judged and answered.

``launch`` judges a fresh posture and, if allowed, registers the asking process itself as the pending
session of the client; ``launch_check`` only judges; ``posture`` is for root and the admin group. The
protocol and who may ask what are documented in localsock.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
import structlog

from cleanroom_protocol import Mode, Severity

from ..decisions import LaunchDecision, PolicyInForce, launch_decision
from ..enforcers import client_clipboard_off
from ..messaging.reporting import EventSink
from ..observing.observer import Observation
from .book import SessionBook
from .clients import ProcessSnapshot, client_name, session_id
from .localsock import PENDING_EXEC_S, Peer, may_read_posture

log = structlog.get_logger("cleanroom_agent.sessions.gate")

# Settle timers outstanding at once: what a flood of allowed launches can hold (each uid is also rate-bounded).
MAX_PENDING_LAUNCHES = 1024


def runs_client(pid: int, start_time: float, client: str) -> bool:
    """Is the process ``pid`` started at ``start_time`` running ``client`` now (comm or executable)?"""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            exe = proc.exe()
            snapshot = ProcessSnapshot(
                pid=pid,
                ppid=proc.ppid(),
                name=proc.name(),
                exe_name=os.path.basename(exe) if exe else None,
                create_time=proc.create_time(),
            )
        return snapshot.create_time == start_time and client_name(snapshot, [client]) is not None
    except psutil.Error:
        return False


class LaunchGate:
    """Answers the launch socket. ``observe`` reads the host now; registrations go to the session book and
    are settled ``PENDING_EXEC_S`` later with ``runs_client``."""

    def __init__(
        self,
        *,
        mode: Mode,
        admin_gid: int | None,
        in_force: Callable[[], PolicyInForce],
        offline_since: Callable[[], float | None],
        observe: Callable[[], Awaitable[Observation]],
        book: SessionBook,
        events: EventSink,
        runs_client: Callable[[int, float, str], bool] = runs_client,
    ) -> None:
        self._mode = mode
        self._admin_gid = admin_gid
        self._in_force = in_force
        self._offline_since = offline_since
        self._observe = observe
        self._book = book
        self._events = events
        self._runs_client = runs_client
        # Launches answered but not yet seen running their client: session id -> the check that drops it.
        self._pending_launches: dict[str, asyncio.TimerHandle] = {}

    def _client_args(self, client: str) -> list[str]:
        """Arguments that switch the VDI client's own clipboard redirection off (a second layer under the
        X11 guard), when the policy blocks the clipboard and the agent enforces."""
        clipboard = self._in_force().effective.clipboard
        if (
            self._mode is not Mode.ENFORCE
            or clipboard.mode == "allow"
            or not clipboard.disable_client_redirection
        ):
            return []
        return list(client_clipboard_off(client).args)

    async def handle_local(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        op = request["op"]
        if op in ("launch", "launch_check"):
            client = request.get("client")
            if not isinstance(client, str) or not client or len(client) > 255 or "/" in client:
                return {"ok": False, "error": "client must be an executable name"}
            if op == "launch_check":  # read-only: nothing registered, no event
                decision = await self._launch_decision(client)
                return self._launch_answer(client, decision)
            return await self._launch(client, peer)
        if op == "register":
            return {
                "ok": False,
                "error": "register is refused: a client started before it is registered never passed the "
                'gate; use {"op": "launch"} (cleanroom-agent launch), which registers the asking process',
            }
        if op == "posture":
            if not may_read_posture(peer, self._admin_gid):
                return {"ok": False, "error": "posture is for root and the agent's admin_group only"}
            obs = await self._observe()
            return {"ok": True, "posture": obs.posture.model_dump(mode="json")}
        return {"ok": False, "error": f"unknown op {op[:64]!r}"}

    async def _launch_decision(self, client: str) -> LaunchDecision:
        obs = await self._observe()
        return launch_decision(
            posture=obs.posture,
            in_force=self._in_force(),
            client=client,
            offline_since=self._offline_since(),
            now=time.time(),
        )

    def _launch_answer(self, client: str, decision: LaunchDecision) -> dict[str, Any]:
        return {
            "ok": True,
            "allowed": decision.allowed,
            "reasons": decision.reasons,
            "audit_only": decision.audit_only,
            "client_args": self._client_args(client),
        }

    async def _launch(self, client: str, peer: Peer) -> dict[str, Any]:
        """The gate in one step: judge, and if allowed register the asking process itself (the kernel's
        peer pid, never a pid from the request) as the session of ``client`` before it execs the client."""
        if peer.start_time is None:
            return {"ok": False, "error": f"the asking process {peer.pid} cannot be identified (gone?)"}
        if len(self._pending_launches) >= MAX_PENDING_LAUNCHES:
            return {"ok": False, "error": "too many launches pending; try again in a few seconds"}
        decision = await self._launch_decision(client)
        sid = session_id(peer.pid, peer.start_time) if decision.allowed else None
        self._events.event(
            "launch.allowed" if decision.allowed else "launch.denied",
            Severity.INFO if decision.allowed and not decision.reasons else Severity.WARNING,
            blocked=not decision.allowed,
            client=client,
            reasons=",".join(decision.reasons)[:4000],
            uid=peer.uid,
            pid=peer.pid,
            audit_only=decision.audit_only,
            **({"session": sid} if sid else {}),
        )
        answer = self._launch_answer(client, decision)
        if sid is not None:
            self._book.register_launch(sid)
            previous = self._pending_launches.pop(sid, None)
            if previous is not None:
                previous.cancel()
            self._pending_launches[sid] = asyncio.get_running_loop().call_later(
                PENDING_EXEC_S, self._settle_launch, sid, peer.pid, peer.start_time, client
            )
        answer["session"] = sid
        return answer

    def _settle_launch(self, sid: str, pid: int, start_time: float, client: str) -> None:
        """``PENDING_EXEC_S`` after an allowed launch: the process must be running the client by now, or
        its registration is dropped (a later exec of the client is a session that never passed the gate)."""
        self._pending_launches.pop(sid, None)
        running_client = self._runs_client(pid, start_time, client)
        self._book.settle_launch(sid, running_client=running_client)
        if not running_client:
            log.info("launch_not_executed", session=sid, client=client)
