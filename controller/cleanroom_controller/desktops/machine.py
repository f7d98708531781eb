"""The desktop state machine (pure, no I/O).

``clean`` → ``in_use`` (a session was given the desktop) → ``ending`` (its log-off was asked for) →
``ended`` (log-off confirmed) → ``wiping`` → ``clean`` (the wipe verified). A step that fails is retried
with a doubling back-off; past the pool's retries the desktop is ``quarantined``: it is never given to a
session, and only ``release`` (an operator, after a look) takes it out, by wiping it again: it is ``clean``
only once that wipe verifies.

Every function returns the next record or raises :class:`TransitionRefused`; the runner persists the record
before it acts on it, so a controller restarted in ``ending`` or ``wiping`` carries on with that step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class DesktopState(StrEnum):
    CLEAN = "clean"
    IN_USE = "in_use"
    ENDING = "ending"  # log-off asked for, not yet confirmed
    ENDED = "ended"  # log-off confirmed; the wipe comes next
    WIPING = "wiping"
    QUARANTINED = "quarantined"


class Step(StrEnum):
    """What the runner does for a desktop in a given state."""

    LOG_OFF = "log_off"
    WIPE = "wipe"


# States the runner has work in (a restarted controller resumes them).
ACTIVE_STATES = frozenset({DesktopState.ENDING, DesktopState.ENDED, DesktopState.WIPING})
MAX_BACKOFF_FACTOR = 32


class TransitionRefused(ValueError):
    """A transition that the desktop's state does not allow (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class Desktop:
    id: str
    pool: str
    state: DesktopState = DesktopState.CLEAN
    agent: str | None = None  # the endpoint whose session holds it
    session_id: str | None = None
    user: str | None = None  # the worker's user id on the desktop (from the client's arguments)
    reason: str = ""  # why it is ending / wiping / quarantined
    attempts: int = 0  # failed attempts of the current step
    next_attempt_at: float | None = None  # back-off: not before this time
    last_wiped: float | None = None
    detail: str = ""  # the last driver outcome
    updated: float = 0.0


def step_of(d: Desktop) -> Step | None:
    if d.state is DesktopState.ENDING:
        return Step.LOG_OFF
    if d.state in (DesktopState.ENDED, DesktopState.WIPING):
        return Step.WIPE
    return None


def backoff(attempts: int, backoff_s: float) -> float:
    """Wait after the ``attempts``-th failure: ``backoff_s`` doubling, at most 32 ×."""
    return backoff_s * float(min(2 ** max(0, attempts - 1), MAX_BACKOFF_FACTOR))


def assign(d: Desktop, *, agent: str, session_id: str, user: str | None, now: float) -> Desktop:
    """A session connected to the desktop. Only a clean one is handed out: a desktop in any other state may
    still hold the last user's data (or is being made clean)."""
    if d.state is DesktopState.IN_USE and (d.agent, d.session_id) == (agent, session_id):
        return d  # the same session reported again
    if d.state is not DesktopState.CLEAN:
        raise TransitionRefused(f"desktop {d.id} is {d.state.value}, not clean: not given to a session")
    return replace(
        d,
        state=DesktopState.IN_USE,
        agent=agent,
        session_id=session_id,
        user=user,
        reason="",
        attempts=0,
        next_attempt_at=None,
        detail="",
        updated=now,
    )


def request_end(d: Desktop, *, reason: str, now: float) -> Desktop:
    """The desktop's session must end (a violation, an operator, or the session ended at the endpoint): log it
    off on the desktop side. A desktop already on its way to clean keeps going; a clean one has nothing to end."""
    if d.state is DesktopState.IN_USE:
        return replace(
            d, state=DesktopState.ENDING, reason=reason, attempts=0, next_attempt_at=None, updated=now
        )
    if d.state in ACTIVE_STATES:
        return d
    raise TransitionRefused(f"desktop {d.id} is {d.state.value}: it has no session to end")


def request_wipe(d: Desktop, *, reason: str, now: float) -> Desktop:
    """An operator wants the desktop wiped: an in-use one is logged off first; a quarantined one needs
    :func:`release` (a human looked at it)."""
    if d.state is DesktopState.IN_USE:
        return request_end(d, reason=reason, now=now)
    if d.state in (DesktopState.CLEAN, DesktopState.ENDED):
        return replace(
            d, state=DesktopState.WIPING, reason=reason, attempts=0, next_attempt_at=None, updated=now
        )
    if d.state in (DesktopState.ENDING, DesktopState.WIPING):
        return d
    raise TransitionRefused(f"desktop {d.id} is quarantined: `desktops release {d.id}` wipes it after a look")


def release(d: Desktop, *, reason: str, now: float) -> Desktop:
    """Out of quarantine: wiped again with a fresh retry budget; clean (and handed out) only once that wipe
    verifies, quarantined again if it fails."""
    if d.state is not DesktopState.QUARANTINED:
        raise TransitionRefused(f"desktop {d.id} is {d.state.value}, not quarantined: nothing to release")
    return replace(d, state=DesktopState.WIPING, reason=reason, attempts=0, next_attempt_at=None, updated=now)


def logged_off(d: Desktop, *, detail: str, now: float) -> Desktop:
    if d.state is not DesktopState.ENDING:
        raise TransitionRefused(f"desktop {d.id} is {d.state.value}, not ending")
    return replace(d, state=DesktopState.ENDED, attempts=0, next_attempt_at=None, detail=detail, updated=now)


def start_wipe(d: Desktop, *, now: float) -> Desktop:
    if d.state is DesktopState.WIPING:
        return d
    if d.state is not DesktopState.ENDED:
        raise TransitionRefused(f"desktop {d.id} is {d.state.value}, not ended")
    return replace(d, state=DesktopState.WIPING, attempts=0, next_attempt_at=None, updated=now)


def wiped(d: Desktop, *, detail: str, now: float) -> Desktop:
    """The wipe verified (fresh image, desktop running): clean, free for the next session."""
    if d.state is not DesktopState.WIPING:
        raise TransitionRefused(f"desktop {d.id} is {d.state.value}, not wiping")
    return replace(
        d,
        state=DesktopState.CLEAN,
        agent=None,
        session_id=None,
        user=None,
        reason="",
        attempts=0,
        next_attempt_at=None,
        last_wiped=now,
        detail=detail,
        updated=now,
    )


def failed(d: Desktop, *, detail: str, retries: int, backoff_s: float, now: float) -> Desktop:
    """A step failed: retried after a back-off, or quarantined once ``retries`` attempts have failed."""
    if d.state not in (DesktopState.ENDING, DesktopState.ENDED, DesktopState.WIPING):
        raise TransitionRefused(f"desktop {d.id} is {d.state.value}: no step to fail")
    attempts = d.attempts + 1
    if attempts >= retries:
        return replace(
            d,
            state=DesktopState.QUARANTINED,
            attempts=attempts,
            next_attempt_at=None,
            reason=f"{step_of(d) or 'step'} failed {attempts} times",
            detail=detail,
            updated=now,
        )
    return replace(
        d, attempts=attempts, next_attempt_at=now + backoff(attempts, backoff_s), detail=detail, updated=now
    )


def available(d: Desktop) -> bool:
    """Whether the desktop may be given to a session."""
    return d.state is DesktopState.CLEAN
