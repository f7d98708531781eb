"""Messages the controller did not act on, counted per sender and summed up per window (pure, no I/O).

A flood of 100,000 forgeries must not write 100,000 audit rows, nor one log line each. So every message
that is not accepted (rejected for a reason, a duplicate redelivery, an expected old status) is added to
its sender's open *window*: counts by reason and, per reason, the first one's detail. A window opens with
its sender's first such message and closes :data:`WINDOW_S` later; the caller writes one audit entry
(``verdict.summary``) per closed window. Meanwhile the counts that ``agents list`` shows (the ``rejects``
table) are handed out per batch, so the live view is never a window late.

Why 10 s: an operator reading the audit trail sees an attack within seconds, while a sender that floods
costs at most six rows a minute (the unenrolled and foreign topics count as two senders, so the audit rows a
flood can cause are bounded by the number of enrolled agents + 2 per window).

Nothing is lost: the caller persists every touched window with each batch (a crash leaves it in the
database, where the next start writes it to the audit trail) and closes every window on shutdown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from cleanroom_protocol import VerdictStatus

WINDOW_S = 10.0
_DETAIL_CHARS = 500
_TOPIC_CHARS = 200


class Reason(StrEnum):
    """Why a message was not acted on. The verdict statuses, plus the controller's own."""

    MALFORMED = VerdictStatus.MALFORMED.value
    TOO_LARGE = VerdictStatus.TOO_LARGE.value
    UNKNOWN_SENDER = VerdictStatus.UNKNOWN_SENDER.value
    BAD_SIGNATURE = VerdictStatus.BAD_SIGNATURE.value
    REPLAYED = VerdictStatus.REPLAYED.value
    STALE = VerdictStatus.STALE.value
    OVERFLOW = "overflow"  # dropped unread: its sender was noisy and its queue full
    DUPLICATE = "duplicate"  # the same bytes as an accepted message (a QoS 1 redelivery): not a reject
    OLD_STATUS = "old_status"  # a retained status replayed, a superseded Will: expected, not a reject


# Counted as rejects (``agents list``, the ``rejects`` table); duplicates and old statuses are only summed up.
REJECTS = frozenset(r for r in Reason if r not in (Reason.DUPLICATE, Reason.OLD_STATUS))


def _bounded(detail: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in detail.items():
        if isinstance(v, str):
            v = v[: _TOPIC_CHARS if k == "topic" else _DETAIL_CHARS]
        out[k] = v
    return out


@dataclass(slots=True)
class Window:
    sender: str
    opened: float
    last: float
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, dict[str, object]] = field(default_factory=dict)

    def summary(self, window_s: float) -> dict[str, object]:
        """The audit entry's data."""
        return {
            "window_s": window_s,
            "from": self.opened,
            "to": self.last,
            "total": sum(self.counts.values()),
            "counts": dict(self.counts),
            "first": {reason: dict(d) for reason, d in self.first.items()},
        }

    def copy(self) -> Window:
        # The detail dicts in ``first`` are never changed once made: sharing them is safe.
        return Window(self.sender, self.opened, self.last, dict(self.counts), dict(self.first))

    def merge(self, other: Window) -> None:
        self.opened = min(self.opened, other.opened)
        self.last = max(self.last, other.last)
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        for reason, d in other.first.items():
            self.first.setdefault(reason, d)


@dataclass(frozen=True, slots=True)
class Flush:
    """What one batch hands to the store. Undone (:meth:`RejectWindows.undo`) if its transaction fails."""

    counts: dict[tuple[str, str], tuple[int, float]]  # (sender, reason) → (added, last at): rejects only
    touched: tuple[Window, ...]  # open windows changed since the last flush (persist them)
    closed: tuple[Window, ...]  # windows due: write their audit entry, forget their persisted copy


@dataclass(frozen=True, slots=True)
class WindowsSnapshot:
    """The state of :class:`RejectWindows` before a batch (:meth:`RejectWindows.snapshot`)."""

    open: dict[str, Window]
    unsaved: dict[tuple[str, str], tuple[int, float]]
    touched: set[str]


class RejectWindows:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._open: dict[str, Window] = {}
        self._unsaved: dict[tuple[str, str], tuple[int, float]] = {}
        self._touched: set[str] = set()

    def add(self, sender: str, reason: Reason, now: float, detail: Mapping[str, object]) -> bool:
        """Count one message; ``True`` when it opened a new window (worth one log line)."""
        window = self._open.get(sender)
        opened = window is None
        if window is None:
            window = self._open[sender] = Window(sender, now, now)
        window.last = max(window.last, now)
        window.counts[reason.value] = window.counts.get(reason.value, 0) + 1
        if reason.value not in window.first:
            window.first[reason.value] = _bounded({**detail, "at": now})
        if reason in REJECTS:
            n, _ = self._unsaved.get((sender, reason.value), (0, now))
            self._unsaved[(sender, reason.value)] = (n + 1, now)
        self._touched.add(sender)
        return opened

    def snapshot(self) -> WindowsSnapshot:
        """What is counted now, for :meth:`restore` when a batch that counts more does not commit (it is
        applied again, and would otherwise be counted twice). Costs one copy of each open window."""
        return WindowsSnapshot(
            {s: w.copy() for s, w in self._open.items()}, dict(self._unsaved), set(self._touched)
        )

    def restore(self, snapshot: WindowsSnapshot) -> None:
        """Back to ``snapshot``: what was counted and flushed since is forgotten (its batch did not commit)."""
        self._open = {s: w.copy() for s, w in snapshot.open.items()}
        self._unsaved = dict(snapshot.unsaved)
        self._touched = set(snapshot.touched)

    def pending(self) -> bool:
        return bool(self._unsaved or self._touched)

    def due(self, now: float) -> bool:
        return any(now - w.opened >= self.window_s for w in self._open.values())

    def flush(self, now: float, *, close_all: bool = False) -> Flush:
        """Take what is unsaved, and close the windows that are due (all of them with ``close_all``)."""
        closed = tuple(w for w in self._open.values() if close_all or now - w.opened >= self.window_s)
        for w in closed:
            del self._open[w.sender]
        touched = tuple(self._open[s] for s in self._touched if s in self._open)
        flush = Flush(self._unsaved, touched, closed)
        self._unsaved = {}
        self._touched = set()
        return flush

    def undo(self, flush: Flush) -> None:
        """The flush was not stored: keep its counts and reopen its windows for the next one."""
        for key, (n, at) in flush.counts.items():
            m, last = self._unsaved.get(key, (0, at))
            self._unsaved[key] = (m + n, max(at, last))
        for w in flush.closed:
            current = self._open.get(w.sender)
            if current is None:
                self._open[w.sender] = w
            else:
                current.merge(w)
        self._touched.update(w.sender for w in (*flush.touched, *flush.closed))

    @property
    def open_senders(self) -> int:
        return len(self._open)
