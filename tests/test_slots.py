"""Tests for gateway.slots in one process (no store, or ``memory://``); the slots shared through
a real redis-server are in tests/test_limits_redis.py."""

from __future__ import annotations

import pytest

from gateway.errors import HandshakeRejected
from gateway.quotas import QuotaStore
from gateway.slots import ConnectionSlots

__all__: list[str] = []


async def test_slots_per_user_cap_is_429() -> None:
    slots = ConnectionSlots(max_total=10, max_per_user=2)
    await slots.acquire("u1")
    await slots.acquire("u1")
    with pytest.raises(HandshakeRejected) as info:
        await slots.acquire("u1")
    assert (info.value.status, info.value.error) == (429, "too_many_connections")
    assert info.value.headers == {"Retry-After": "5"}
    assert slots.for_user("u1") == 2
    assert slots.total == 2
    await slots.acquire("u2")  # others are not affected
    assert slots.total == 3


async def test_slots_total_cap_is_503_and_checked_first() -> None:
    slots = ConnectionSlots(max_total=2, max_per_user=1)
    await slots.acquire("u1")
    await slots.acquire("u2")
    with pytest.raises(HandshakeRejected) as info:
        await slots.acquire("u1")  # over both caps: the server being full is what is reported
    assert (info.value.status, info.value.error) == (503, "server_full")
    assert info.value.headers == {"Retry-After": "5"}
    assert slots.total == 2


async def test_slots_release_frees_and_drops_empty_users() -> None:
    slots = ConnectionSlots(max_total=2, max_per_user=2)
    first = await slots.acquire("u1")
    second = await slots.acquire("u1")
    await slots.release(first)
    assert (slots.total, slots.for_user("u1")) == (1, 1)
    await slots.release(second)
    assert (slots.total, slots.for_user("u1")) == (0, 0)
    assert slots._per_user == {}
    await slots.acquire("u2")
    await slots.acquire("u2")  # the full total is available again


async def test_a_slot_released_twice_frees_one() -> None:
    slots = ConnectionSlots(max_total=2, max_per_user=2)
    mine = await slots.acquire("u1")
    await slots.acquire("u2")
    await slots.release(mine)
    await slots.release(mine)  # again: nothing
    assert (slots.total, slots.for_user("u2")) == (1, 1)
    await slots.acquire("u3")
    with pytest.raises(HandshakeRejected):
        await slots.acquire("u4")  # the cap still holds: the extra release bought no slot


async def test_slots_failed_acquire_takes_nothing() -> None:
    slots = ConnectionSlots(max_total=5, max_per_user=1)
    await slots.acquire("u1")
    for _ in range(3):
        with pytest.raises(HandshakeRejected):
            await slots.acquire("u1")
    assert (slots.total, slots.for_user("u1")) == (1, 1)


async def test_a_memory_store_keeps_the_slots_in_this_process() -> None:
    store = QuotaStore("memory://")
    slots = ConnectionSlots(max_total=5, max_per_user=1, store=store)
    await slots.start()
    try:
        await slots.acquire("u1")
        with pytest.raises(HandshakeRejected):
            await slots.acquire("u1")
        other = ConnectionSlots(max_total=5, max_per_user=1, store=store)
        await other.acquire("u1")  # another process's count: nothing shared without Redis
    finally:
        await slots.close()
        await store.close()


@pytest.mark.parametrize(("total", "per_user", "ttl"), [(0, 1, 1.0), (1, 0, 1.0), (1, 1, 0.0)])
def test_slots_reject_bad_caps(total: int, per_user: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        ConnectionSlots(total, per_user, ttl_seconds=ttl)
