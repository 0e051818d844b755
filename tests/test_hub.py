"""Tests for gateway.hub: subscription refcounts, local delivery, and fan-out between sessions
(presence per user, typing, the sender's acknowledgement, chat id order)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
import pytest

from gateway.auth import mint_token
from gateway.broker import Envelope, Member, MemoryBroker, RoomUpdate
from gateway.errors import BrokerUnavailable
from gateway.hub import DEFAULT_PRESENCE_MAX_MEMBERS, Hub
from gateway.outbox import Outgoing, Put
from gateway.protocol import encode
from tests.test_session import ALICE, BOB, NOW_MS, World, drain, send


class CountingBroker(MemoryBroker):
    def __init__(self, fail_subscribe: int = 0) -> None:
        super().__init__()
        self.subscribes = 0
        self.unsubscribes = 0
        self.fail_subscribe = fail_subscribe

    async def subscribe(self, room: str) -> None:
        if self.fail_subscribe:
            self.fail_subscribe -= 1
            raise ConnectionError("broker down")
        self.subscribes += 1
        await super().subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        self.unsubscribes += 1
        await super().unsubscribe(room)


@dataclass
class Recipient:
    conn_id: str
    user_id: str
    received: list[str] = field(default_factory=list)

    def deliver(self, item: Outgoing) -> Put:
        self.received.append(item.text)
        return Put.QUEUED


async def test_the_broker_is_subscribed_once_while_any_holder_remains() -> None:
    broker = CountingBroker()
    hub = Hub(broker)
    for _ in range(3):
        await hub.acquire("r")
    assert (broker.subscribes, broker.subscribed_rooms) == (1, 1)
    await hub.release("r")
    await hub.release("r")
    assert broker.unsubscribes == 0
    await hub.release("r")
    assert (broker.unsubscribes, broker.subscribed_rooms) == (1, 0)
    await hub.release("r")  # one release too many: harmless, and the count stays at zero
    await hub.release("never-acquired")
    assert broker.unsubscribes == 1
    await hub.acquire("r")
    assert (broker.subscribes, broker.subscribed_rooms) == (2, 1)


async def test_a_failed_subscribe_holds_nothing() -> None:
    broker = CountingBroker(fail_subscribe=1)
    hub = Hub(broker)
    with pytest.raises(ConnectionError):
        await hub.acquire("r")
    await hub.acquire("r")  # the next holder is the first again: it subscribes
    assert (broker.subscribes, broker.subscribed_rooms) == (1, 1)
    await hub.release("r")
    assert (broker.unsubscribes, broker.subscribed_rooms) == (1, 0)


async def test_attach_detach_and_delivery_to_nobody() -> None:
    hub = Hub(MemoryBroker())
    a = Recipient("c1", "alice")
    hub.deliver(Envelope("empty", "x"))  # no members: nothing, no error
    hub.detach("nowhere", a)  # unknown room and member: harmless
    hub.attach("r", a)
    hub.attach("r", a)  # twice: still one member
    hub.detach("r", Recipient("c9", "alice"))  # unknown member of a known room
    assert (hub.rooms, hub.members("r")) == (1, 1)
    hub.deliver(Envelope("r", "one"))
    hub.deliver(Envelope("other", "not for r"))
    assert a.received == ["one"]
    hub.detach("r", a)
    hub.detach("r", a)
    assert (hub.rooms, hub.members("r")) == (0, 0)
    hub.deliver(Envelope("r", "two"))
    assert a.received == ["one"]


async def test_skip_user_and_the_echo_go_to_the_right_connections() -> None:
    hub = Hub(MemoryBroker())
    a1, a2, b = Recipient("c1", "alice"), Recipient("c2", "alice"), Recipient("c3", "bob")
    for member in (a1, a2, b):
        hub.attach("r", member)
    hub.deliver(Envelope("r", "typing", skip_user="alice"))
    hub.deliver(Envelope("r", "plain", echo_conn="c1", echo_payload="acked"))
    assert (a1.received, a2.received, b.received) == (["acked"], ["plain"], ["typing", "plain"])


async def test_a_member_detached_during_delivery_does_not_break_it() -> None:
    hub = Hub(MemoryBroker())
    b = Recipient("c2", "bob")

    class Detacher(Recipient):
        def deliver(self, item: Outgoing) -> Put:
            put = super().deliver(item)
            hub.detach("r", self)  # e.g. its outbox overflowed and it is leaving
            hub.detach("r", b)
            return put

    a = Detacher("c1", "alice")
    hub.attach("r", a)
    hub.attach("r", b)
    hub.deliver(Envelope("r", "x"))
    assert (a.received, hub.rooms) == (["x"], 0)


# -- fan-out between sessions --------------------------------------------------------------


@pytest.fixture
async def world() -> World:
    return await World(broker=CountingBroker()).start()


def presence(event: str, user: dict[str, str], room: str = "lobby") -> dict[str, object]:
    return {"type": "presence", "event": event, "room": room, "user": user}


async def test_presence_is_per_user_first_join_and_last_leave(world: World) -> None:
    a1, a2, b = await world.sessions("alice", "alice", "bob")
    await send(b, type="join", room="lobby")
    members = {"type": "joined", "room": "lobby", "members": [ALICE, BOB]}
    assert await send(a1, type="join", room="lobby") == [members]
    assert await drain(b) == [presence("join", ALICE)]
    unchanged = {"type": "joined", "room": "lobby", "unchanged": True, "ref": "again"}
    assert await send(a1, type="join", room="lobby", ref="again") == [unchanged]
    assert await send(a2, type="join", room="lobby") == [members]
    assert await drain(b) == []  # alice's second join, second tab: nothing new
    assert await send(a1, type="leave", room="lobby") == [{"type": "left", "room": "lobby"}]
    assert [f["code"] for f in await send(a1, type="leave", room="lobby")] == ["not_joined"]
    assert (await drain(b), await drain(a2)) == ([], [])  # alice is still there through a2
    await send(a1, type="join", room="lobby")
    for s in (a1, a2):
        await s.close()
    assert await drain(b) == [presence("leave", ALICE)]  # once, after her last connection
    await b.close()
    assert isinstance(world.broker, CountingBroker)
    assert (world.broker.subscribes, world.broker.unsubscribes, world.hub.rooms) == (1, 1, 0)
    assert world.broker.presence_rooms == 0


async def test_join_leave_churn_alternates_presence_and_leaks_nothing(world: World) -> None:
    a, b = await world.session("alice"), await world.session("bob")
    await send(b, type="join", room="lobby")
    for _ in range(30):
        world.monotonic_seconds += 1  # within the rate limit
        await send(a, type="join", room="lobby")
        await send(a, type="leave", room="lobby")
    assert await drain(b) == [presence("join", ALICE), presence("leave", ALICE)] * 30
    assert (world.hub.rooms, world.hub.members("lobby")) == (1, 1)
    assert await world.broker.members("lobby") == [Member("bob", "Bob")]


async def test_typing_skips_every_connection_of_the_sender(world: World) -> None:
    a1, a2, b = await world.sessions("alice", "alice", "bob")
    for s in (a1, a2, b):
        await send(s, type="join", room="lobby")
    for s in (a1, a2):
        await drain(s)
    assert await send(a1, type="typing", room="lobby", typing=True, ref="t") == []
    assert await drain(a2) == []
    typing = {"type": "typing", "room": "lobby", "user": ALICE, "typing": True}
    assert await drain(b) == [typing]  # never the ref: it is the sender's
    await send(b, type="typing", room="lobby", typing=False)
    assert await drain(a1) == await drain(a2) == [{**typing, "user": BOB, "typing": False}]


async def test_only_the_senders_connection_gets_its_ref(world: World) -> None:
    a1, a2, b = await world.sessions("alice", "alice", "bob")
    for s in (a1, a2, b):
        await send(s, type="join", room="lobby")
    for s in (a1, a2, b):
        await drain(s)
    chat = {"type": "chat", "id": 1, "room": "lobby", "from": ALICE, "message": "hi", "ts": NOW_MS}
    assert await send(a1, type="chat", room="lobby", message="hi", ref="c1") == [
        {**chat, "ref": "c1"}
    ]
    assert await drain(a2) == await drain(b) == [chat]
    assert await send(a1, type="chat", room="lobby", message="hi") == [{**chat, "id": 2}]


async def test_chat_ids_are_ordered_within_each_room(world: World) -> None:
    a, b = await world.session("alice", rooms=["dev"]), await world.session("bob", rooms=["dev"])
    for s in (a, b):
        await send(s, type="join", room="lobby")
        await send(s, type="join", room="dev")
    await drain(a)
    for i, s in enumerate((a, b, a, b)):
        await s.handle_frame(f'{{"type":"chat","room":"lobby","message":"{i}"}}')
    await b.handle_frame('{"type":"chat","room":"dev","message":"other room"}')
    received = [(f["room"], f["id"], f["message"]) for f in await drain(a)]
    assert received == [
        ("lobby", 1, "0"),
        ("lobby", 2, "1"),
        ("lobby", 3, "2"),
        ("lobby", 4, "3"),
        ("dev", 1, "other room"),
    ]


class ChattyBroker(MemoryBroker):
    """Another instance's chat lands while a join is between presence_add and members."""

    async def members(self, room: str) -> list[Member]:
        frame = {"type": "chat", "id": 7, "room": room, "from": BOB, "message": "x", "ts": 0}
        await self.publish(Envelope(room, encode(frame)))
        return await super().members(room)


