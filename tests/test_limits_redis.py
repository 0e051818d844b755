"""The limits shared through a real redis-server (the ``redis_server`` fixture): each
:class:`QuotaStore` stands for one gateway instance, and two on one Redis behave as one gateway.

Connection slots per user, the heartbeat that keeps them (and lets a dead instance's go), the
attempts per address, the messages per user, and a store that goes down and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

import gateway.quotas
from gateway.errors import HandshakeRejected
from gateway.quotas import ConnectAttemptLimiter, QuotaStore, UserMessageQuota
from gateway.slots import KEY_PREFIX, ConnectionSlots
from tests.helpers import timeout
from tests.redis_server import RedisServer, tls_files
from tests.test_app import bearer, receive_json, rejection, running, token_for
from tests.test_session import World, send

__all__: list[str] = []

#: A short slot TTL: the heartbeat runs every quarter of it.
TTL_SECONDS = 1.0


@pytest.fixture(autouse=True)
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that failed is tried again after 0.1 s instead of 1 s."""
    monkeypatch.setattr(gateway.quotas, "RETRY_SECONDS", 0.1)


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[QuotaStore, QuotaStore]]:
    """Two instances' stores on one Redis."""
    one, two = QuotaStore(redis_server.url), QuotaStore(redis_server.url)
    yield one, two
    await one.close()
    await two.close()


@contextlib.asynccontextmanager
async def instance(store: QuotaStore, max_per_user: int = 2) -> AsyncIterator[ConnectionSlots]:
    """One instance's slots on ``store``, heartbeat running."""
    slots = ConnectionSlots(100, max_per_user, store=store, ttl_seconds=TTL_SECONDS)
    await slots.start()
    try:
        yield slots
    finally:
        await slots.close()


async def refused(acquire: Awaitable[object]) -> HandshakeRejected:
    with pytest.raises(HandshakeRejected) as info:
        async with asyncio.timeout(timeout(5)):
            await acquire
    return info.value


async def eventually(condition: Callable[[], Awaitable[bool]], seconds: float) -> float:
    """Poll ``condition`` until true, within ``seconds`` (scaled); the seconds it took."""
    started = time.monotonic()
    async with asyncio.timeout(timeout(seconds)):
        while not await condition():
            await asyncio.sleep(0.05)
    return time.monotonic() - started


# --- connection slots ----------------------------------------------------------------------


async def test_the_per_user_cap_holds_across_instances(
    stores: tuple[QuotaStore, QuotaStore],
) -> None:
    async with instance(stores[0]) as one, instance(stores[1]) as two:
        async with asyncio.timeout(timeout(5)):
            here = await one.acquire("alice")
            there = await two.acquire("alice")
        for slots in (one, two):
            error = await refused(slots.acquire("alice"))
            assert (error.status, error.error) == (429, "too_many_connections")
        assert (one.total, two.total) == (1, 1)  # the refusals took nothing
        async with asyncio.timeout(timeout(5)):
            await two.acquire("bob")  # another user is not affected
            await one.release(here)
            await two.acquire("alice")  # her slot came back, on the other instance
        error = await refused(one.acquire("alice"))
        assert error.status == 429
        assert there.user_id == "alice"


async def test_concurrent_takes_never_pass_the_cap(
    stores: tuple[QuotaStore, QuotaStore],
) -> None:
    async with instance(stores[0], max_per_user=3) as one, instance(stores[1], 3) as two:
        async with asyncio.timeout(timeout(5)):
            outcomes = await asyncio.gather(
                *(slots.acquire("alice") for slots in (one, two) * 10), return_exceptions=True
            )
    taken = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(taken) == 3
    assert all(
        isinstance(o, HandshakeRejected) and o.status == 429 for o in outcomes if o not in taken
    )
    assert one.total + two.total == 3


async def test_keys_expire_and_go_with_their_last_slot(
    stores: tuple[QuotaStore, QuotaStore],
) -> None:
    redis = stores[0].redis
    assert redis is not None
    async with instance(stores[0]) as one, asyncio.timeout(timeout(5)):
        slot = await one.acquire("alice")
        assert 0 < await redis.pttl(KEY_PREFIX + b"alice") <= TTL_SECONDS * 1000
        await one.release(slot)
        assert await redis.exists(KEY_PREFIX + b"alice") == 0


