"""What an operator can do to desktops and sessions: functions on the store that the CLI calls (and an API
can later). Each one changes state in the store and audits who (the OS user) and why, in one transaction;
the running controller picks the change up within a second (``DesktopRunner.poll``, pending commands)."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cleanroom_protocol import CommandAction

from ..models import CommandRecord, CommandState, SessionState
from ..store import Store
from . import machine
from .config import Desktops
from .machine import Desktop, TransitionRefused

MAX_REASON = 500
# An operator's end_session: valid as long as the daemon's default retry schedule (drivers/agent.py).
OPERATOR_COMMAND_LIFETIME_S = 455.0


class OperationError(Exception):
    """An operator action that cannot be done (the message says why)."""


def desktop_rows(store: Store, desktops: Desktops | None = None) -> list[dict[str, Any]]:
    """id, pool, driver, state, session, user, last_wiped (+ attempts, reason, detail) for each desktop."""
    rows = []
    for d in store.desktops():
        spec = desktops.get(d.id) if desktops is not None else None
        rows.append(
            {
                "id": d.id,
                "pool": d.pool,
                "driver": spec.pool.driver if spec else ("" if desktops is None else "(not configured)"),
                "state": d.state.value,
                "session": f"{d.agent}/{d.session_id}" if d.agent and d.session_id else "",
                "user": d.user or "",
                "last_wiped": d.last_wiped,
                "attempts": d.attempts,
                "reason": d.reason,
                "detail": d.detail,
            }
        )
    return rows


@dataclass(frozen=True, slots=True)
class Moved:
    before: Desktop
    after: Desktop


def wipe(store: Store, desktop_id: str, *, operator: str, reason: str) -> Moved:
    """Wipe a desktop (an in-use one is logged off first; a quarantined one needs :func:`release`)."""
    return _move(store, desktop_id, "operator.desktops_wipe", operator, reason, machine.request_wipe)


def release(store: Store, desktop_id: str, *, operator: str, reason: str) -> Moved:
    """Take a desktop out of quarantine: it is wiped again, and handed out only once that wipe verifies."""
    return _move(store, desktop_id, "operator.desktops_release", operator, reason, machine.release)


def _move(store: Store, desktop_id: str, kind: str, operator: str, reason: str, transition: Any) -> Moved:
    reason = reason[:MAX_REASON]
    with store.transaction():
        before = store.desktop(desktop_id)
        if before is None:
            raise OperationError(f"no desktop {desktop_id!r} (desktops list shows them)")
        try:
            after = transition(before, reason=f"operator:{operator}: {reason}", now=time.time())
        except TransitionRefused as exc:
            raise OperationError(str(exc)) from exc
        store.save_desktop(after)
        store.append_audit(
            kind,
            f"operator:{operator}",
            desktop_id,
            {"reason": reason, "from": before.state.value, "to": after.state.value},
        )
    return Moved(before, after)


@dataclass(frozen=True, slots=True)
class EndRequest:
    agent: str
    session_id: str
    command_id: str
    desktop: str | None  # the desktop being logged off and wiped, if the session has one


def end_session(
    store: Store, session_id: str, *, operator: str, reason: str, agent: str | None = None
) -> EndRequest:
    """End a session on both sides: a signed end_session for its endpoint (sent by the running controller)
    and, when it holds a desktop, that desktop logged off and wiped."""
    reason = reason[:MAX_REASON]
    matches = [s for s in store.sessions(agent) if s.id == session_id]
    if not matches:
        raise OperationError(f"no session {session_id!r}" + (f" on {agent}" if agent else ""))
    if len(matches) > 1:
        raise OperationError(f"session {session_id!r} is on {len(matches)} endpoints: name one with --agent")
    session = matches[0]
    if session.state is SessionState.ENDED:
        raise OperationError(f"session {session_id} on {session.agent} has already ended")
    now = time.time()
    why = f"operator:{operator}: {reason}"
    command = CommandRecord(
        id=f"c-{uuid.uuid4().hex}",
        agent=session.agent,
        session_id=session.id,
        action=CommandAction.END_SESSION.value,
        reason=why,
        state=CommandState.PENDING,
        created=now,
        nonce=secrets.token_hex(16),
        expires_at=now + OPERATOR_COMMAND_LIFETIME_S,
    )
    with store.transaction():
        store.save_command(command)
        desktop = store.desktop_of_session(session.agent, session.id)
        if desktop is not None and desktop.state is machine.DesktopState.IN_USE:
            store.save_desktop(machine.request_end(desktop, reason=why, now=now))
        store.append_audit(
            "operator.sessions_end",
            f"operator:{operator}",
            session.agent,
            {
                "session_id": session.id,
                "reason": reason,
                "command_id": command.id,
                "desktop": desktop.id if desktop is not None else None,
            },
        )
    return EndRequest(session.agent, session.id, command.id, desktop.id if desktop is not None else None)
