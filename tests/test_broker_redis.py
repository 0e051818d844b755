"""The Redis broker across instances: several RedisBroker instances, each standing for a gateway,
on one real redis-server of the test's own (tests/redis_server.py). Fan-out and one order both
ways, presence per user, an instance that dies, Redis restarted empty, messages published
straight into Redis, a password, TLS, health. The behaviour every broker shares is in
tests/test_broker.py, which runs against Redis too."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
import redis.asyncio
import trustme

from gateway.broker import Envelope, Member, MemberPage, RoomUpdate
from gateway.broker.redis import RedisBroker
from gateway.broker.wire import INSTANCE_BYTES, WINDOW_BACK_MS, Opener, Rejected, Sealer, channel
from gateway.errors import BrokerUnavailable
from gateway.history import Recovery
from gateway.settings import redact_url
from tests.helpers import make_settings, timeout
from tests.redis_server import RedisServer, tls_files
from tests.test_broker import ALICE, BOB, CAROL, Inbox, ids_of, numbered, tell

DAVE = Member("u-dave", "Dave")

#: The smallest presence TTL the settings allow: a heartbeat every 0.75 s.
TTL = 3.0

#: The broker key of make_settings() (derived from its JWT secret in development).
_SETTINGS = make_settings()
assert _SETTINGS.broker_secret is not None
KEY = _SETTINGS.broker_secret.get().encode()


class Recorder:
    """The observer: everything the broker reported."""

    def __init__(self) -> None:
        self.published = 0
        self.received = 0
        self.dropped: Counter[str] = Counter()
        self.reconnected = 0

    def broker_published(self, seconds: float) -> None:
        assert 0 <= seconds < 10
        self.published += 1

    def broker_received(self) -> None:
        self.received += 1

    def broker_dropped(self, reason: str) -> None:
        self.dropped[reason] += 1

    def broker_reconnected(self) -> None:
        self.reconnected += 1


@dataclass
class Gateway:
    """One instance: its broker, what it delivered, reported, and announced as left."""

    broker: RedisBroker
    inbox: Inbox = field(default_factory=Inbox)
    observer: Recorder = field(default_factory=Recorder)
    left: list[tuple[str, Member]] = field(default_factory=list)

    async def member_left(self, room: str, member: Member) -> None:
        self.left.append((room, member))


class StartGateway(Protocol):
    async def __call__(self, url: str, **env: str) -> Gateway: ...


@pytest.fixture
async def gateways() -> AsyncIterator[StartGateway]:
    """Starts a gateway's broker on a Redis URL (with GATEWAY_* overrides); closes them all."""
    started: list[Gateway] = []

    async def start(url: str, **env: str) -> Gateway:
        overrides = {"GATEWAY_BROKER_URL": url, "GATEWAY_PRESENCE_TTL_SECONDS": str(TTL), **env}
        observer = Recorder()
        gateway = Gateway(RedisBroker(make_settings(overrides), observer), observer=observer)
        started.append(gateway)
        await gateway.broker.start(gateway.inbox, gateway.member_left)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            async with asyncio.timeout(timeout(10)):
                await gateway.broker.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client of the test's Redis: what anyone who can reach Redis can do."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], seconds: float, what: str
) -> float:
    """Wait until ``check()`` is true, polling; the seconds it took.

    Raises:
        AssertionError: when it is still false after ``seconds`` (scaled).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout(seconds)
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return loop.time() - started
        assert loop.time() < deadline, f"{what}: not within {seconds} s"
        await asyncio.sleep(0.05)


async def answers(broker: RedisBroker) -> bool:
    async with asyncio.timeout(timeout(3)):
        return await broker.healthy()


async def abandon(broker: RedisBroker) -> None:
    """As if the instance's process died: its tasks stop and its connections drop, and
    nothing is cleaned up (a close() afterwards finds Redis unreachable and removes nothing)."""
    tasks = broker._tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await broker._client.connection_pool.disconnect()


# --- fan-out and order -------------------------------------------------------------------


async def test_fan_out_both_ways(redis_server: RedisServer, gateways: StartGateway) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    for gateway in (a, b):
        await gateway.broker.subscribe("lobby")
    await b.broker.subscribe("b-only")
    await a.broker.publish(Envelope("lobby", "from a"))
    await b.broker.publish(Envelope("lobby", "from b"))
    await a.broker.publish(Envelope("b-only", "for b"))
    await a.broker.publish(Envelope("lobby", "end"))
    await a.inbox.wait_for(3)
    await b.inbox.wait_for(4)
    assert a.inbox.payloads() == ["from a", "from b", "end"]
    assert b.inbox.payloads() == ["from a", "from b", "for b", "end"]
    assert (a.observer.published, b.observer.published) == (3, 1)
    assert (a.observer.received, b.observer.received) == (3, 4)
    assert a.observer.dropped == b.observer.dropped == Counter()


async def test_one_order_per_room_under_concurrent_publishers_on_both_instances(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    for gateway in (a, b):
        await gateway.broker.subscribe("race")
    per_instance = 300
    ids = await asyncio.gather(
        *(a.broker.publish_numbered(numbered("race", n)) for n in range(per_instance)),
        *(b.broker.publish_numbered(numbered("race", -n)) for n in range(1, per_instance + 1)),
    )
    first = min(ids)
    assert sorted(ids) == list(range(first, first + 2 * per_instance))  # by one, none lost
    for gateway in (a, b):
        await gateway.inbox.wait_for(2 * per_instance)
    assert ids_of(a.inbox, "race") == ids_of(b.inbox, "race") == sorted(ids)  # strictly increasing
    assert a.inbox.payloads() == b.inbox.payloads()  # the same sequence at both


async def test_nothing_of_a_room_is_delivered_once_unsubscribe_returns(
    redis_server: RedisServer, gateways: StartGateway, raw: redis.asyncio.Redis
) -> None:
    a = await gateways(redis_server.url)
    await a.broker.subscribe("r")
    await a.broker.subscribe("marker")
    sealer = Sealer(KEY, b"s" * INSTANCE_BYTES)
    async with raw.pipeline(transaction=False) as pipe:
        for n in range(5000):  # many still in flight when the unsubscribe comes
            pipe.publish(channel("r"), sealer.seal(Envelope("r", f"{n}")))
        await pipe.execute()
    await a.broker.unsubscribe("r")
    delivered = len(a.inbox.payloads("r"))
    await a.broker.publish(Envelope("marker", "end"))
    await eventually(lambda: a.inbox.payloads("marker") == ["end"], 5, "the marker")
    assert len(a.inbox.payloads("r")) == delivered


# --- presence ------------------------------------------------------------------------------


async def test_a_user_on_two_instances_joins_once_and_leaves_once(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    assert await a.broker.presence_add("r", ALICE, "a1") is True
    assert await b.broker.presence_add("r", ALICE, "b1") is False  # already in, on a
    assert await b.broker.presence_add("r", BOB, "b2") is True
    assert await a.broker.members("r") == await b.broker.members("r") == [ALICE, BOB]
    renamed = Member(ALICE.id, "Alice Renamed")
    assert await b.broker.presence_add("r", renamed, "b1") is False  # a refresh on b
    assert await a.broker.members("r") == [renamed, BOB]
    assert await a.broker.presence_remove("r", ALICE.id, "a1") is False  # still on b
    assert await a.broker.presence_remove("r", BOB.id, "b2") is False  # b's entry, not a's
    assert await b.broker.presence_remove("r", ALICE.id, "b1") is True  # her last, anywhere
    assert await a.broker.members("r") == [BOB]
    # Entries outlive the TTL while their instance's heartbeat refreshes them.
    await asyncio.sleep(TTL + 1)
    assert await a.broker.members("r") == await b.broker.members("r") == [BOB]
    assert a.left == b.left == []


async def test_removals_racing_the_heartbeat_leave_no_zombie_entries(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    a = await gateways(redis_server.url)
    loop = asyncio.get_running_loop()
    until = loop.time() + 3 * TTL / 4 + 0.2  # across three heartbeats at least

    async def come_and_go(worker: int) -> None:
        member = Member(f"u{worker}", f"User {worker}")
        while loop.time() < until:
            assert await a.broker.presence_add("r", member, "c") is True
            await asyncio.sleep(0.002)  # present for a moment: the heartbeat may see it
            assert await a.broker.presence_remove("r", member.id, "c") is True

    await asyncio.gather(*(come_and_go(worker) for worker in range(50)))
    assert await a.broker.members("r") == []
    assert a.left == []


async def test_a_dead_instances_users_leave_once_within_the_ttl(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    doomed, b, c = [await gateways(redis_server.url) for _ in range(3)]
    for survivor in (b, c):
        await survivor.broker.subscribe("r")
    for member, conn in ((ALICE, "d1"), (ALICE, "d2"), (CAROL, "d3"), (DAVE, "d4")):
        await doomed.broker.presence_add("r", member, conn)
    await b.broker.presence_add("r", DAVE, "b1")  # Dave is on a survivor too: he stays
    await c.broker.presence_add("r", BOB, "c1")
    await abandon(doomed.broker)
    took = await eventually(
        lambda: len(b.left) + len(c.left) >= 2, TTL + TTL / 4 + 2, "the dead instance's users"
    )
    assert took < timeout(TTL + TTL / 4 + 0.5)  # expiry, then one heartbeat of a survivor
    await asyncio.sleep(TTL / 2)  # two more heartbeats each: nobody leaves twice
    assert sorted(b.left + c.left, key=lambda left: left[1].id) == [("r", ALICE), ("r", CAROL)]
    assert await b.broker.members("r") == await c.broker.members("r") == [BOB, DAVE]


async def test_members_prunes_the_entries_of_a_dead_instance_too(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    doomed, b = await gateways(redis_server.url), await gateways(redis_server.url)
    await doomed.broker.presence_add("quiet", ALICE, "d1")
    await abandon(doomed.broker)  # b is not subscribed to the room: its heartbeat leaves it
    await asyncio.sleep(TTL + 0.2)
    assert await b.broker.members("quiet") == []
    assert b.left == [("quiet", ALICE)]
    assert await b.broker.members("quiet") == []
    assert b.left == [("quiet", ALICE)]


async def test_the_heartbeat_restores_entries_that_vanished_without_a_join(
    redis_server: RedisServer, gateways: StartGateway, raw: redis.asyncio.Redis
) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    await b.broker.subscribe("r")
    await a.broker.presence_add("r", ALICE, "a1")
    await a.broker.presence_add("r", ALICE, "a2")
    await raw.flushall()  # as if Redis lost its data under a live connection
    assert await b.broker.members("r") == []
    await eventually(lambda: _members_are(b.broker, "r", [ALICE]), TTL / 4 + 1, "entries restored")
    assert a.left == b.left == []
    # Restored as two connections: the user leaves with the second one only.
    assert await a.broker.presence_remove("r", ALICE.id, "a1") is False
    assert await a.broker.presence_remove("r", ALICE.id, "a2") is True


async def _members_are(broker: RedisBroker, room: str, expected: list[Member]) -> bool:
    try:
        return await broker.members(room) == expected
    except BrokerUnavailable:
        return False


async def test_presence_keys_expire_and_a_room_left_leaves_no_presence_keys(
    redis_server: RedisServer, gateways: StartGateway, raw: redis.asyncio.Redis
) -> None:
    a = await gateways(redis_server.url)
    await a.broker.presence_add("r", ALICE, "a1")
    await a.broker.publish_numbered(numbered("r", 0))
    presence = [f"gateway:room:{{r}}:{what}" for what in ("conns", "users", "names")]
    for key in presence:
        assert 0 < await raw.pttl(key) <= 3 * TTL * 1000
    assert await raw.pttl("gateway:room:{r}:seq") > 0
    history_ttl_ms = _SETTINGS.history_ttl_seconds * 1000
    assert 0 < await raw.pttl("gateway:room:{r}:history") <= history_ttl_ms
    await a.broker.presence_remove("r", ALICE.id, "a1")
    assert await raw.exists(*presence) == 0
    assert await raw.dbsize() == 2  # the id counter and the history, which expire on their own


async def test_close_removes_this_instances_presence_and_announces_who_left(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    await b.broker.subscribe("r")
    await a.broker.presence_add("r", ALICE, "a1")
    await a.broker.presence_add("r", CAROL, "a2")
    await b.broker.presence_add("r", CAROL, "b1")
    await a.broker.close()
    await a.broker.close()  # twice is fine
    assert a.left == [("r", ALICE)]  # Carol is still on b
    assert await b.broker.members("r") == [CAROL]
    assert await a.broker.healthy() is False
    with pytest.raises(RuntimeError):
        await a.broker.publish(Envelope("r", "x"))


# --- large rooms ---------------------------------------------------------------------------


async def test_a_room_update_is_published_by_one_instance_only(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    for gateway in (a, b):
        await gateway.broker.subscribe("r")
    for member, gateway in ((ALICE, a), (BOB, b), (CAROL, a)):
        await gateway.broker.presence_add("r", member, "c")
    both = [await g.broker.room_update("r", 2) for g in (a, b)]
    assert both == [RoomUpdate(3)] * 2  # both instances saw the change and ask
    published = await asyncio.gather(
        *(g.broker.publish_room_update("r", RoomUpdate(3), Envelope("r", "3")) for g in (a, b))
    )
    assert sorted(published) == [False, True]  # one of them tells the room
    await b.broker.presence_remove("r", BOB.id, "c")
    small = await a.broker.room_update("r", 2)
    assert small == RoomUpdate(2, (ALICE, CAROL))
    assert await a.broker.publish_room_update("r", small, Envelope("r", "small")) is True
    assert await b.broker.room_update("r", 2) is None
    for gateway in (a, b):
        await gateway.inbox.wait_for(2)
        assert len(gateway.inbox.payloads("r")) == 2
        assert gateway.inbox.payloads("r")[1] == "small"


async def test_a_page_of_a_big_room_costs_the_page_and_the_count(
    redis_server: RedisServer, gateways: StartGateway, raw: redis.asyncio.Redis
) -> None:
    a = await gateways(redis_server.url)
    everyone = [Member(f"u{i:04}", f"User {i}") for i in range(1000)]
    await asyncio.gather(*(a.broker.presence_add("big", m, "c") for m in everyone))
    assert await raw.object("encoding", "gateway:room:{big}:names") == b"hashtable"
    pages = [await a.broker.members_page("big", 20) for _ in range(3)]
    for page in pages:
        assert (len(page.members), page.total) == (20, 1000)
        assert set(page.members) <= set(everyone)
    assert len({page.members for page in pages}) > 1  # random pages: nobody is always shown
    assert await a.broker.member_count("big") == 1000


async def test_pages_and_updates_prune_a_dead_instances_users_first(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    doomed, b = await gateways(redis_server.url), await gateways(redis_server.url)
    for room in ("paged", "updated"):  # b is not subscribed: its heartbeat leaves them be
        for member in (ALICE, CAROL, DAVE):
            await doomed.broker.presence_add(room, member, "d")
        await b.broker.presence_add(room, BOB, "b")
        assert await tell(b.broker, room, 1) == RoomUpdate(4)
    await abandon(doomed.broker)
    await asyncio.sleep(TTL + 0.2)
    assert await b.broker.members_page("paged", 1) == MemberPage((BOB,), 1)
    assert await b.broker.room_update("updated", 1) == RoomUpdate(1, (BOB,))
    gone = [("paged", m) for m in (ALICE, CAROL, DAVE)] + [
        ("updated", m) for m in (ALICE, CAROL, DAVE)
    ]
    assert sorted(b.left, key=lambda left: (left[0], left[1].id)) == gone


async def test_what_a_room_was_told_lives_with_its_presence_and_goes_with_it(
    redis_server: RedisServer, gateways: StartGateway, raw: redis.asyncio.Redis
) -> None:
    a = await gateways(redis_server.url)
    told = "gateway:room:{r}:told"
    for member in (ALICE, BOB):
        await a.broker.presence_add("r", member, "a")
    assert await tell(a.broker, "r", 1) == RoomUpdate(2)
    assert await raw.get(told) == b"2"
    assert 0 < await raw.pttl(told) <= 3 * TTL * 1000
    await asyncio.sleep(TTL / 2)  # two heartbeats: the key's expiry is refreshed with the rest
    assert await raw.pttl(told) > 3 * TTL * 1000 - TTL / 4 * 1000 - 500
    for member in (ALICE, BOB):
        await a.broker.presence_remove("r", member.id, "a")
    assert await raw.dbsize() == 0  # no presence key left, the told count included


# --- outages -------------------------------------------------------------------------------


async def test_redis_restarted_empty_mid_stream(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    for gateway in (a, b):
        await gateway.broker.subscribe("lobby")
    await a.broker.subscribe("dropped-while-down")
    await a.broker.presence_add("lobby", ALICE, "a1")
    await a.broker.presence_add("lobby", CAROL, "a2")
    await b.broker.presence_add("lobby", BOB, "b1")
    before = await a.broker.publish_numbered(numbered("lobby", 0))

    await redis_server.stop()
    down: list[Callable[[], Awaitable[object]]] = [
        lambda: a.broker.publish(Envelope("lobby", "lost")),
        lambda: a.broker.publish_numbered(numbered("lobby", 1)),
        lambda: a.broker.presence_add("lobby", DAVE, "a3"),
        lambda: a.broker.presence_remove("lobby", CAROL.id, "a2"),  # forgotten here all the same
        lambda: a.broker.members("lobby"),
        lambda: a.broker.members_page("lobby", 1),
        lambda: a.broker.member_count("lobby"),
        lambda: a.broker.room_update("lobby", 1),
        lambda: a.broker.publish_room_update("lobby", RoomUpdate(9), Envelope("lobby", "9")),
        lambda: a.broker.subscribe("asked-while-down"),  # refused and forgotten
    ]
    for call in down:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BrokerUnavailable):
            async with asyncio.timeout(timeout(3)):  # never a hang
                await call()
        assert loop.time() - started < timeout(2.5)
    async with asyncio.timeout(timeout(3)):
        await a.broker.unsubscribe("dropped-while-down")  # never raises
    assert not await answers(a.broker)

    await redis_server.start()  # empty: no persistence

    async def fan_out_back() -> bool:
        with contextlib.suppress(BrokerUnavailable):
            await b.broker.publish(Envelope("lobby", "back"))
        return "back" in a.inbox.payloads()

    took = await eventually(fan_out_back, 10, "fan-out after the restart")
    took += await eventually(
        lambda: _members_are(a.broker, "lobby", [ALICE, BOB]), 10 - took, "presence restored"
    )
    assert took < timeout(10)
    assert await _members_are(b.broker, "lobby", [ALICE, BOB])  # Carol stays gone
    assert a.observer.reconnected >= 1
    assert b.observer.reconnected >= 1
    assert await a.broker.publish_numbered(numbered("lobby", 2)) > before  # never goes back
    # What was unsubscribed or refused while down is not subscribed after it.
    for room in ("dropped-while-down", "asked-while-down"):
        await b.broker.publish(Envelope(room, "not for a"))
    await b.broker.publish(Envelope("lobby", "end"))
    await eventually(lambda: "end" in a.inbox.payloads(), 5, "the end marker")
    assert "not for a" not in a.inbox.payloads()
    assert a.left == b.left == []


async def test_a_frozen_redis_never_hangs_a_call(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    for gateway in (a, b):
        await gateway.broker.subscribe("lobby")
    process = redis_server.process
    assert process is not None
    loop = asyncio.get_running_loop()

    async def fails_at_once() -> bool:
        started = loop.time()
        with contextlib.suppress(BrokerUnavailable):
            await a.broker.publish(Envelope("lobby", "while frozen"))
        return loop.time() - started < 0.1

    process.send_signal(signal.SIGSTOP)  # connections open, nothing answered: a hung Redis
    try:
        for call in (
            lambda: a.broker.publish(Envelope("lobby", "while frozen")),
            lambda: a.broker.members("lobby"),
            lambda: a.broker.subscribe("new"),  # Redis never confirms it
        ):
            started = loop.time()
            with pytest.raises(BrokerUnavailable):
                async with asyncio.timeout(timeout(5)):
                    await call()
            assert loop.time() - started < timeout(3)  # the command timeout, not a hang
        assert not await answers(a.broker)
        # The listener finds its connection dead (no answer to its PING): calls fail at once.
        await eventually(fails_at_once, 10, "calls failing at once")
    finally:
        process.send_signal(signal.SIGCONT)

    async def fan_out_back() -> bool:
        with contextlib.suppress(BrokerUnavailable):
            await b.broker.publish(Envelope("lobby", "thawed"))
        return "thawed" in a.inbox.payloads()

    await eventually(fan_out_back, 10, "fan-out after the thaw")
    assert a.observer.reconnected >= 1


async def test_a_broker_started_while_redis_is_down_connects_when_it_comes(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    await redis_server.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    a = await gateways(redis_server.url)
    assert loop.time() - started < timeout(5)
    assert not await answers(a.broker)
    with pytest.raises(BrokerUnavailable):
        await a.broker.publish(Envelope("lobby", "x"))
    await redis_server.start()
    await eventually(lambda: answers(a.broker), 10, "connected")
    await a.broker.subscribe("lobby")
    await a.broker.publish(Envelope("lobby", "hello"))
    await a.inbox.wait_for(1)
    assert a.observer.reconnected == 0  # connected, not reconnected


async def test_healthy_follows_the_server(
    redis_server: RedisServer, gateways: StartGateway
) -> None:
    a = await gateways(redis_server.url)
    assert await answers(a.broker) is True
    await redis_server.stop()
    await eventually(lambda: _not(answers(a.broker)), 3, "unhealthy once Redis stops")
    await redis_server.start()
    await eventually(lambda: answers(a.broker), 10, "healthy again")
    assert a.observer.reconnected == 1


async def _not(result: Awaitable[bool]) -> bool:
    return not await result


# --- messages published straight into Redis ------------------------------------------------


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


async def test_messages_published_straight_into_redis_are_dropped_and_counted(
    redis_server: RedisServer, gateways: StartGateway, raw: redis.asyncio.Redis
) -> None:
    a, b = await gateways(redis_server.url), await gateways(redis_server.url)
    for gateway in (a, b):
        await gateway.broker.subscribe("lobby")
        await gateway.broker.subscribe("other")
    spy = raw.pubsub()
    await spy.subscribe(channel("lobby"))
    assert (await spy.get_message(timeout=timeout(2)) or {}).get("type") == "subscribe"
    await a.broker.publish(Envelope("lobby", "real"))
    number = await a.broker.publish_numbered(numbered("lobby", 1))
    captured: list[bytes] = []
    while len(captured) < 2:
        message = await spy.get_message(timeout=timeout(2))
        assert message is not None, "the real messages pass through Redis"
        captured.append(message["data"])
    await spy.aclose()  # type: ignore[no-untyped-call]  # redis-py: untyped
    plain, with_id = captured
    assert with_id.startswith(b"%d|" % number)

    now = time.time()
    sender = b"s" * INSTANCE_BYTES
    ours = Sealer(KEY, sender)
    forged_chat = '{"type":"chat","id":1,"room":"lobby","from":{"id":"admin"},"message":"hi"}'
    injected = [
        ("lobby", b"\x00\xff garbage", "malformed"),
        ("lobby", b"", "malformed"),
        ("lobby", b"12|", "malformed"),
        ("lobby", b"012|" + plain, "malformed"),
        ("lobby", b"G1" + bytes(40), "malformed"),
        ("lobby", forged_chat.encode(), "malformed"),
        ("lobby", Envelope("lobby", forged_chat).to_bytes(), "malformed"),  # no MAC at all
        (
            "lobby",
            Sealer(b"not the key" * 4, sender).seal(Envelope("lobby", forged_chat)),
            "signature",
        ),
        ("lobby", _flip_last_byte(plain), "signature"),  # tampered payload
        ("lobby", plain[:10] + bytes([plain[10] ^ 0x80]) + plain[11:], "signature"),  # the MAC
        ("lobby", plain, "replayed"),
        ("lobby", with_id, "replayed"),
        ("lobby", b"%d|" % (number + 100) + with_id.partition(b"|")[2], "replayed"),  # renumbered
        ("lobby", with_id.partition(b"|")[2], "replayed"),  # its id stripped
        ("other", plain, "room"),  # a real message of lobby on other's channel
        ("other", ours.seal(Envelope("lobby", "signed for lobby")), "room"),
        (
            "lobby",
            Sealer(KEY, sender, clock=lambda: now - 120).seal(Envelope("lobby", "old")),
            "stale",
        ),
        (
            "lobby",
            Sealer(KEY, sender, clock=lambda: now + 60).seal(Envelope("lobby", "ahead")),
            "stale",
        ),
        ("lobby", ours.seal(numbered("lobby", 7)), "number"),  # numbered, but no id
        ("lobby", b"%d|" % (number + 1) + ours.seal(Envelope("lobby", "x")), "number"),
        ("lobby", b"%d|" % number + ours.seal(numbered("lobby", 8)), "number"),  # not above
    ]
    for room, data, _reason in injected:
        await raw.publish(channel(room), data)
    await a.broker.publish(Envelope("lobby", "still working"))
    for gateway in (a, b):
        await gateway.inbox.wait_for(3)
        assert gateway.inbox.payloads() == ["real", f'{{"id":{number},"n":1}}', "still working"]
        assert gateway.observer.dropped == Counter(reason for _r, _d, reason in injected)
    # A well-signed message of our own still passes, with an id above the last.
    await raw.publish(channel("lobby"), b"%d|" % (number + 5) + ours.seal(numbered("lobby", 9)))
    await a.inbox.wait_for(4)
    assert a.inbox.payloads()[-1] == f'{{"id":{number + 5},"n":9}}'


async def test_the_last_id_of_a_room_is_forgotten_on_unsubscribe(
    redis_server: RedisServer, gateways: StartGateway, raw: redis.asyncio.Redis
) -> None:
    a = await gateways(redis_server.url)
    await a.broker.subscribe("r")
    number = await a.broker.publish_numbered(numbered("r", 0))
    await a.inbox.wait_for(1)
    ours = Sealer(KEY, b"s" * INSTANCE_BYTES)
    await raw.publish(channel("r"), b"%d|" % (number - 5) + ours.seal(numbered("r", 1)))
    await eventually(lambda: a.observer.dropped["number"] == 1, 5, "an id below the last")
    await a.broker.unsubscribe("r")
    await a.broker.subscribe("r")
    await raw.publish(channel("r"), b"%d|" % (number - 5) + ours.seal(numbered("r", 2)))
    await a.inbox.wait_for(2)
    assert ids_of(a.inbox, "r") == [number, number - 5]
    assert a.observer.dropped == Counter(number=1)


async def test_a_flood_of_garbage_is_counted_and_logged_rarely(
    redis_server: RedisServer,
    gateways: StartGateway,
    raw: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.audit")
    a = await gateways(redis_server.url)
    await a.broker.subscribe("lobby")
    flood = 2000
    async with raw.pipeline(transaction=False) as pipe:
        for i in range(flood):
            pipe.publish(channel("lobby"), b"garbage %d" % i)
        await pipe.execute()
    await a.broker.publish(Envelope("lobby", "after the flood"))
    await a.inbox.wait_for(1)
    assert a.inbox.payloads() == ["after the flood"]
    assert a.observer.dropped == Counter(malformed=flood)
    drops = [r for r in caplog.records if r.getMessage() == "broker_message_dropped"]
    assert len(drops) == 1


# --- credentials and TLS -------------------------------------------------------------------


async def test_a_redis_with_a_password_that_never_shows(
    tmp_path: Path, gateways: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every record, redis-py's included
    password = secrets.token_urlsafe(24)
    wrong_password = "wrong-" + secrets.token_urlsafe(12)
    server = RedisServer(tmp_path, password=password)
    await server.start()
    try:
        a, b = await gateways(server.url), await gateways(server.url)
        for gateway in (a, b):
            await gateway.broker.subscribe("lobby")
        await a.broker.presence_add("lobby", ALICE, "a1")
        await b.broker.publish(Envelope("lobby", "hi"))
        await a.inbox.wait_for(1)
        assert await b.broker.members("lobby") == [ALICE]

        stranger = await gateways(server.url.replace(password, wrong_password))
        assert not await answers(stranger.broker)
        with pytest.raises(BrokerUnavailable) as refused:
            await stranger.broker.publish(Envelope("lobby", "x"))
        await server.stop()
        await eventually(lambda: _not(answers(a.broker)), 3, "unhealthy once Redis stops")
        with pytest.raises(BrokerUnavailable) as down:
            await a.broker.members("lobby")
        await server.start()
        await eventually(lambda: answers(a.broker), 10, "healthy again")
    finally:
        await server.stop()
    redacted = redact_url(server.url)
    assert "***" in redacted
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(getattr(r, "url", None) == redacted for r in warnings)  # it did log, redacted
    for secret in (password, wrong_password):
        for error in (refused.value, down.value):
            assert secret not in str(error)
            assert secret not in repr(error)
        for record in caplog.records:
            assert secret not in record.getMessage()
            assert secret not in repr(vars(record))


async def test_rediss_verifies_the_servers_certificate(
    tmp_path: Path, gateways: StartGateway
) -> None:
    pair, ca_file = tls_files(tmp_path)
    stranger_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger_ca))
    server = RedisServer(tmp_path, tls=pair)
    await server.start()
    try:
        assert server.url.startswith("rediss://")
        a = await gateways(server.url, GATEWAY_REDIS_CA_FILE=str(ca_file))
        assert await answers(a.broker)
        await a.broker.subscribe("lobby")
        await a.broker.publish(Envelope("lobby", "over TLS"))
        await a.inbox.wait_for(1)
        # A server whose certificate the configured CA did not sign is never used.
        stranger = await gateways(server.url, GATEWAY_REDIS_CA_FILE=str(stranger_ca))
        assert not await answers(stranger.broker)
        with pytest.raises(BrokerUnavailable):
            await stranger.broker.publish(Envelope("lobby", "x"))
    finally:
        await server.stop()


# --- the replay memory (gateway.broker.wire, no Redis needed) -------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_remembered_nonces_expire_with_the_window() -> None:
    clock = FakeClock()
    sealer, opener = Sealer(KEY, b"s" * INSTANCE_BYTES, clock), Opener(KEY, clock)
    first = sealer.seal(Envelope("r", "first"))
    for n in range(100):
        opener.open("r", sealer.seal(Envelope("r", f"{n}")))
    opener.open("r", first)
    assert opener.remembered_nonces == 101
    clock.now += WINDOW_BACK_MS / 1000 + 1
    opener.open("r", sealer.seal(Envelope("r", "later")))
    assert opener.remembered_nonces == 1  # the others' messages would be stale by now
    with pytest.raises(Rejected) as stale:
        opener.open("r", first)
    assert stale.value.reason == "stale"


def test_remembered_nonces_are_capped_and_a_forgotten_one_never_passes() -> None:
    clock = FakeClock()
    sealer, opener = Sealer(KEY, b"s" * INSTANCE_BYTES, clock), Opener(KEY, clock, remembered=3)
    sealed = []
    for n in range(5):
        clock.now += 0.001
        sealed.append(sealer.seal(Envelope("r", f"{n}")))
        opener.open("r", sealed[-1])
    assert opener.remembered_nonces == 3
    with pytest.raises(Rejected) as forgotten:
        opener.open("r", sealed[0])  # its nonce is forgotten: it may not pass for all that
    assert forgotten.value.reason == "stale"
    with pytest.raises(Rejected) as remembered:
        opener.open("r", sealed[4])
    assert remembered.value.reason == "replayed"
    clock.now += 0.001
    envelope, number = opener.open("r", sealer.seal(Envelope("r", "new")))
    assert (envelope.payload, number) == ("new", None)


async def test_a_forged_history_entry_is_left_out_and_the_recovery_says_it_is_incomplete(
    redis_server: RedisServer, gateways: StartGateway, raw: redis.asyncio.Redis
) -> None:
    a = await gateways(redis_server.url)
    first = await a.broker.publish_numbered(numbered("lobby", 0))
    # Whoever can write to Redis but lacks the secret adds a chat of their own to the history.
    forged = Sealer(b"not the broker secret" * 2, b"f" * INSTANCE_BYTES).seal(numbered("lobby", 9))
    at = int(time.time() * 1000)
    await raw.xadd("gateway:room:{lobby}:history", {"id": first + 1, "at": at, "data": forged})
    await raw.set("gateway:room:{lobby}:seq", first + 1)
    recovery = await a.broker.history("lobby", first - 1, 10)
    assert isinstance(recovery, Recovery)
    assert [entry.id for entry in recovery.messages] == [first]
    assert recovery.recovered is False  # first + 1 was said, and is not given
    assert a.observer.dropped == Counter(signature=1)