async def test_an_instance_that_stops_its_heartbeat_frees_its_slots_within_the_ttl(
    stores: tuple[QuotaStore, QuotaStore],
) -> None:
    async with instance(stores[1]) as survivor:
        dead = ConnectionSlots(100, 2, store=stores[0], ttl_seconds=TTL_SECONDS)
        await dead.start()
        async with asyncio.timeout(timeout(5)):
            await survivor.acquire("alice")  # the survivor's heartbeat keeps her key alive
            await dead.acquire("alice")
        # Alive, it keeps its own past the TTL: the heartbeat refreshes it.
        await asyncio.sleep(TTL_SECONDS * 2)
        assert (await refused(survivor.acquire("alice"))).status == 429
        async with asyncio.timeout(timeout(5)):
            await dead.close()  # as after kill -9: no heartbeat, nothing given back

        async def free() -> bool:
            try:
                await survivor.acquire("alice")
            except HandshakeRejected:
                return False
            return True

        took = await eventually(free, TTL_SECONDS * 3)
        assert took <= timeout(TTL_SECONDS + 0.5)


async def test_the_heartbeat_restores_the_slots_of_a_redis_restarted_empty(
    redis_server: RedisServer, stores: tuple[QuotaStore, QuotaStore]
) -> None:
    async with instance(stores[0]) as one, instance(stores[1]) as two:
        async with asyncio.timeout(timeout(5)):
            await one.acquire("alice")
            await one.acquire("alice")
        await redis_server.restart()
        redis = stores[1].redis
        assert redis is not None

        async def restored() -> bool:
            with contextlib.suppress(Exception):
                return bool(await redis.zcard(KEY_PREFIX + b"alice") == 2)
            return False

        await eventually(restored, TTL_SECONDS * 2)
        assert (await refused(two.acquire("alice"))).status == 429


