"""Which of each agent's messages the controller has durably stored, told back to the agent (pure).

Ingest reports every message whose signature verified once its batch has committed (stored, a duplicate of
a stored one, or a refusal counted and audited: in each case the agent has nothing more to send). The book
gathers those seqs per agent and hands out one :class:`~cleanroom_protocol.Watermark` per agent per round:
the highest seq stored so far and the seqs stored since the last one, as ranges. The daemon signs and
publishes them (retained) every ``WATERMARK_EVERY_S``: one publish per agent per round, however many
messages it sent, so a replayed spool of thousands costs a handful of watermarks.
"""

from __future__ import annotations

from cleanroom_protocol import Watermark
from cleanroom_protocol.messages import MAX_WATERMARK_RANGES, SeqRange

WATERMARK_EVERY_S = 0.5


def seq_ranges(seqs: set[int]) -> list[SeqRange]:
    """``{1, 2, 3, 7}`` → ``[(1, 3), (7, 7)]``."""
    ranges: list[SeqRange] = []
    for seq in sorted(seqs):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


class WatermarkBook:
    def __init__(self, *, max_ranges: int = MAX_WATERMARK_RANGES) -> None:
        self._max_ranges = max_ranges
        self._pending: dict[str, set[int]] = {}
        self._high: dict[str, int] = {}

    def stored(self, agent: str, seq: int) -> None:
        """``seq`` of ``agent`` is durably handled (call after the commit)."""
        self._pending.setdefault(agent, set()).add(seq)
        if seq > self._high.get(agent, -1):
            self._high[agent] = seq

    def pending(self) -> int:
        return len(self._pending)

    def take(self) -> list[Watermark]:
        """One watermark per agent with news; what does not fit one message stays for the next round."""
        out: list[Watermark] = []
        for agent in list(self._pending):
            ranges = seq_ranges(self._pending.pop(agent))
            sent, rest = ranges[: self._max_ranges], ranges[self._max_ranges :]
            if rest:
                self._pending[agent] = {s for first, last in rest for s in range(first, last + 1)}
            out.append(Watermark(agent=agent, seq=self._high[agent], stored=sent))
        return out

    def give_back(self, watermark: Watermark) -> None:
        """A watermark that could not be published: its seqs go out with the next one."""
        seqs = self._pending.setdefault(watermark.agent, set())
        for first, last in watermark.stored:
            seqs.update(range(first, last + 1))
