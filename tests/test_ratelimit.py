"""Tests for gateway.ratelimit: every timing assertion runs on a fake clock."""

from __future__ import annotations

import math

import pytest

from gateway.ratelimit import TokenBucket, ViolationWindow


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain(bucket: TokenBucket) -> int:
    """Take tokens until refused; how many were granted (capped, so a bug cannot hang)."""
    for granted in range(10_000):
        if bucket.take() > 0:
            return granted
    raise AssertionError("the bucket never ran out")


# --- TokenBucket -------------------------------------------------------------------------


def test_bucket_starts_full_and_grants_exactly_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, 5, clock=clock)
    assert drain(bucket) == 5


def test_bucket_retry_time_is_exact_and_taking_early_grants_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(4.0, 3, clock=clock)
    assert drain(bucket) == 3
    assert bucket.take() == pytest.approx(0.25)
    clock.advance(0.1)
    assert bucket.take() == pytest.approx(0.15)  # refused calls do not push the time back
    clock.advance(0.15)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.25)


def test_bucket_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, 10, clock=clock)
    drain(bucket)
    clock.advance(1.5)  # 3 tokens
    assert drain(bucket) == 3


def test_bucket_fractional_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(0.1, 1, clock=clock)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(10.0)
    clock.advance(9.999)
    assert bucket.take() == pytest.approx(0.001)
    clock.advance(0.001)
    assert bucket.take() == 0.0


def test_bucket_never_exceeds_burst_after_long_idle() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, 4, clock=clock)
    drain(bucket)
    clock.advance(1e9)
    assert drain(bucket) == 4


def test_bucket_sustained_rate_over_many_steps_loses_no_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 1, clock=clock)
    granted = 0
    for _ in range(10_000):  # 1000 seconds in steps of 0.1 s: rounding must not starve it
        clock.advance(0.1)
        granted += bucket.take() == 0.0
    assert granted >= 9_999


def test_bucket_clock_going_backwards_grants_nothing_extra() -> None:
    clock = FakeClock(1000.0)
    bucket = TokenBucket(1.0, 2, clock=clock)
    assert drain(bucket) == 2
    clock.now = 500.0  # backwards: time stands still, nothing is granted
    assert bucket.take() == pytest.approx(1.0)
    clock.now = 1000.0  # back where it was: still no token, as no time has passed since
    assert bucket.take() == pytest.approx(1.0)
    clock.now = 1001.0
    assert bucket.take() == 0.0
    assert bucket.take() > 0


def test_bucket_clock_backwards_then_forward_does_not_double_count() -> None:
    clock = FakeClock(1000.0)
    bucket = TokenBucket(1.0, 10, clock=clock)
    drain(bucket)
    clock.now = 1002.0
    assert bucket.take() == 0.0  # 2 tokens earned, 1 taken
    clock.now = 990.0
    clock.now = 1002.0  # revisits the same interval: earns nothing again
    assert drain(bucket) == 1


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0.0, 1), (-1.0, 1), (math.nan, 1), (math.inf, 1), (1.0, 0), (1.0, -5)],
)
def test_bucket_rejects_bad_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, clock=FakeClock())


# --- ViolationWindow ---------------------------------------------------------------------


def test_violations_trip_after_limit_within_window() -> None:
    clock = FakeClock()
    window = ViolationWindow(3, 10.0, clock=clock)
    assert [window.record() for _ in range(3)] == [False, False, False]
    assert window.record() is True


def test_violations_slide_out_of_the_window() -> None:
    clock = FakeClock()
    window = ViolationWindow(2, 10.0, clock=clock)
    assert window.record() is False  # t=0
    clock.advance(5)
    assert window.record() is False  # t=5
    clock.advance(5)  # t=10: the first one is exactly a window old, out
    assert window.record() is False
    clock.advance(4.999)  # t=14.999: 5, 10, 14.999 are within 10 s
    assert window.record() is True


def test_violations_spread_out_never_trip() -> None:
    clock = FakeClock()
    window = ViolationWindow(1, 1.0, clock=clock)
    for _ in range(1000):
        assert window.record() is False
        clock.advance(1.0)


def test_violation_memory_is_bounded() -> None:
    clock = FakeClock()
    window = ViolationWindow(5, 1e9, clock=clock)
    assert window._times is None  # nothing kept before the first violation
    for _ in range(10_000):
        window.record()
    assert window._times is not None
    assert len(window._times) <= 6


def test_violation_limit_zero_trips_on_first() -> None:
    window = ViolationWindow(0, 1.0, clock=FakeClock())
    assert window.record() is True


def test_violation_clock_backwards_does_not_make_violations_look_old() -> None:
    clock = FakeClock(1000.0)
    window = ViolationWindow(1, 10.0, clock=clock)
    assert window.record() is False
    clock.now = 0.0  # backwards: this violation happened at "1000" at the earliest
    assert window.record() is True
    clock.now = 1005.0  # 5 s later, the one recorded while the clock was off still counts
    assert window.record() is True


@pytest.mark.parametrize(("limit", "seconds"), [(-1, 1.0), (1, 0.0), (1, -1.0), (1, math.nan)])
def test_violation_rejects_bad_parameters(limit: int, seconds: float) -> None:
    with pytest.raises(ValueError):
        ViolationWindow(limit, seconds, clock=FakeClock())