async def test_joined_precedes_the_rooms_traffic() -> None:
    world = await World(broker=ChattyBroker()).start()
    a, b = await world.session("alice"), await world.session("bob")
    await send(b, type="join", room="lobby")
    assert [f["type"] for f in await send(a, type="join", room="lobby")] == ["joined"]
    assert [f["type"] for f in await drain(b)] == ["chat", "presence"]
    await send(b, type="chat", room="lobby", message="after")
    assert [f["message"] for f in await drain(a)] == ["after"]


# -- a slow or failing broker ------------------------------------------------------------------


class SlowBroker(CountingBroker):
    """Subscribes only when the test says so (``gate``), or fails then (``fail``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.fail = False

    async def subscribe(self, room: str) -> None:
        await self.gate.wait()
        if self.fail:
            raise BrokerUnavailable("redis is down")
        await super().subscribe(room)


async def test_a_second_holder_waits_for_the_first_holders_subscription() -> None:
    broker = SlowBroker()
    hub = Hub(broker)
    first = asyncio.create_task(hub.acquire("r"))
    second = asyncio.create_task(hub.acquire("r"))
    await asyncio.sleep(0.01)
    # Neither may be attached yet: the subscription is not there, broadcasts would be lost.
    assert not first.done() and not second.done()
    broker.gate.set()
    await asyncio.gather(first, second)
    assert (broker.subscribes, broker.subscribed_rooms) == (1, 1)
    await hub.release("r")
    await hub.release("r")
    assert (broker.unsubscribes, broker.subscribed_rooms) == (1, 0)


async def test_when_the_first_subscribe_fails_the_waiting_holder_subscribes_itself() -> None:
    broker = SlowBroker()
    hub = Hub(broker)
    first = asyncio.create_task(hub.acquire("r"))
    second = asyncio.create_task(hub.acquire("r"))
    await asyncio.sleep(0.01)
    broker.fail = True
    broker.gate.set()
    with pytest.raises(BrokerUnavailable):
        await first
    with pytest.raises(BrokerUnavailable):  # it tried again for itself, and failed too
        await second
    broker.fail = False
    await hub.acquire("r")  # nothing half-registered: a plain first holder again
    assert (broker.subscribes, broker.subscribed_rooms) == (1, 1)
    await hub.release("r")
    assert broker.subscribed_rooms == 0


async def test_a_cancelled_subscribe_holds_nothing() -> None:
    broker = SlowBroker()
    hub = Hub(broker)
    task = asyncio.create_task(hub.acquire("r"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    broker.gate.set()
    await hub.release("r")  # nothing was held: no unsubscribe
    assert broker.unsubscribes == 0
    await hub.acquire("r")
    assert broker.subscribes == 1


class StuckRemovalBroker(MemoryBroker):
    """presence_remove waits until released: a client may vanish meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.removing = asyncio.Event()
        self.proceed = asyncio.Event()

    async def presence_remove(self, room: str, user_id: str, conn_id: str) -> bool:
        self.removing.set()
        await self.proceed.wait()
        return await super().presence_remove(room, user_id, conn_id)


