"""Large rooms on a real server: a crowd entering one room costs O(n) frames, not O(n^2).

Above ``GATEWAY_PRESENCE_MAX_MEMBERS`` users a room is large: ``joined`` carries a sample and
the count, nobody is told of each user entering, and a ``room`` frame tells everyone the count
at most once a second (docs/protocol.md, Large rooms). Every frame is counted, and checked
against its schema; what is asserted is a count of frames, never a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from typing import Any

import pytest
import websockets

from tests.e2e.conftest import Client, Gateway, StartGateway
from tests.helpers import timeout
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e


class Member:
    """One client in the crowd: every frame it got after its welcome, and what it knows of the
    room's size."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.frames: list[dict[str, Any]] = []
        self.count = 0
        self.changed = asyncio.Event()

    async def read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                frame = await self.client.recv(wait_seconds=3600)  # schema-checked
                self.frames.append(frame)
                kind = frame["type"]
                if kind == "joined":
                    self.count = frame.get("member_count", len(frame["members"]))
                elif kind == "presence":
                    self.count += 1 if frame["event"] == "join" else -1
                elif kind == "room":
                    self.count = frame["member_count"]
                self.changed.set()

    async def knows(self, count: int) -> None:
        while self.count != count:
            self.changed.clear()
            await self.changed.wait()

    def kinds(self) -> Counter[str]:
        return Counter(frame["type"] for frame in self.frames)


async def crowd(gw: Gateway, subs: list[str], readers: list[asyncio.Task[None]]) -> list[Member]:
    """Connect a client per user (50 handshakes at a time), each read by a task of its own."""
    members: list[Member] = []
    for start in range(0, len(subs), 50):
        clients = await asyncio.gather(*(gw.user(sub) for sub in subs[start : start + 50]))
        members += [Member(client) for client in clients]
    readers += [asyncio.create_task(member.read()) for member in members]
    return members


async def enter_all(members: list[Member], total: int) -> None:
    """Everyone sends its join at once; returns once every client knows the room's size."""
    await asyncio.gather(*(m.client.send({"type": "join", "room": "lobby"}) for m in members))
    async with asyncio.timeout(timeout(30)):
        await asyncio.gather(*(member.knows(total) for member in members))


async def leave_all(members: list[Member], readers: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*(member.client.close() for member in members))
    await asyncio.gather(*readers)


async def test_a_crowd_entering_one_room_costs_o_n_frames_not_n_squared(
    start_gateway: StartGateway,
) -> None:
    n, limit = 300, 50
    readers: list[asyncio.Task[None]] = []
    async with start_gateway(GATEWAY_PRESENCE_MAX_MEMBERS=str(limit)) as gw:
        assert gw.services.hub.room_updates.limit == limit  # the setting reached the hub
        members = await crowd(gw, [f"user{i:03}" for i in range(n)], readers)
        await enter_all(members, n)
        kinds = sum((member.kinds() for member in members), Counter[str]())
        await leave_all(members, readers)
    assert kinds["joined"] == n
    for member in members:
        [joined] = [frame for frame in member.frames if frame["type"] == "joined"]
        assert len(joined["members"]) <= limit
        assert joined.get("member_count", len(joined["members"])) <= n
    # The first `limit` users entered a small room: each was announced to those already in it,
    # as before (the in-memory broker counts and announces each join in one step: exactly so).
    assert kinds["presence"] == limit * (limit - 1) // 2
    # Everything else, whatever the order the joins came in: O(n). Before large rooms, this
    # crowd cost n * (n - 1) / 2 = 44,850 presence frames.
    others = sum(kinds.values()) - kinds["presence"]
    assert kinds["room"] >= n  # everyone was told the final count once at least
    assert others < 5 * n, kinds


async def test_two_instances_tell_each_count_once_between_them(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    shared = {
        "GATEWAY_BROKER_URL": redis_server.url_for(0),
        "GATEWAY_RATELIMIT_STORAGE_URL": redis_server.url_for(1),
        "GATEWAY_PRESENCE_MAX_MEMBERS": "3",
    }
    readers: list[asyncio.Task[None]] = []
    async with start_gateway(**shared) as one, start_gateway(**shared) as two:
        members = await crowd(one, [f"one{i}" for i in range(10)], readers)
        members += await crowd(two, [f"two{i}" for i in range(10)], readers)
        await enter_all(members, 20)
        await members[0].client.send({"type": "leave", "room": "lobby"})
        async with asyncio.timeout(timeout(10)):
            await asyncio.gather(*(member.knows(19) for member in members[1:]))
        await leave_all(members, readers)
    for member in members[1:]:
        counts = [frame["member_count"] for frame in member.frames if frame["type"] == "room"]
        # Both instances asked for updates as their own users entered; Redis let one of them
        # tell each count, in order: never the same count twice in a row, never one going back.
        # (A member may have learnt 20 from its own `joined`, and the leave may come within the
        # same second as the last entry: then no `room` frame said 20.)
        assert all(a < b for a, b in itertools.pairwise(counts[:-1])), counts
        assert counts[-1] == 19, counts
        assert len(counts) == 1 or counts[-2] == 20, counts
