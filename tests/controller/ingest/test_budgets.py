"""Token buckets per sender key (pure): bursts, refill, noisy, a bounded number of keys."""

from __future__ import annotations

import pytest

from cleanroom_controller.ingest.budgets import Budgets, Limits, TokenBucket


def test_bucket_bursts_refills_and_a_clock_stepping_back_mints_nothing() -> None:
    b = TokenBucket(3, 2.0, now=100.0)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(100.5) and not b.take(100.5)  # 0.5 s × 2/s = one token
    assert not b.take(50.0)  # back in time: no refill
    assert not b.take(100.9) and b.take(101.0)


def test_junk_makes_only_its_own_key_noisy_for_a_while() -> None:
    budgets = Budgets(Limits(junk_burst=3, junk_per_s=1))
    for _ in range(100):
        budgets.charge_junk("b", now=10.0)  # forgeries on b's topic
    assert budgets.noisy("b", 10.0)
    assert not budgets.noisy("a", 10.0)  # nobody else is touched
    assert budgets.noisy("b", 10.5) and not budgets.noisy("b", 11.0)  # refills, 1/s


def test_keys_are_bounded() -> None:
    budgets = Budgets(Limits(max_keys=10))
    for i in range(1000):
        budgets.charge_junk(f"k{i}", now=float(i))
    assert len(budgets._junk) <= 10


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="junk_per_s"):
        Limits(junk_per_s=0)


def test_a_noisy_key_is_read_only_at_a_trickle() -> None:
    budgets = Budgets(Limits(noisy_burst=64, noisy_per_s=200))
    admitted = sum(budgets.admit_noisy("a", now=5.0) for _ in range(10_000))
    assert admitted == 64
    assert sum(budgets.admit_noisy("a", now=6.0) for _ in range(10_000)) == 64  # 200/s, capped at the burst
    assert sum(budgets.admit_noisy("a", now=6.25) for _ in range(10_000)) == 50
    assert budgets.admit_noisy("b", now=6.25)  # per key
