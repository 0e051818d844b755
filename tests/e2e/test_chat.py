"""Rooms, broadcast, presence, typing, token expiry and slow consumers, on a real socket."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from tests.e2e.conftest import Client, Gateway, StartGateway
from tests.helpers import timeout

pytestmark = pytest.mark.e2e


async def test_broadcast_across_three_clients(gateway: Gateway) -> None:
    alice, bob, carol = [await gateway.user(n, rooms=["dev"]) for n in ("alice", "bob", "carol")]
    for client in (alice, bob, carol):
        await client.join("dev")
    await alice.send({"type": "chat", "room": "dev", "message": "hello <b>all</b>", "ref": "a1"})
    mine = await alice.recv_type("chat")
    theirs = [await bob.recv_type("chat"), await carol.recv_type("chat")]
    assert mine["ref"] == "a1"
    for frame in theirs:
        assert "ref" not in frame
        assert {k: v for k, v in mine.items() if k != "ref"} == frame
    assert mine["from"] == {"id": "alice", "name": "Alice"}
    assert mine["message"] == "hello <b>all</b>"
    assert abs(mine["ts"] - time.time() * 1000) < 60_000
    for client in (alice, bob, carol):
        await client.close()


async def test_ids_are_ordered_within_a_room(gateway: Gateway) -> None:
    alice, bob = await gateway.user("alice"), await gateway.user("bob")
    await alice.join("lobby")
    await bob.join("lobby")
    for i in range(5):
        await (alice if i % 2 else bob).send({"type": "chat", "room": "lobby", "message": str(i)})
    ids = [(await alice.recv_type("chat"))["id"] for _ in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    await alice.close()
    await bob.close()


async def test_from_cannot_be_forged(gateway: Gateway) -> None:
    alice = await gateway.user("alice")
    await alice.join("lobby")
    await alice.send({"type": "chat", "room": "lobby", "message": "hi", "from": {"id": "bob"}})
    error = await alice.recv_type("error")
    assert (error["code"], error["pointer"]) == ("invalid_message", "/from")
    await alice.close()


async def test_room_rules(gateway: Gateway) -> None:
    alice = await gateway.user("alice", rooms=["dev"])
    await alice.send({"type": "join", "room": "admin", "ref": "j"})
    error = await alice.recv_type("error")
    assert (error["code"], error["ref"]) == ("forbidden_room", "j")
    await alice.send({"type": "chat", "room": "dev", "message": "hi"})
    assert (await alice.recv_type("error"))["code"] == "not_joined"
    joined = await alice.request({"type": "join", "room": "dev", "ref": "k"}, "joined")
    assert joined["ref"] == "k"
    left = await alice.request({"type": "leave", "room": "dev", "ref": "l"}, "left")
    assert (left["room"], left["ref"]) == ("dev", "l")
    await alice.send({"type": "leave", "room": "dev"})
    assert (await alice.recv_type("error"))["code"] == "not_joined"
    await alice.close()


async def test_presence_is_per_user_not_per_connection(gateway: Gateway) -> None:
    bob = await gateway.user("bob")
    await bob.join("lobby")
    tab1 = await gateway.user("alice")
    joined = await tab1.join("lobby")
    assert {m["id"] for m in joined["members"]} == {"alice", "bob"}
    presence = await bob.recv_type("presence")
    assert (presence["event"], presence["user"]["id"]) == ("join", "alice")

    tab2 = await gateway.user("alice")
    joined = await tab2.join("lobby")
    assert [m["id"] for m in joined["members"]] == ["alice", "bob"]  # alice listed once
    await tab1.close()
    await bob.send({"type": "ping", "ref": "fence"})
    # Between two pings, no presence for alice: her second tab is still in the room.
    frames = []
    while (frame := await bob.recv())["type"] != "pong":
        frames.append(frame)
    assert [f for f in frames if f["type"] == "presence"] == []
    await tab2.close()
    presence = await bob.recv_type("presence")
    assert (presence["event"], presence["user"]["id"]) == ("leave", "alice")
    await bob.close()


async def test_typing_goes_to_the_other_members_only(gateway: Gateway) -> None:
    alice, alice2, bob = (
        await gateway.user("alice"),
        await gateway.user("alice"),
        await gateway.user("bob"),
    )
    for client in (alice, alice2, bob):
        await client.join("lobby")
    await alice.send({"type": "typing", "room": "lobby", "typing": True})
    typing = await bob.recv_type("typing")
    assert (typing["user"]["id"], typing["typing"]) == ("alice", True)
    for client in (alice, alice2):
        await client.send({"type": "ping", "ref": "fence"})
        frames = []
        while (frame := await client.recv())["type"] != "pong":
            frames.append(frame["type"])
        assert "typing" not in frames
    for client in (alice, alice2, bob):
        await client.close()


async def test_token_expiry_closes_4001(gateway: Gateway) -> None:
    ws = await gateway.connect(gateway.token("alice", ttl=2))  # exp: whole seconds
    started = time.monotonic()
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout(6)):
            while True:
                await ws.recv()
    assert ws.close_code == 4001
    assert time.monotonic() - started >= 0.9


async def test_refresh_keeps_the_connection(gateway: Gateway) -> None:
    client = Client(await gateway.connect(gateway.token("alice", ttl=2)))
    await client.recv_type("welcome")
    refreshed = await client.request(
        {"type": "refresh", "token": gateway.token("alice", ttl=60), "ref": "r"}, "refreshed"
    )
    assert refreshed["ref"] == "r" and refreshed["expires_at"] > (time.time() + 30) * 1000
    await asyncio.sleep(2.5)  # past the first token's expiry
    assert (await client.request({"type": "ping"}, "pong"))["type"] == "pong"
    other = await client.request({"type": "refresh", "token": gateway.token("mallory")}, "error")
    assert (other["code"], other["pointer"]) == ("invalid_message", "/token")
    await client.close()


async def test_slow_consumer_is_closed_4008_and_never_slows_others(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway(
        GATEWAY_SEND_QUEUE_SIZE="16", GATEWAY_RATE_PER_SECOND="10000", GATEWAY_RATE_BURST="10000"
    ) as gw:
        # max_queue=1 with no reads: websockets stops reading the socket, TCP fills up.
        slow_ws = await gw.connect(gw.token("slow"), max_queue=1)
        await slow_ws.send(json.dumps({"type": "join", "room": "lobby"}))
        fast, sender = await gw.user("fast"), await gw.user("sender")
        await fast.join("lobby")
        await sender.join("lobby")
        body = "y" * 2000  # the longest chat message
        count, batch = 3000, 10  # 6 MB through the room: more than every buffer on the way holds
        received = {"fast": 0, "sender": 0}

        async def read_all(name: str, client: Client) -> None:
            while received[name] < count:
                if (await client.recv(10))["type"] == "chat":
                    received[name] += 1

        readers = [
            asyncio.create_task(read_all(n, c)) for n, c in (("fast", fast), ("sender", sender))
        ]
        async with asyncio.timeout(timeout(60)):
            for sent in range(batch, count + 1, batch):
                for i in range(batch):
                    await sender.send(
                        {"type": "chat", "room": "lobby", "message": body, "ref": f"{sent}-{i}"}
                    )
                # Readers that keep up are never more than one batch behind...
                while min(received.values()) < sent:
                    await asyncio.sleep(0.001)

            await asyncio.gather(*readers)
        # ...and were never closed, while the one that stopped reading is gone.
        assert received == {"fast": count, "sender": count}
        async with asyncio.timeout(timeout(10)):
            while "slow" in {s.user_id for s in gw.services.sessions.values()}:
                await asyncio.sleep(0.05)
        closed = gw.services.metrics.registry.get_sample_value(
            "gateway_disconnects_total", {"code": "4008"}
        )
        assert closed == 1
        # It did not read its close frame within the close timeout, so it was cut off: when
        # it reads at last, its connection has been reset (tests/e2e/test_hostile_clients.py).
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(timeout(10)):
                while True:
                    await slow_ws.recv()
        assert slow_ws.close_code == 1006
        await fast.close()
        await sender.close()
