"""Tests for gateway.quotas: the store, attempts per address, messages per user.

Everything here runs on ``memory://``, or on a Redis that cannot answer; the tests through a
real redis-server are in tests/test_limits_redis.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator

import pytest
from limits.aio.storage import MemoryStorage

import gateway.quotas
from gateway.errors import HandshakeRejected
from gateway.quotas import (
    ConnectAttemptLimiter,
    QuotaStore,
    StoreUnavailable,
    UserMessageQuota,
    address_key,
)
from tests.helpers import timeout

__all__: list[str] = []

#: Port 1 on loopback: nothing listens, a connection is refused at once.
REFUSED_URL = "redis://:hunter2@127.0.0.1:1/0"


@pytest.fixture
async def memory() -> AsyncIterator[QuotaStore]:
    store = QuotaStore("memory://")
    yield store
    await store.close()


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


# --- QuotaStore ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["memcached://localhost", "http://x", "", "redis"])
def test_the_store_rejects_other_schemes(url: str) -> None:
    with pytest.raises(ValueError):
        QuotaStore(url)


def test_a_store_error_never_shows_the_url_password() -> None:
    for url in ("mongodb://user:hunter2@db/limits", "redis://:hunter2@127.0.0.1:notaport/0"):
        with pytest.raises(ValueError) as info:
            QuotaStore(url)
        assert "hunter2" not in str(info.value)


async def test_the_memory_store_sweeps_in_place_at_most_every_sweep_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # limits would start a sweep task of every key after each hit that finds the last one
    # finished: work per message that grows with the users, and (moving window) a lock held
    # across a thread hop that every hit of the key queues behind.
    monkeypatch.setattr(gateway.quotas, "SWEEP_SECONDS", 100.0)
    rare = QuotaStore("memory://")  # swept at its first hit, then not for 100 s
    await ConnectAttemptLimiter("2/second", rare).hit("192.0.2.1")
    monkeypatch.setattr(gateway.quotas, "SWEEP_SECONDS", 0.0)
    often = QuotaStore("memory://")  # swept at every hit
    await ConnectAttemptLimiter("2/second", often).hit("192.0.2.1")
    await UserMessageQuota("2/second", often).hit("alice")
    await asyncio.sleep(1.05)  # the attempts have expired; the counter lives 2 windows:
    assert isinstance(rare.storage, MemoryStorage) and isinstance(often.storage, MemoryStorage)
    [counter] = often.storage.expirations
    often.storage.expirations[counter] = time.time()  # it expires now
    for store in (rare, often):
        await ConnectAttemptLimiter("2/second", store).hit("192.0.2.2")
    assert len(rare.storage.events) == 2
    [(key, _)] = often.storage.events.items()  # the expired address is gone...
    assert "192.0.2.2" in key
    assert often.storage.expirations == {}  # ...and the user's counter
    assert counter not in often.storage.storage
    assert rare.storage.timer is None and often.storage.timer is None  # never a task


async def test_an_unanswering_redis_fails_every_call_within_one_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server that accepts connections and never answers: only the socket timeout can tell.
    monkeypatch.setattr(gateway.quotas, "STORAGE_TIMEOUT_SECONDS", 0.2)
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    store = QuotaStore(f"redis://127.0.0.1:{port}/0")
    assert store.redis is not None
    redis = store.redis
    try:
        started = time.monotonic()
        async with asyncio.timeout(timeout(5)):
            outcomes = await asyncio.gather(
                *(store.call(redis.ping) for _ in range(100)), return_exceptions=True
            )
            failed = time.monotonic()
            # Down for RETRY_SECONDS: the next call fails at once, without a round trip.
            with pytest.raises(StoreUnavailable):
                await store.call(redis.ping)
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes)
        assert time.monotonic() - failed < timeout(0.1)
        assert failed - started < timeout(0.8)  # 100 calls, 64 at a time: not 100 timeouts
    finally:
        await store.close()
        silent.close()
        for writer in accepted:
            writer.close()


async def test_a_failed_store_is_tried_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.quotas, "RETRY_SECONDS", 0.05)
    store = QuotaStore(REFUSED_URL)
    calls = 0

    async def command() -> int:
        nonlocal calls
        calls += 1
        raise OSError("refused")

    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await store.call(command)
        assert calls == 1  # the second failed at once
        await asyncio.sleep(0.06)
        with pytest.raises(StoreUnavailable):
            await store.call(command)
        assert calls == 2
    finally:
        await store.close()


# --- ConnectAttemptLimiter ---------------------------------------------------------------


async def test_connect_limiter_memory_really_limits(memory: QuotaStore) -> None:
    limiter = ConnectAttemptLimiter("3/minute", memory)
    assert [await limiter.hit("192.0.2.1") for _ in range(3)] == [None, None, None]
    wait = await limiter.hit("192.0.2.1")
    assert wait is not None
    assert 1 <= wait <= 60
    assert wait == math.floor(wait)  # whole seconds, ready for Retry-After
    assert await limiter.hit("192.0.2.1") is not None  # refusals are not free passes
    assert await limiter.hit("192.0.2.2") is None  # another address, its own quota
    assert await memory.healthy() is True


async def test_connect_limiter_keys_are_not_confused(memory: QuotaStore) -> None:
    limiter = ConnectAttemptLimiter("1/minute", memory)
    assert await limiter.hit("a/b") is None
    assert await limiter.hit("a") is None
    assert await limiter.hit("a/b") is not None


@pytest.mark.parametrize("rate", ["", "often", "0/minute", "30/minute;5/second", "-1/second"])
def test_both_quotas_reject_bad_rates(rate: str) -> None:
    store = QuotaStore("memory://")
    with pytest.raises(ValueError):
        ConnectAttemptLimiter(rate, store)
    with pytest.raises(ValueError):
        UserMessageQuota(rate, store)


async def test_connect_limiter_unreachable_redis_fails_closed_with_503() -> None:
    store = QuotaStore(REFUSED_URL)
    try:
        assert await store.healthy() is False
        with pytest.raises(HandshakeRejected) as info:
            await ConnectAttemptLimiter("3/minute", store).hit("192.0.2.1")
        assert (info.value.status, info.value.error) == (503, "unavailable")
        assert info.value.headers["Retry-After"].isdigit()
        assert "hunter2" not in str(info.value)
    finally:
        await store.close()


# --- UserMessageQuota ----------------------------------------------------------------------


async def test_the_message_quota_limits_each_user(memory: QuotaStore) -> None:
    quota = UserMessageQuota("3/minute", memory)
    assert [await quota.hit("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = await quota.hit("alice")
    assert 0 < wait <= 60
    assert await quota.hit("bob") == 0.0  # another user, its own quota
    assert await quota.hit("alice") > 0  # still refused


async def test_the_message_quota_fails_open_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.quotas")
    store = QuotaStore(REFUSED_URL)
    quota = UserMessageQuota("1/minute", store)
    try:
        async with asyncio.timeout(timeout(5)):
            assert [await quota.hit("alice") for _ in range(5)] == [0.0] * 5
    finally:
        await store.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "user message quota not enforced: the quota store is unavailable"
    ]
    assert "hunter2" not in caplog.text