async def test_a_store_down_refuses_with_503_and_a_slot_given_back_meanwhile_expires(
    redis_server: RedisServer,
    stores: tuple[QuotaStore, QuotaStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.slots")
    async with instance(stores[0]) as one, instance(stores[1]) as two:
        async with asyncio.timeout(timeout(5)):
            held = await one.acquire("alice")
        await redis_server.stop()
        started = time.monotonic()
        error = await refused(two.acquire("bob"))
        assert (error.status, error.error) == (503, "unavailable")
        assert error.headers["Retry-After"].isdigit()
        assert time.monotonic() - started < timeout(3)
        assert two.total == 0
        async with asyncio.timeout(timeout(5)):
            await one.release(held)  # never raises
        assert one.total == 0
        assert "a connection slot is left to expire" in caplog.text
        await redis_server.start()

        async def works() -> bool:
            try:
                await two.acquire("bob")
            except HandshakeRejected as failed:
                assert failed.status == 503
                return False
            return True

        await eventually(works, 5)


async def test_a_slot_given_back_during_a_refresh_does_not_come_back(
    stores: tuple[QuotaStore, QuotaStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = stores[0].redis
    assert redis is not None
    async with instance(stores[0]) as one:
        async with asyncio.timeout(timeout(5)):
            slot = await one.acquire("alice")
        shared = one._shared
        assert shared is not None
        in_flight, go_on = asyncio.Event(), asyncio.Event()
        refresh_batch = shared._refresh_batch

        async def slow_refresh_batch(batch: Sequence[tuple[str, list[bytes]]]) -> None:
            in_flight.set()
            await go_on.wait()  # its members were read before the release below
            await refresh_batch(batch)

        monkeypatch.setattr(shared, "_refresh_batch", slow_refresh_batch)
        async with asyncio.timeout(timeout(5)):
            refresh = asyncio.create_task(shared.refresh())
            await in_flight.wait()
            release = asyncio.create_task(one.release(slot))
            await asyncio.sleep(0.05)
            go_on.set()
            await asyncio.gather(refresh, release)
            assert await redis.zcard(KEY_PREFIX + b"alice") == 0


async def test_a_redis_restarted_is_used_again_at_once(
    redis_server: RedisServer, stores: tuple[QuotaStore, QuotaStore]
) -> None:
    limiter = ConnectAttemptLimiter("100/minute", stores[0])
    async with asyncio.timeout(timeout(5)):
        assert await limiter.hit("192.0.2.1") is None  # its connection is pooled now
        await redis_server.restart()
        assert await limiter.hit("192.0.2.1") is None  # that one died: a new one, no 503


async def test_a_take_cancelled_midway_takes_nothing_here(
    stores: tuple[QuotaStore, QuotaStore],
) -> None:
    async with instance(stores[0], max_per_user=1) as one:
        attempt = asyncio.create_task(one.acquire("alice"))
        await asyncio.sleep(0)  # counted here, its script on its way
        assert one.total == 1
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(timeout(5)):
                await attempt
        assert (one.total, one.for_user("alice")) == (0, 0)


# --- attempts and messages -----------------------------------------------------------------


async def test_the_attempt_rate_is_shared_across_instances(
    stores: tuple[QuotaStore, QuotaStore],
) -> None:
    one, two = (ConnectAttemptLimiter("3/minute", store) for store in stores)
    async with asyncio.timeout(timeout(5)):
        assert [await one.hit("192.0.2.1"), await two.hit("192.0.2.1")] == [None, None]
        assert await one.hit("192.0.2.1") is None
        for limiter in (one, two):
            wait = await limiter.hit("192.0.2.1")
            assert wait is not None and 1 <= wait <= 60
        assert await two.hit("192.0.2.2") is None


async def test_the_message_quota_is_shared_by_a_users_sessions_on_two_instances(
    stores: tuple[QuotaStore, QuotaStore],
) -> None:
    worlds = [await World(quota=UserMessageQuota("3/minute", store)).start() for store in stores]
    here, there = await worlds[0].session("alice"), await worlds[1].session("alice")
    async with asyncio.timeout(timeout(5)):
        assert [f["type"] for f in await send(here, type="ping")] == ["pong"]
        for _ in range(2):
            assert [f["type"] for f in await send(there, type="ping")] == ["pong"]
        for session in (here, there):
            [error] = await send(session, type="ping")
            assert error["code"] == "rate_limited"
            assert 1 <= error["retry_after_ms"] <= 60_000
        bob = await worlds[1].session("bob")
        assert [f["type"] for f in await send(bob, type="ping")] == ["pong"]


async def test_rediss_verifies_the_servers_certificate_against_the_ca_file(
    tmp_path: Path,
) -> None:
    pair, ca_file = tls_files(tmp_path)
    server = RedisServer(tmp_path, tls=pair)
    await server.start()
    trusted, stranger = QuotaStore(server.url, ca_file=ca_file), QuotaStore(server.url)
    try:
        assert server.url.startswith("rediss://")
        async with asyncio.timeout(timeout(5)):
            assert await trusted.healthy() is True
            assert await stranger.healthy() is False  # the system's CAs never signed it
    finally:
        await trusted.close()
        await stranger.close()
        await server.stop()


# --- the app ---------------------------------------------------------------------------------


async def test_an_upgrade_with_the_store_down_is_503_and_works_again_once_it_is_back(
    redis_server: RedisServer,
) -> None:
    overrides = {"GATEWAY_RATELIMIT_STORAGE_URL": redis_server.url}
    async with running(overrides) as (_, client):
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            assert (await receive_json(ws))["type"] == "welcome"
        await redis_server.stop()
        started = time.monotonic()
        response = await rejection(client, headers=bearer(token_for("alice")))
        assert time.monotonic() - started < timeout(3)  # refused, not hung
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        assert (await response.get_json())["error"] == "unavailable"
        await redis_server.start()
        await asyncio.sleep(0.2)  # past the store's retry pause
        async with client.websocket("/ws", headers=bearer(token_for("alice"))) as ws:
            assert (await receive_json(ws))["type"] == "welcome"
