"""Selection storms (policy ``[clipboard] storm_changes_per_s``). Pure: no X11, no clock of its own.

An X client that re-takes a guarded selection in a tight loop owns it again right after every take-over,
so a paste made meanwhile reaches it; a guard that handles every change one by one falls behind and
queues them in memory. The guard therefore coalesces changes, and counts them here per X client: a
client above the limit is named once (and again every ``renotify_s`` while it stays above, so a failed
disconnect is retried), and many clients together above ``total_factor`` times the limit name each of
them that took part. Events that name no client (a selection set to None, a cut buffer written) are
counted under negative keys: they can be reported, not disconnected.

Memory is O(1) per key and at most ``max_keys`` keys: rates are estimated from two fixed windows (this
one and the one before, weighted by how much of it still overlaps the sliding window).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Literal

UNATTRIBUTED_OWNER = -1  # a selection's owner set to None (any client may do that), or a window of the server
CUT_BUFFER_WRITER = -2  # a cut buffer written: property events do not name the writer


@dataclass(frozen=True)
class Storm:
    key: int  # the X client's resource base, or a negative key above
    rate_per_s: float
    limit_per_s: float
    together: bool  # found as one of many clients above the total, not above the limit alone


class _Rate:
    __slots__ = ("current", "flagged_at", "previous", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.current = 0
        self.previous = 0
        self.flagged_at: float | None = None


class RateWatch:
    def __init__(
        self,
        limit_per_s: float,
        *,
        total_factor: float = 4.0,
        window_s: float = 1.0,
        renotify_s: float = 1.0,
        max_keys: int = 1024,
    ) -> None:
        if limit_per_s <= 0 or window_s <= 0:
            raise ValueError(f"storm limit {limit_per_s}/s over {window_s} s must be positive")
        self.limit_per_s = limit_per_s
        self._window_s = window_s
        self._renotify_s = renotify_s
        self._total_limit = limit_per_s * total_factor
        # A client takes part in a storm of many when it made at least this share of the limit.
        self._share = max(2.0, limit_per_s / 10)
        self._max_keys = max_keys
        self._keys: dict[int, _Rate] = {}
        self._total = _Rate(0)
        self._total_checked_at = -math.inf
        self.last_over: float | None = None  # when a rate was last seen above its limit

    def note(self, key: int, now: float) -> list[Storm]:
        """One event by ``key`` at ``now`` (monotonic seconds); the storms this event reveals."""
        rate = self._keys.get(key)
        if rate is None:
            if len(self._keys) >= self._max_keys:
                self._prune(now)
            rate = self._keys[key] = _Rate(self._index(now))
        own = self._add(rate, now)
        together = self._add(self._total, now)
        found: list[Storm] = []
        if own > self.limit_per_s:
            self.last_over = now
            if self._due(rate, now):
                rate.flagged_at = now
                found.append(Storm(key, own, self.limit_per_s, together=False))
        elif rate.flagged_at is not None and own <= self.limit_per_s / 2:
            rate.flagged_at = None  # calm again: a later storm is named anew
        if together > self._total_limit:
            self.last_over = now
            # Looking at every client costs O(keys): at most ten times a window.
            if now - self._total_checked_at >= self._window_s / 10:
                self._total_checked_at = now
                for other, state in self._keys.items():
                    other_rate = self._estimate(state, now)
                    if other_rate >= self._share and self._due(state, now):
                        state.flagged_at = now
                        found.append(Storm(other, other_rate, self.limit_per_s, together=True))
        return found

    def forget(self, key: int) -> None:
        """``key`` is gone (disconnected): its count starts again from nothing."""
        self._keys.pop(key, None)

    def rate(self, key: int, now: float) -> float:
        state = self._keys.get(key)
        return 0.0 if state is None else self._estimate(state, now)

    def calm(self, now: float, calm_s: float) -> bool:
        return self.last_over is None or now - self.last_over >= calm_s

    # ---------------------------------------------------------------------------------------------
    def _index(self, now: float) -> int:
        return math.floor(now / self._window_s)

    def _roll(self, rate: _Rate, now: float) -> None:
        index = self._index(now)
        if index == rate.window:
            return
        rate.previous = rate.current if index == rate.window + 1 else 0
        rate.current = 0
        rate.window = index

    def _estimate(self, rate: _Rate, now: float) -> float:
        self._roll(rate, now)
        elapsed = now / self._window_s - rate.window  # 0 ≤ elapsed < 1: how far into this window
        return (rate.previous * (1.0 - elapsed) + rate.current) / self._window_s

    def _add(self, rate: _Rate, now: float) -> float:
        self._roll(rate, now)
        rate.current += 1
        return self._estimate(rate, now)

    def _due(self, rate: _Rate, now: float) -> bool:
        return rate.flagged_at is None or now - rate.flagged_at >= self._renotify_s

    def _prune(self, now: float) -> None:
        stale = [k for k, r in self._keys.items() if self._estimate(r, now) == 0.0]
        for key in stale:
            del self._keys[key]
        while len(self._keys) >= self._max_keys:  # all active: drop the oldest known
            del self._keys[next(iter(self._keys))]


StormKind = Literal["owner_changes", "pastes", "unattributed_owner", "cut_buffers"]
Source = Literal["watch", "act", "record"]


@dataclass(frozen=True)
class FoundStorm:
    kind: StormKind
    storm: Storm
    window: int | None  # the window the client last named (owner or requestor): what KillClient is given
    selection: str | None


class StormCounter:
    """Counts owner changes and pastes per X client for the guard, from whichever stream attributes them
    (the RECORD thread, or the guard thread's own event streams), and keeps what the guard needs to
    contain what it finds. Thread-safe; no I/O.

    A client just disconnected may still have events queued in a stream; they are ignored until a mark the
    guard sends right after the disconnect comes through on that stream (each stream keeps the server's
    order), so a stale event neither names it again nor a new client that reuses its resource base."""

    def __init__(self, changes_per_s: int, pastes_per_change: int, *, max_found: int = 256) -> None:
        self._lock = threading.Lock()
        self._changes = RateWatch(changes_per_s)
        self._pastes = RateWatch(changes_per_s * pastes_per_change)
        self._found: deque[FoundStorm] = deque(maxlen=max_found)
        self._windows: dict[int, int] = {}
        self._gone: dict[int, int] = {}  # client → marks still to come through before its events count
        self._marks: dict[Source, deque[tuple[int, ...]]] = {}

    def change(self, client: int, window: int | None, selection: str, now: float) -> bool:
        """A guarded selection's owner changed (``client`` set it; negative: unknown). True when this
        revealed a storm (see :meth:`take_found`)."""
        with self._lock:
            if client in self._gone:
                return False
            if window is not None:
                self._remember(client, window)
            found = self._changes.note(client, now)
            for storm in found:
                kind: StormKind = (
                    "cut_buffers"
                    if storm.key == CUT_BUFFER_WRITER
                    else "unattributed_owner"
                    if storm.key == UNATTRIBUTED_OWNER
                    else "owner_changes"
                )
                self._found.append(FoundStorm(kind, storm, self._windows.get(storm.key), selection))
            return bool(found)

    def paste(self, client: int, window: int, selection: str | None, now: float) -> bool:
        with self._lock:
            if client in self._gone:
                return False
            self._remember(client, window)
            found = self._pastes.note(client, now)
            for storm in found:
                self._found.append(FoundStorm("pastes", storm, self._windows.get(storm.key), selection))
            return bool(found)

    def take_found(self) -> list[FoundStorm]:
        with self._lock:
            found = list(self._found)
            self._found.clear()
            return found

    def disconnected(self, clients: tuple[int, ...], sources: tuple[Source, ...]) -> None:
        """``clients`` were disconnected; the guard now sends one mark down each of ``sources``."""
        with self._lock:
            for client in clients:
                self._changes.forget(client)
                self._pastes.forget(client)
                self._windows.pop(client, None)
                self._gone[client] = self._gone.get(client, 0) + len(sources)
            for source in sources:
                self._marks.setdefault(source, deque()).append(clients)

    def mark(self, source: Source) -> None:
        """The guard's mark came through on ``source``: events after it are newer than the disconnect."""
        with self._lock:
            waiting = self._marks.get(source)
            if not waiting:
                return  # a mark nobody waits for (anyone can change a property on the guard's window)
            for client in waiting.popleft():
                left = self._gone.get(client, 0) - 1
                if left > 0:
                    self._gone[client] = left
                else:
                    self._gone.pop(client, None)

    def flooded(self, now: float) -> bool:
        """An event stream nobody can be disconnected for is above the limit."""
        with self._lock:
            return any(
                self._changes.rate(key, now) > self._changes.limit_per_s
                for key in (UNATTRIBUTED_OWNER, CUT_BUFFER_WRITER)
            )

    def calm(self, now: float, calm_s: float) -> bool:
        with self._lock:
            return self._changes.calm(now, calm_s) and self._pastes.calm(now, calm_s)

    def last_over(self) -> float | None:
        with self._lock:
            times = [t for t in (self._changes.last_over, self._pastes.last_over) if t is not None]
            return max(times) if times else None

    def _remember(self, client: int, window: int) -> None:
        if client not in self._windows and len(self._windows) >= 1024:
            self._windows.pop(next(iter(self._windows)))
        self._windows[client] = window
