"""Per-sender junk budgets (pure: token buckets, the clock is passed in): who is noisy right now.

One bucket per *sender key* (the agent the topic names when it is enrolled, else ``(unenrolled)`` or
``(topic)``, so there are at most "enrolled agents + 2" keys), charged by every message on the key's topics
that is *not* accepted (malformed, forged, replayed, stale, duplicate, ...). Signatures are checked first,
so only junk spends it, and junk only ever makes its own topic noisy.

A noisy key is served after every quiet one (:mod:`.inbox`), and only a trickle of what it sends is read and
verified (**noisy** bucket: 64, then 200/s); the rest is dropped unread (counted ``overflow``).

A message that verifies is never refused for its rate: every such message was acknowledged to the agent
(QoS 1) and deleted from its outbox, so refusing it would lose an event for good (an agent replaying an
outage's spool sends thousands at once, and that history is exactly what must arrive). A stolen key's valid
flood is answered by revocation (``agents revoke``: its key refused within a second, its connection closed
within seconds) and bounded by the per-agent caps on what it can create (``decide.MAX_OPEN_SESSIONS``, open
commands).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """The numbers, with why. One controller process; a share group has one set per process."""

    # A genuine agent is rarely rejected (a QoS 1 redelivery, a retained status after a controller restart).
    junk_burst: float = 100.0
    junk_per_s: float = 10.0
    # While a key is noisy, how many of its messages are still read and verified (the rest are dropped
    # unread, ``overflow``): enough for its genuine messages to get through a flood of junk on its topic in
    # a few tries, little enough that verifying them costs ~2% of a core (~80 µs each).
    noisy_burst: float = 64.0
    noisy_per_s: float = 200.0
    # How many keys to remember at most; idle (full) buckets carry no state and are forgotten first.
    max_keys: int = 100_000

    def __post_init__(self) -> None:
        for name in (
            "junk_burst",
            "junk_per_s",
            "noisy_burst",
            "noisy_per_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be > 0")
        if self.max_keys < 1:
            raise ValueError("Limits.max_keys must be >= 1")


class TokenBucket:
    """``burst`` tokens, refilled at ``per_s``; :meth:`take` spends one if there is one."""

    __slots__ = ("_at", "_burst", "_per_s", "_tokens")

    def __init__(self, burst: float, per_s: float, now: float) -> None:
        self._burst = burst
        self._per_s = per_s
        self._tokens = burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._per_s)
        self._at = max(self._at, now)  # a clock that steps back does not mint tokens

    def take(self, now: float) -> bool:
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def spend(self, now: float) -> None:
        """Take one token, or go on being empty (the debt is not carried: refill starts from zero)."""
        self._refill(now)
        self._tokens = max(0.0, self._tokens - 1.0)

    def empty(self, now: float) -> bool:
        self._refill(now)
        return self._tokens < 1.0

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self._burst

    def left(self, now: float) -> float:
        self._refill(now)
        return self._tokens


class Budgets:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._junk: dict[str, TokenBucket] = {}
        self._admitted: dict[str, TokenBucket] = {}

    def _bucket(
        self, table: dict[str, TokenBucket], key: str, now: float, burst: float, per_s: float
    ) -> TokenBucket:
        bucket = table.get(key)
        if bucket is None:
            if len(table) >= self.limits.max_keys:
                self._forget_idle(table, now)
            bucket = table[key] = TokenBucket(burst, per_s, now)
        return bucket

    @staticmethod
    def _forget_idle(table: dict[str, TokenBucket], now: float) -> None:
        idle = [k for k, b in table.items() if b.full(now)]
        for k in idle:
            del table[k]
        if not idle:  # everyone is busy: forget the oldest half rather than grow without bound
            for k in list(table)[: len(table) // 2 or 1]:
                del table[k]

    def charge_junk(self, key: str, now: float) -> None:
        """A message on ``key``'s topics that was not accepted."""
        lim = self.limits
        self._bucket(self._junk, key, now, lim.junk_burst, lim.junk_per_s).spend(now)

    def admit_noisy(self, key: str, now: float) -> bool:
        """A noisy ``key``'s message arrives: read and verify it (``True``) or drop it unread."""
        lim = self.limits
        return self._bucket(self._admitted, key, now, lim.noisy_burst, lim.noisy_per_s).take(now)

    def junk_left(self, key: str, now: float) -> float:
        """How many more messages ``key``'s topics may bring that are not accepted before it is noisy."""
        junk = self._junk.get(key)
        return self.limits.junk_burst if junk is None else junk.left(now)

    def noisy(self, key: str, now: float) -> bool:
        """Has ``key`` spent its junk budget? (Unknown keys are quiet.)"""
        junk = self._junk.get(key)
        return junk is not None and junk.empty(now)