async def test_a_leave_cancelled_mid_way_still_removes_the_presence_entry() -> None:
    broker = StuckRemovalBroker()
    world = await World(broker=broker).start()
    a, b = await world.session("alice"), await world.session("bob")
    await send(b, type="join", room="lobby")
    await send(a, type="join", room="lobby")
    await drain(b)
    leaving = asyncio.create_task(send(a, type="leave", room="lobby"))
    await broker.removing.wait()
    leaving.cancel()  # the client went away while its leave was on its way to the broker
    with pytest.raises(asyncio.CancelledError):
        await leaving
    broker.proceed.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert await broker.members("lobby") == [Member("bob", "Bob")]  # no zombie alice
    assert [f["event"] for f in await drain(b)] == ["leave"]
    assert world.hub.members("lobby") == 1


async def test_a_refresh_that_renames_updates_the_member_lists(world: World) -> None:
    a, b = await world.sessions("alice", "bob")
    await send(a, type="join", room="lobby")
    await send(b, type="join", room="lobby")
    await drain(a)
    token = mint_token(world.settings, sub="alice", name="Alice B.", now=world.wall_seconds)
    assert [f["type"] for f in await send(a, type="refresh", token=token)] == ["refreshed"]
    renamed = {"id": "alice", "name": "Alice B."}
    assert await drain(b) == [presence("join", renamed)]  # the others update their list
    assert Member("alice", "Alice B.") in await world.broker.members("lobby")
    carol = await world.session("carol")
    joined = (await send(carol, type="join", room="lobby"))[0]
    assert renamed in joined["members"]
    # A refresh with the same name announces nothing.
    same = mint_token(world.settings, sub="alice", name="Alice B.", now=world.wall_seconds)
    await send(a, type="refresh", token=same)
    assert [f for f in await drain(b) if f["type"] == "presence"] == [presence("join", CAROL)]


