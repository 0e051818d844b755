"""Tests for gateway.broker. The behaviour tests take a started broker built from a URL, so the
same bodies run against every backend: add its URL to ``broker_url``'s params (``redis`` stands
for a real redis-server of the test's own). What only Redis does, across instances, is in
tests/test_broker_redis.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.broker import (
    Broker,
    Envelope,
    Member,
    MemberPage,
    MemoryBroker,
    Once,
    RoomUpdate,
    create_broker,
)
from gateway.history import Recovery, SinceError
from tests.helpers import make_settings, timeout
from tests.redis_server import RedisServer

ALICE = Member("u-alice", "Alice")
BOB = Member("u-bob", "Bob")
CAROL = Member("u-carol", "Carol")


class Inbox:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self._arrived = asyncio.Event()

    def __call__(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        self._arrived.set()

    def payloads(self, room: str | None = None) -> list[str]:
        return [e.payload for e in self.envelopes if room is None or e.room == room]

    async def wait_for(self, count: int) -> None:
        """Until ``count`` envelopes arrived (at once for memory://; bounded for networks)."""
        async with asyncio.timeout(timeout(5)):
            while len(self.envelopes) < count:
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture(params=["memory://", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """A memory:// URL, or the URL of a redis-server of this test's own."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    url: str = request.param
    return url


@pytest.fixture
async def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
async def broker(broker_url: str, inbox: Inbox) -> AsyncIterator[Broker]:
    b = create_broker(make_settings({"GATEWAY_BROKER_URL": broker_url}))
    await b.start(inbox)
    try:
        yield b
    finally:
        await b.close()


# --- numbered publishing: one order per room ------------------------------------------


def numbered(room: str, n: int) -> Envelope:
    """A chat-like envelope whose id the broker writes after ``"id":``."""
    return Envelope(room, f'{{"id":,"n":{n}}}', id_at=6)


def ids_of(inbox: Inbox, room: str) -> list[int]:
    return [orjson.loads(p)["id"] for p in inbox.payloads(room)]


# --- history: a room's last chats, in the order of their ids ------------------------


@pytest.fixture
async def small_history(broker_url: str) -> AsyncIterator[Broker]:
    """A broker whose rooms keep their last 3 chats."""
    settings = make_settings({"GATEWAY_BROKER_URL": broker_url, "GATEWAY_HISTORY_SIZE": "3"})
    b = create_broker(settings)
    await b.start(Inbox())
    try:
        yield b
    finally:
        await b.close()


def history_ids(recovery: Recovery | SinceError) -> list[int]:
    assert isinstance(recovery, Recovery), recovery
    ids = [entry.id for entry in recovery.messages]
    # Each kept message is the broadcast's own text, with its id written in.
    assert ids == [orjson.loads(entry.payload)["id"] for entry in recovery.messages]
    return ids


async def test_history_replays_what_followed_an_id_and_knows_when_it_is_short(
    small_history: Broker,
) -> None:
    empty = await small_history.history("r", None, 10)
    assert empty == Recovery((), True, None, 0)
    first = await small_history.publish_numbered(numbered("r", 0))
    for n in range(1, 5):  # ids first .. first + 4; the last 3 are kept
        await small_history.publish_numbered(numbered("r", n))
    last = first + 4
    after = await small_history.history("r", last - 2, 10)
    assert history_ids(after) == [last - 1, last]
    assert isinstance(after, Recovery) and after.recovered and after.last_id == last
    assert (await small_history.history("r", last, 10)).recovered is True  # type: ignore[union-attr]
    short = await small_history.history("r", first, 10)  # first + 1 is gone
    assert history_ids(short) == [last - 2, last - 1, last]
    assert isinstance(short, Recovery) and not short.recovered and short.oldest_id == last - 2
    paged = await small_history.history("r", last - 3, 2)  # three missed, two asked for
    assert history_ids(paged) == [last - 1, last]
    assert isinstance(paged, Recovery) and not paged.recovered
    assert history_ids(await small_history.history("r", None, 2)) == [last - 1, last]
    assert await small_history.history("r", last + 1, 10) is SinceError.FUTURE
    assert history_ids(await small_history.history("other", 0, 10)) == []


async def test_ids_increase_by_one_per_room(broker: Broker, inbox: Inbox) -> None:
    for room in ("a", "b"):
        await broker.subscribe(room)
    first_a = await broker.publish_numbered(numbered("a", 0))
    assert [await broker.publish_numbered(numbered("a", n)) for n in (1, 2)] == [
        first_a + 1,
        first_a + 2,
    ]
    first_b = await broker.publish_numbered(numbered("b", 0))
    assert await broker.publish_numbered(numbered("a", 3)) == first_a + 3
    await inbox.wait_for(5)
    assert ids_of(inbox, "a") == [first_a, first_a + 1, first_a + 2, first_a + 3]
    assert ids_of(inbox, "b") == [first_b]


async def test_numbered_envelopes_arrive_in_id_order_under_concurrency(
    broker: Broker, inbox: Inbox
) -> None:
    await broker.subscribe("race")
    ids = await asyncio.gather(*(broker.publish_numbered(numbered("race", n)) for n in range(200)))
    assert sorted(ids) == list(range(min(ids), min(ids) + 200))
    await inbox.wait_for(200)
    assert ids_of(inbox, "race") == sorted(ids)  # delivered in the order of the ids


async def test_ids_do_not_restart_when_the_room_empties(broker: Broker) -> None:
    await broker.presence_add("r", ALICE, "c1")
    first = await broker.publish_numbered(numbered("r", 0))
    await broker.presence_remove("r", ALICE.id, "c1")
    assert await broker.publish_numbered(numbered("r", 1)) == first + 1


async def test_the_echo_gets_the_same_id(broker: Broker, inbox: Inbox) -> None:
    await broker.subscribe("r")
    sent = Envelope(
        "r", '{"id":}', echo_conn="c1", echo_payload='{"id":,"ref":"x"}', id_at=6, echo_id_at=6
    )
    number = await broker.publish_numbered(sent)
    await inbox.wait_for(1)
    [got] = inbox.envelopes
    assert (got.payload, got.echo_payload) == (f'{{"id":{number}}}', f'{{"id":{number},"ref":"x"}}')
    assert (got.echo_conn, got.id_at, got.echo_id_at) == ("c1", None, None)


# --- presence ----------------------------------------------------------------------------


async def test_first_and_last_connection_of_a_user(broker: Broker) -> None:
    assert await broker.presence_add("r", ALICE, "c1") is True
    assert await broker.presence_add("r", ALICE, "c2") is False  # second tab: no new join
    assert await broker.members("r") == [ALICE]
    assert await broker.presence_remove("r", ALICE.id, "c1") is False  # c2 is still there
    assert await broker.members("r") == [ALICE]
    assert await broker.presence_remove("r", ALICE.id, "c2") is True
    assert await broker.members("r") == []


async def test_presence_is_per_room(broker: Broker) -> None:
    assert await broker.presence_add("r1", ALICE, "c1") is True
    assert await broker.presence_add("r2", ALICE, "c1") is True  # same connection, other room
    assert await broker.presence_add("r2", ALICE, "c2") is False
    assert await broker.presence_remove("r1", ALICE.id, "c1") is True
    assert await broker.members("r2") == [ALICE]
    assert await broker.presence_remove("r2", ALICE.id, "c1") is False
    assert await broker.presence_remove("r2", ALICE.id, "c2") is True


async def test_adding_the_same_connection_twice_is_one_connection(broker: Broker) -> None:
    assert await broker.presence_add("r", ALICE, "c1") is True
    assert await broker.presence_add("r", ALICE, "c1") is False
    assert await broker.presence_remove("r", ALICE.id, "c1") is True
    assert await broker.members("r") == []


async def test_unknown_removals_are_false_and_harmless(broker: Broker) -> None:
    assert await broker.presence_remove("nowhere", ALICE.id, "c1") is False
    await broker.presence_add("r", ALICE, "c1")
    assert await broker.presence_remove("r", BOB.id, "c1") is False  # another user's conn id
    assert await broker.presence_remove("r", ALICE.id, "c9") is False  # unknown conn
    assert await broker.members("r") == [ALICE]
    assert await broker.presence_remove("r", ALICE.id, "c1") is True
    assert await broker.presence_remove("r", ALICE.id, "c1") is False  # twice


async def test_one_user_cannot_remove_another(broker: Broker) -> None:
    assert await broker.presence_add("r", ALICE, "shared-id") is True
    assert await broker.presence_add("r", BOB, "shared-id") is True  # another user's entry
    assert await broker.presence_remove("r", BOB.id, "shared-id") is True
    assert await broker.members("r") == [ALICE]
    assert await broker.presence_remove("r", ALICE.id, "shared-id") is True


async def test_members_sorted_by_id_one_per_user(broker: Broker) -> None:
    await broker.presence_add("r", CAROL, "c3")
    await broker.presence_add("r", ALICE, "c1")
    await broker.presence_add("r", BOB, "c2")
    await broker.presence_add("r", ALICE, "c4")
    assert await broker.members("r") == [ALICE, BOB, CAROL]
    assert await broker.members("empty") == []


async def test_members_with_unicode_and_lookalike_ids(broker: Broker) -> None:
    a = Member("ü", "Ünï 😀")
    b = Member("u", "plain")
    await broker.presence_add("r", a, "c1")
    await broker.presence_add("r", b, "c2")
    assert await broker.members("r") == [b, a]


# --- large rooms: a bounded page, a count, updates decided once --------------------------


def users(n: int) -> list[Member]:
    return [Member(f"u{i:03}", f"User {i}") for i in range(n)]


async def test_a_page_of_a_room_within_the_limit_is_the_whole_list(broker: Broker) -> None:
    await broker.presence_add("r", CAROL, "c3")
    await broker.presence_add("r", ALICE, "c1")
    await broker.presence_add("r", BOB, "c2")
    await broker.presence_add("r", ALICE, "c4")
    whole = MemberPage((ALICE, BOB, CAROL), 3)
    assert await broker.members_page("r", 3) == await broker.members_page("r", 100) == whole
    assert not whole.truncated
    assert await broker.members_page("empty", 1) == MemberPage((), 0)


async def test_a_page_of_a_larger_room_is_bounded_sorted_and_counts_everyone(
    broker: Broker,
) -> None:
    everyone = users(60)
    for member in everyone:
        await broker.presence_add("r", member, "c1")
        await broker.presence_add("r", member, "c2")  # users, not connections
    page = await broker.members_page("r", 7)
    assert (len(page.members), page.total, page.truncated) == (7, 60, True)
    assert list(page.members) == sorted(page.members, key=lambda m: m.id)
    assert set(page.members) <= set(everyone)
    assert len(set(page.members)) == 7
    assert await broker.member_count("r") == 60
    assert await broker.member_count("empty") == 0
    with pytest.raises(ValueError, match="at least one"):
        await broker.members_page("r", 0)


async def tell(broker: Broker, room: str, limit: int) -> RoomUpdate | None:
    """What the hub does for a room it marked: the update due, published (None if none)."""
    update = await broker.room_update(room, limit)
    if update is None:
        return None
    assert await broker.publish_room_update(room, update, Envelope(room, "update")) is True
    return update


async def test_a_large_room_is_told_each_new_count_once_then_its_list_when_small(
    broker: Broker, inbox: Inbox
) -> None:
    await broker.subscribe("r")
    for member in users(2):
        await broker.presence_add("r", member, "c")
    assert await tell(broker, "r", 2) is None  # never large: nothing to tell
    for member in users(4)[2:]:
        await broker.presence_add("r", member, "c")
    assert await tell(broker, "r", 2) == RoomUpdate(4)
    assert await tell(broker, "r", 2) is None  # told already
    await broker.presence_remove("r", "u003", "c")
    await broker.presence_add("r", Member("u003", "Again"), "c")
    assert await tell(broker, "r", 2) is None  # one left, one came: the same count
    await broker.presence_remove("r", "u003", "c")
    assert await tell(broker, "r", 2) == RoomUpdate(3)
    await broker.presence_remove("r", "u002", "c")
    small = await tell(broker, "r", 2)
    assert small == RoomUpdate(2, tuple(users(2)))  # small again: the whole list, once
    assert await tell(broker, "r", 2) is None
    await broker.presence_remove("r", "u001", "c")
    assert await tell(broker, "r", 2) is None
    await inbox.wait_for(3)
    assert inbox.payloads("r") == ["update"] * 3  # published with each update told


async def test_an_update_overtaken_by_a_change_or_told_already_is_not_published(
    broker: Broker, inbox: Inbox
) -> None:
    await broker.subscribe("r")
    for member in users(3):
        await broker.presence_add("r", member, "c")
    stale = await broker.room_update("r", 1)
    assert stale == RoomUpdate(3)
    await broker.presence_add("r", CAROL, "c")
    fresh = await broker.room_update("r", 1)
    assert fresh == RoomUpdate(4)
    assert await broker.publish_room_update("r", stale, Envelope("r", "3")) is False
    assert await broker.publish_room_update("r", fresh, Envelope("r", "4")) is True
    assert await broker.publish_room_update("r", fresh, Envelope("r", "4 again")) is False
    await broker.presence_remove("r", CAROL.id, "c")
    for member in users(3)[1:]:
        await broker.presence_remove("r", member.id, "c")
    small = await broker.room_update("r", 1)
    assert small == RoomUpdate(1, tuple(users(1)))
    assert await broker.publish_room_update("r", small, Envelope("r", "1")) is True
    assert await broker.publish_room_update("r", small, Envelope("r", "1 again")) is False
    await broker.subscribe("marker")
    await broker.publish(Envelope("marker", "end"))
    await inbox.wait_for(3)
    assert inbox.payloads() == ["4", "1", "end"]


async def test_what_was_told_goes_with_the_rooms_last_user(broker: Broker) -> None:
    for member in users(3):
        await broker.presence_add("r", member, "c")
    assert await tell(broker, "r", 1) == RoomUpdate(3)
    for member in users(3):
        await broker.presence_remove("r", member.id, "c")
    await broker.presence_add("r", ALICE, "c")
    assert await tell(broker, "r", 1) is None  # a new room, never told it was large


# --- fan-out -----------------------------------------------------------------------------


async def test_publish_delivers_in_order_to_subscribed_rooms(broker: Broker, inbox: Inbox) -> None:
    await broker.subscribe("r")
    for i in range(50):
        await broker.publish(Envelope("r", f'{{"n":{i}}}'))
    await inbox.wait_for(50)
    assert inbox.payloads("r") == [f'{{"n":{i}}}' for i in range(50)]


async def test_unsubscribed_rooms_are_not_delivered(broker: Broker, inbox: Inbox) -> None:
    await broker.subscribe("yes")
    await broker.publish(Envelope("no", "dropped"))
    await broker.publish(Envelope("yes", "kept"))
    await inbox.wait_for(1)
    await broker.unsubscribe("yes")
    await broker.publish(Envelope("yes", "after unsubscribe"))
    await broker.subscribe("marker")
    await broker.publish(Envelope("marker", "end"))  # once this arrives, nothing else will
    await inbox.wait_for(2)
    assert inbox.payloads() == ["kept", "end"]


async def test_envelope_fields_arrive_intact(broker: Broker, inbox: Inbox) -> None:
    await broker.subscribe("r")
    sent = Envelope("r", '{"m":"é😀"}', skip_user="u1", echo_conn="c1", echo_payload='{"ref":1}')
    await broker.publish(sent)
    await inbox.wait_for(1)
    assert inbox.envelopes == [sent]


async def test_unsubscribe_of_unknown_room_is_harmless(broker: Broker) -> None:
    await broker.unsubscribe("never")
    assert await broker.healthy() is True


# --- MemoryBroker specifics --------------------------------------------------------------


async def test_memory_state_returns_to_empty_after_everyone_leaves() -> None:
    broker = MemoryBroker()
    await broker.start(Inbox())
    for room in ("r1", "r2", "r3"):
        await broker.subscribe(room)
        for user in (ALICE, BOB):
            for conn in ("c1", "c2"):
                await broker.presence_add(room, user, f"{user.id}-{conn}")
    assert broker.presence_rooms == 3
    for room in ("r1", "r2", "r3"):
        for user in (ALICE, BOB):
            for conn in ("c1", "c2"):
                await broker.presence_remove(room, user.id, f"{user.id}-{conn}")
        await broker.unsubscribe(room)
    assert broker.presence_rooms == 0
    assert broker.subscribed_rooms == 0
    assert broker._presence == {}
    await broker.close()


async def test_memory_page_of_a_large_room_is_the_first_users_in() -> None:
    broker = MemoryBroker()
    await broker.start(Inbox())
    everyone = users(10)
    for member in reversed(everyone):
        await broker.presence_add("r", member, "c")
    page = await broker.members_page("r", 3)
    assert page == MemberPage((everyone[7], everyone[8], everyone[9]), 10)  # sorted by id
    await broker.presence_remove("r", everyone[8].id, "c")  # gone: the next one in takes its place
    assert await broker.members_page("r", 3) == MemberPage(
        (everyone[6], everyone[7], everyone[9]), 9
    )
    await tell(broker, "r", 3)
    for member in everyone:
        await broker.presence_remove("r", member.id, "c")
    assert (broker._presence, broker._told) == ({}, {})


async def test_memory_failed_removals_create_no_state() -> None:
    broker = MemoryBroker()
    await broker.start(Inbox())
    for i in range(100):
        await broker.presence_remove(f"room{i}", "u", "c")
        await broker.members(f"room{i}")
    assert broker.presence_rooms == 0
    await broker.close()


async def test_memory_publish_before_start_or_after_close_raises() -> None:
    broker = MemoryBroker()
    with pytest.raises(RuntimeError):
        await broker.publish(Envelope("r", "x"))
    await broker.start(Inbox())
    assert await broker.healthy() is True
    await broker.close()
    await broker.close()  # twice is fine
    assert await broker.healthy() is False
    with pytest.raises(RuntimeError):
        await broker.publish(Envelope("r", "x"))


async def test_memory_start_twice_raises() -> None:
    broker = MemoryBroker()
    await broker.start(Inbox())
    with pytest.raises(RuntimeError):
        await broker.start(Inbox())
    await broker.close()


async def test_memory_failing_deliver_does_not_hit_the_publisher(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def deliver(envelope: Envelope) -> None:
        seen.append(envelope.payload)
        if envelope.payload == "boom":
            raise RuntimeError("bug in a recipient")

    broker = MemoryBroker()
    await broker.start(deliver)
    await broker.subscribe("r")
    with caplog.at_level(logging.ERROR, logger="gateway.broker.memory"):
        await broker.publish(Envelope("r", "boom"))
    await broker.publish(Envelope("r", "next"))
    assert seen == ["boom", "next"]
    assert "delivering to room r failed" in caplog.text
    await broker.close()


async def test_the_member_list_shows_a_users_latest_name(broker: Broker) -> None:
    await broker.presence_add("r", Member("u", "First"), "c1")
    await broker.presence_add("r", Member("u", "Second"), "c2")
    assert await broker.members("r") == [Member("u", "Second")]
    await broker.presence_add("r", Member("u", "Renamed"), "c1")  # a refresh on c1
    assert await broker.members("r") == [Member("u", "Renamed")]


# --- create_broker -----------------------------------------------------------------------


def test_create_broker_memory() -> None:
    assert isinstance(create_broker(make_settings()), MemoryBroker)


@pytest.mark.parametrize(
    "url", ["", "memory", "kafka://k", "http://x", "REDIS+evil://", "amqp://u:secret@h"]
)
def test_create_broker_refuses_other_urls(url: str) -> None:
    settings = dataclasses.replace(make_settings(), broker_url=url)  # past the settings check
    with pytest.raises(ValueError) as info:
        create_broker(settings)
    assert "secret" not in str(info.value)


# --- Envelope ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope("r", "{}"),
        Envelope("r", '{"id":}', id_at=6),
        Envelope(
            "r", '{"id":}', echo_conn="c", echo_payload='{"id":,"r":1}', id_at=6, echo_id_at=6
        ),
        Envelope("room:1", '{"message":"héllo 😀 \\u0000 ☃"}', skip_user="ü"),
        Envelope("r", "x", echo_conn="c1", echo_payload="y"),
        Envelope("r", "x", skip_user="u", echo_conn="c", echo_payload='"\u2028"'),
        Envelope("r", ""),
        Envelope("r", '\x00\n"\\'),
    ],
)
def test_envelope_round_trip(envelope: Envelope) -> None:
    data = envelope.to_bytes()
    assert isinstance(data, bytes)
    assert Envelope.from_bytes(data) == envelope


def test_envelope_bytes_are_utf8_json() -> None:
    data = Envelope("r", "😀").to_bytes()
    assert orjson.loads(data) == {"room": "r", "payload": "😀"}
    assert "😀".encode() in data


def test_envelope_echo_fields_go_together() -> None:
    with pytest.raises(ValueError):
        Envelope("r", "x", echo_conn="c1")
    with pytest.raises(ValueError):
        Envelope("r", "x", echo_payload="y")


def test_envelope_lone_surrogate_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Envelope("r", "\ud800").to_bytes()


@pytest.mark.parametrize(
    "fields",
    [
        {"id_at": -1},
        {"id_at": 3},  # past the end of "{}"
        {"echo_id_at": 0},  # without id_at
        {"id_at": 0, "echo_conn": "c", "echo_payload": "{}"},  # an echo without its position
        {"id_at": 0, "echo_conn": "c", "echo_payload": "{}", "echo_id_at": 5},
    ],
)
def test_envelope_id_positions_are_checked(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Envelope("r", "{}", **fields)


def test_an_envelope_without_an_id_position_cannot_be_numbered() -> None:
    with pytest.raises(ValueError):
        Envelope("r", "{}").numbered(1)


def test_envelope_ignores_unknown_fields() -> None:
    data = b'{"room":"r","payload":"p","future":1}'
    assert Envelope.from_bytes(data) == Envelope("r", "p")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'"r"',
        b"{}",
        b'{"room":"r"}',
        b'{"payload":"p"}',
        b'{"room":1,"payload":"p"}',
        b'{"room":"r","payload":null}',
        b'{"room":"r","payload":"p","skip_user":5}',
        b'{"room":"r","payload":"p","echo_conn":"c"}',
        b'{"room":"r","payload":"p","echo_payload":["x"]}',
        b'{"room":"r","payload":"p","id_at":"1"}',
        b'{"room":"r","payload":"p","id_at":true}',
        b'{"room":"r","payload":"p","id_at":9}',
        b"\xff\xfe",
        b'{"room":"r","payload":"\xed\xa0\x80"}',
    ],
)
def test_envelope_from_bad_bytes_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        Envelope.from_bytes(data)


# --- idempotent publishing: the same key, published once ---------------------------------


async def test_a_key_seen_within_its_window_is_not_published_again(
    broker: Broker, inbox: Inbox
) -> None:
    await broker.subscribe("r")
    once = Once("alice:ref-1", 30.0, stamp=111)
    first, duplicate = await broker.publish_numbered_once(numbered("r", 1), once)
    assert duplicate is None
    again = await broker.publish_numbered_once(numbered("r", 1), Once(once.key, 30.0, stamp=222))
    assert again == (first, 111)  # the first one's id and stamp; nothing published
    other, _ = await broker.publish_numbered_once(numbered("r", 2), Once("alice:ref-2", 30.0, 3))
    assert other == first + 1
    await broker.subscribe("s")
    elsewhere = await broker.publish_numbered_once(numbered("s", 3), once)  # another room
    assert elsewhere[1] is None
    await inbox.wait_for(3)
    assert [orjson.loads(p)["n"] for p in inbox.payloads()] == [1, 2, 3]


async def test_a_key_is_forgotten_after_its_window(broker: Broker, inbox: Inbox) -> None:
    await broker.subscribe("r")
    once = Once("bob:x", 0.2, stamp=1)
    first, _ = await broker.publish_numbered_once(numbered("r", 1), once)
    await asyncio.sleep(0.4)
    second, duplicate = await broker.publish_numbered_once(numbered("r", 2), once)
    assert (second, duplicate) == (first + 1, None)
    await inbox.wait_for(2)
