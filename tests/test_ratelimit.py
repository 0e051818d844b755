"""Tests for gateway.ratelimit: every timing assertion runs on a fake clock."""

from __future__ import annotations

import math

import pytest

from gateway.errors import HandshakeRejected
from gateway.ratelimit import (
    ConnectAttemptLimiter,
    ConnectionSlots,
    TokenBucket,
    ViolationWindow,
    address_key,
)


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
    for _ in range(10_000):
        window.record()
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


# --- address_key -------------------------------------------------------------------------


def test_address_key_groups_an_ipv6_slash_64() -> None:
    a = address_key("2001:db8:1:2:aaaa::1")
    b = address_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert a == b == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != a


def test_address_key_ipv4_and_mapped_ipv4_are_one_key() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("192.0.2.8") != "192.0.2.7"


def test_address_key_leaves_non_addresses_alone() -> None:
    assert address_key("") == ""
    assert address_key("unix:/run/gw.sock") == "unix:/run/gw.sock"


# --- ConnectAttemptLimiter ---------------------------------------------------------------


async def test_connect_limiter_memory_really_limits() -> None:
    limiter = ConnectAttemptLimiter("3/minute", "memory://")
    try:
        assert [await limiter.hit("192.0.2.1") for _ in range(3)] == [None, None, None]
        wait = await limiter.hit("192.0.2.1")
        assert wait is not None
        assert 1 <= wait <= 60
        assert wait == math.floor(wait)  # whole seconds, ready for Retry-After
        assert await limiter.hit("192.0.2.1") is not None  # refusals are not free passes
        assert await limiter.hit("192.0.2.2") is None  # another address, its own quota
        assert await limiter.healthy() is True
    finally:
        await limiter.close()


async def test_connect_limiter_keys_are_not_confused() -> None:
    limiter = ConnectAttemptLimiter("1/minute", "memory://")
    try:
        assert await limiter.hit("a/b") is None
        assert await limiter.hit("a") is None
        assert await limiter.hit("a/b") is not None
    finally:
        await limiter.close()


@pytest.mark.parametrize("rate", ["", "often", "0/minute", "30/minute;5/second", "-1/second"])
def test_connect_limiter_rejects_bad_rates(rate: str) -> None:
    with pytest.raises(ValueError):
        ConnectAttemptLimiter(rate, "memory://")


@pytest.mark.parametrize("url", ["memcached://localhost", "http://x", "", "redis"])
def test_connect_limiter_rejects_other_storages(url: str) -> None:
    with pytest.raises(ValueError):
        ConnectAttemptLimiter("3/minute", url)


def test_connect_limiter_error_never_shows_the_url_password() -> None:
    with pytest.raises(ValueError) as info:
        ConnectAttemptLimiter("3/minute", "mongodb://user:hunter2@db/limits")
    assert "hunter2" not in str(info.value)


async def test_connect_limiter_unreachable_redis_fails_closed_with_503() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    limiter = ConnectAttemptLimiter("3/minute", "redis://:hunter2@127.0.0.1:1/0")
    try:
        assert await limiter.healthy() is False
        with pytest.raises(HandshakeRejected) as info:
            await limiter.hit("192.0.2.1")
        assert info.value.status == 503
        assert info.value.headers["Retry-After"].isdigit()
        assert "hunter2" not in str(info.value)
    finally:
        await limiter.close()


# --- ConnectionSlots ---------------------------------------------------------------------


def test_slots_per_user_cap_is_429() -> None:
    slots = ConnectionSlots(max_total=10, max_per_user=2)
    slots.acquire("u1")
    slots.acquire("u1")
    with pytest.raises(HandshakeRejected) as info:
        slots.acquire("u1")
    assert (info.value.status, info.value.error) == (429, "too_many_connections")
    assert info.value.headers == {"Retry-After": "5"}
    assert slots.for_user("u1") == 2
    assert slots.total == 2
    slots.acquire("u2")  # others are not affected
    assert slots.total == 3


def test_slots_total_cap_is_503_and_checked_first() -> None:
    slots = ConnectionSlots(max_total=2, max_per_user=1)
    slots.acquire("u1")
    slots.acquire("u2")
    with pytest.raises(HandshakeRejected) as info:
        slots.acquire("u1")  # over both caps: the server being full is what is reported
    assert (info.value.status, info.value.error) == (503, "server_full")
    assert info.value.headers == {"Retry-After": "5"}
    assert slots.total == 2


def test_slots_release_frees_and_drops_empty_users() -> None:
    slots = ConnectionSlots(max_total=2, max_per_user=2)
    slots.acquire("u1")
    slots.acquire("u1")
    slots.release("u1")
    assert (slots.total, slots.for_user("u1")) == (1, 1)
    slots.release("u1")
    assert (slots.total, slots.for_user("u1")) == (0, 0)
    assert slots._per_user == {}
    slots.acquire("u2")
    slots.acquire("u2")  # the full total is available again


def test_slots_release_never_goes_negative() -> None:
    slots = ConnectionSlots(max_total=1, max_per_user=1)
    slots.acquire("u1")
    slots.release("u2")  # never acquired
    slots.release("u1")
    slots.release("u1")  # twice
    assert slots.total == 0
    assert slots.for_user("u1") == 0
    slots.acquire("u3")
    with pytest.raises(HandshakeRejected):
        slots.acquire("u4")  # the cap still holds: extra releases bought no slots


def test_slots_failed_acquire_takes_nothing() -> None:
    slots = ConnectionSlots(max_total=5, max_per_user=1)
    slots.acquire("u1")
    for _ in range(3):
        with pytest.raises(HandshakeRejected):
            slots.acquire("u1")
    assert (slots.total, slots.for_user("u1")) == (1, 1)


@pytest.mark.parametrize(("total", "per_user"), [(0, 1), (1, 0), (-1, -1)])
def test_slots_reject_bad_caps(total: int, per_user: int) -> None:
    with pytest.raises(ValueError):
        ConnectionSlots(total, per_user)