CAROL = {"id": "carol", "name": "Carol"}


# -- large rooms: coalesced room updates ----------------------------------------------------


class UpdateCountingBroker(MemoryBroker):
    """Counts room_update calls; fails them while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []
        self.down = False

    async def room_update(self, room: str, limit: int) -> RoomUpdate | None:
        self.asked.append(room)
        if self.down:
            raise BrokerUnavailable("redis is down")
        return await super().room_update(room, limit)


async def test_room_updates_are_asked_for_once_per_interval_however_many_changes() -> None:
    broker = UpdateCountingBroker()
    hub = Hub(broker, presence_max_members=1, room_update_seconds=0.05)
    inbox = Recipient("c1", "alice")
    await hub.start()
    await broker.subscribe("r")
    hub.attach("r", inbox)
    for user in ("alice", "bob", "carol"):
        await broker.presence_add("r", Member(user, user.title()), f"{user}-1")
        for _ in range(100):
            hub.room_updates.changed("r")
    hub.room_updates.changed("other")
    assert broker.asked == []  # not at once: coalesced
    await asyncio.sleep(0.2)
    assert broker.asked == ["other", "r"]  # one flush for every change
    assert inbox.received == ['{"type":"room","room":"r","member_count":3}']
    await hub.close()


async def test_a_flush_that_finds_the_broker_down_asks_again_later() -> None:
    broker = UpdateCountingBroker()
    hub = Hub(broker, presence_max_members=1, room_update_seconds=0.05)
    await hub.start()
    for user in ("alice", "bob"):
        await broker.presence_add("r", Member(user, user.title()), f"{user}-1")
    broker.down = True
    hub.room_updates.changed("r")
    await asyncio.sleep(0.08)
    assert broker.asked == ["r"]
    broker.down = False
    await asyncio.sleep(0.1)
    assert broker.asked == ["r", "r"]
    assert await broker.room_update("r", 1) is None  # the second flush told the room
    await hub.close()


async def test_a_closed_hub_publishes_no_more_updates() -> None:
    broker = UpdateCountingBroker()
    hub = Hub(broker, presence_max_members=1, room_update_seconds=0.05)
    await hub.start()
    hub.room_updates.changed("r")
    await hub.close()
    hub.room_updates.changed("r")
    await asyncio.sleep(0.1)
    assert broker.asked == []
    await hub.close()  # twice: nothing more


async def test_a_flush_after_the_broker_closed_is_dropped_quietly() -> None:
    broker = UpdateCountingBroker()
    hub = Hub(broker, presence_max_members=1)
    await hub.start()
    for user in ("alice", "bob"):
        await broker.presence_add("r", Member(user, user.title()), f"{user}-1")
    await broker.subscribe("r")
    await broker.close()  # the gateway is stopping, and the hub was not closed first
    hub.room_updates.changed("r")
    await hub.room_updates.flush()  # publish() raises RuntimeError: nothing escapes
    assert broker.asked == ["r"]


def test_a_room_is_large_above_at_least_one_member() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Hub(MemoryBroker(), presence_max_members=0)
    assert Hub(MemoryBroker(), presence_max_members=1).room_updates.is_large(2)
    assert not Hub(MemoryBroker()).room_updates.is_large(DEFAULT_PRESENCE_MAX_MEMBERS)


async def test_users_of_a_dead_instance_leave_a_large_room_in_one_update() -> None:
    """What a shared broker's prune reports (member_left), as a session's leave would be."""
    broker = MemoryBroker()
    hub = Hub(broker, presence_max_members=2, room_update_seconds=3600)
    bob = Recipient("b1", "bob")
    await hub.start()
    await broker.subscribe("r")
    hub.attach("r", bob)
    users = [Member(f"u{i}", f"User {i}") for i in range(4)]
    for member in users:
        await broker.presence_add("r", member, f"{member.id}-1")
    hub.room_updates.changed("r")
    await hub.room_updates.flush()
    for member in users[:2]:  # gone with their instance: 3 users stay, then 2
        await broker.presence_remove("r", member.id, f"{member.id}-1")
        await hub._member_left("r", member)
    await hub.room_updates.flush()
    u1, u2, u3 = ({"id": m.id, "name": m.name} for m in users[1:])
    assert [orjson.loads(text) for text in bob.received] == [
        {"type": "room", "room": "r", "member_count": 4},
        # u0 left a large room (3 stay): no presence. u1 left a small one (2 stay): presence.
        {"type": "presence", "event": "leave", "room": "r", "user": u1},
        {"type": "room", "room": "r", "member_count": 2, "members": [u2, u3]},
    ]
