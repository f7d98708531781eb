"""Between the broker link and ingest: one queue per sender, quiet senders first, noisy ones rationed.

Each message comes with its ``settle`` callback (the broker link's acknowledgement): ingest calls it once
the message's batch has committed, the inbox when it drops the message unread. Until then the broker keeps
it. What the controller holds unacknowledged is bounded by the link's queue (aiomqtt's), this inbox's
capacity and the batch in hand, not by the broker's inflight window (Mosquitto 2.0.11 sends a window more
per acknowledgement: link.py). One MQTT connection carries every agent's
messages in one stream: a device that floods would put its junk in front of everyone else's
messages. So the link puts each message into its *sender's* queue (the agent the topic names, or
``(unenrolled)`` / ``(topic)``: at most enrolled agents + 2 queues), and ingest takes a batch as a *round*:

- senders that are quiet (both budgets left, :mod:`.budgets`) are served first, one message each in turn;
- noisy senders share at most ``noisy_per_round`` messages per round, so a round that holds a quiet
  sender's violation is never long (a round of forgeries costs ~0.1 ms each to verify);
- of a noisy sender only a trickle is read and verified (``admit_noisy``: its budget for that), and never
  more than a round's worth waits; the rest is dropped unread and counted ``overflow``. The link goes on
  reading the flood off the socket instead of verifying it, so as little of it as possible waits at the
  broker in front of other devices' messages (one connection: the broker delivers in order).
  A quiet sender's message is never dropped: when its queue (``per_sender``) or the inbox is full the link
  waits (the broker queues; QoS 1), as it did before this module, after evicting noisy messages to make
  room.

Why a dropped message is acknowledged: left unacknowledged it would hold one of the broker's inflight slots
for the rest of the connection, and a flood would soon hold them all: every other agent's messages would
wait behind it (the broker does not resend on the same connection). So a dropped message is counted
(``overflow``) and acknowledged. It is not lost if it was genuine: the agent keeps every message until a
watermark lists it as stored, and resends one that a later stored seq shows was skipped
(docs/data-path.md). Only a noisy sender's messages are ever dropped; under the broker's ACL only the agent
itself can publish on its topics, so a device loses nothing unless it floods its own topics with junk, and
even then its spool resends what was dropped.

The order within one sender's queue is kept (its seqs arrive in order); the order across senders is not
needed by anything (each sender's state is its own).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

Item = tuple[str, bytes, bool]  # topic, payload, retained
Settle = Callable[[], None]  # acknowledges the message to the broker
Entry = tuple[Item, Settle]


def unsettled() -> None:
    """The settle of a message that needs no acknowledgement (tests, QoS 0)."""


CAPACITY = 2_000
PER_SENDER = 500
NOISY_PER_ROUND = 64


class FairInbox:
    """The ``asyncio.Queue`` subset the daemon's batch collector uses (``put``, ``get``, ``get_nowait``,
    ``empty``), with rounds: :meth:`get` waits for a round's first message and opens the round;
    :meth:`get_nowait` hands out the rest of it and :meth:`empty` is true when nothing more may join it."""

    def __init__(
        self,
        *,
        key_of: Callable[[str], str],
        noisy: Callable[[str], bool],
        on_overflow: Callable[[str, Item], None],
        admit_noisy: Callable[[str], bool] = lambda key: True,
        capacity: int = CAPACITY,
        per_sender: int = PER_SENDER,
        noisy_per_round: int = NOISY_PER_ROUND,
    ) -> None:
        if min(capacity, per_sender, noisy_per_round) < 1:
            raise ValueError("inbox capacity, per_sender and noisy_per_round must be >= 1")
        self._key_of = key_of
        self._noisy = noisy
        self._on_overflow = on_overflow
        self._admit_noisy = admit_noisy
        self._capacity = capacity
        self._per_sender = per_sender
        self._noisy_per_round = noisy_per_round
        self._queues: dict[str, deque[Entry]] = {}
        # Senders with queued messages, in turn order, by class. A sender's class is fixed for a round
        # (decided when the round opens or when its first message arrives) so that empty() is O(1).
        self._quiet: deque[str] = deque()
        self._loud: deque[str] = deque()
        self._is_loud: dict[str, bool] = {}
        self._quiet_n = 0
        self._loud_n = 0
        self._round_loud = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.overflowed = 0

    def qsize(self) -> int:
        return self._quiet_n + self._loud_n

    # -- producer: the link --------------------------------------------------------------------------------
    async def put(self, item: Item, settle: Settle = unsettled) -> None:
        key = self._key_of(item[0])
        entry = (item, settle)
        while True:
            queue = self._queues.get(key)
            queued = 0 if queue is None else len(queue)
            if self._noisy(key):
                # A noisy sender is served at most noisy_per_round per round: more waiting is no use, and
                # dropping at once keeps the link reading as fast as the flood arrives.
                full = queued >= self._noisy_per_round or self.qsize() >= self._capacity
                if full or not self._admit_noisy(key):
                    self._drop(key, entry)
                else:
                    self._append(key, entry)
                return
            if queued < self._per_sender:
                if self.qsize() < self._capacity:
                    self._append(key, entry)
                    return
                if self._evict_loud():
                    continue
            # A quiet sender and no room: wait for ingest (the broker queues meanwhile).
            self._writable.clear()
            await self._writable.wait()

    def _append(self, key: str, entry: Entry) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            loud = self._noisy(key)
            self._is_loud[key] = loud
            (self._loud if loud else self._quiet).append(key)
        queue.append(entry)
        if self._is_loud[key]:
            self._loud_n += 1
        else:
            self._quiet_n += 1
        self._readable.set()

    def _drop(self, key: str, entry: Entry) -> None:
        item, settle = entry
        self.overflowed += 1
        self._on_overflow(key, item)
        settle()  # see the module docstring: an unacknowledged drop would hold an inflight slot for good

    def _evict_loud(self) -> bool:
        """Room for a quiet sender: drop the oldest message of the noisy sender next in turn."""
        if not self._loud:
            return False
        key = self._loud[0]
        self._drop(key, self._pop(key, self._loud))
        return True

    # -- consumer: ingest -----------------------------------------------------------------------------------
    async def get(self) -> Entry:
        """Wait for a message, open a round and return its first message."""
        while not self.qsize():
            self._readable.clear()
            await self._readable.wait()
        self._open_round()
        item = self._take()
        assert item is not None  # qsize() > 0, and a new round serves at least one noisy message
        return item

    def get_nowait(self) -> Entry:
        item = self._take()
        if item is None:
            raise asyncio.QueueEmpty
        return item

    def empty(self) -> bool:
        return self._quiet_n == 0 and (self._loud_n == 0 or self._round_loud >= self._noisy_per_round)

    def _open_round(self) -> None:
        """Re-class the senders with queued messages: budgets refill, a noisy sender becomes quiet again."""
        self._round_loud = 0
        keys = [*self._quiet, *self._loud]
        self._quiet.clear()
        self._loud.clear()
        self._quiet_n = self._loud_n = 0
        for key in keys:
            loud = self._noisy(key)
            self._is_loud[key] = loud
            (self._loud if loud else self._quiet).append(key)
            n = len(self._queues[key])
            if loud:
                self._loud_n += n
            else:
                self._quiet_n += n

    def _take(self) -> Entry | None:
        if self._quiet_n:
            return self._pop_turn(self._quiet)
        if self._loud_n and self._round_loud < self._noisy_per_round:
            self._round_loud += 1
            return self._pop_turn(self._loud)
        return None

    def _pop_turn(self, order: deque[str]) -> Entry:
        """One message of the sender whose turn it is; it goes to the back of the line if it has more."""
        key = order[0]
        item = self._pop(key, order)
        if key in self._queues:
            order.rotate(-1)
        return item

    def _pop(self, key: str, order: deque[str]) -> Entry:
        queue = self._queues[key]
        item = queue.popleft()
        if self._is_loud[key]:
            self._loud_n -= 1
        else:
            self._quiet_n -= 1
        if not queue:
            del self._queues[key]
            del self._is_loud[key]
            order.remove(key)  # it is at the front (its turn, or the evicted one): O(1)
        self._writable.set()
        return item
