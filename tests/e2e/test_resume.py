"""Nothing lost, through the real stack (docs/protocol.md, History and resume): clients whose
connections end mid-stream (aborted, closed 4008 as too slow, closed 1001 by a drain) come
back with ``since`` and end with every room's messages complete, in order, once; across two
instances and a real redis-server, with one instance killed with SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
import websockets

from gateway.errors import CloseCode
from tests.e2e.conftest import Client, Gateway, StartGateway
from tests.e2e.test_scale_out import User, cluster
from tests.helpers import timeout
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

ROOMS = ("lobby", "dev", "random")
WIDE_OPEN = {
    "GATEWAY_RATE_PER_SECOND": "10000",
    "GATEWAY_RATE_BURST": "10000",
    "GATEWAY_CONNECT_RATE": "100000/minute",
    "GATEWAY_OPEN_ROOMS": ",".join(ROOMS),
    "GATEWAY_HISTORY_SIZE": "2000",
}


class Resuming:
    """A client that remembers the last id it saw per room and resumes from it, checking
    as it goes that every room's ids arrive in increasing order (no duplicate, no reorder)."""

    def __init__(self, sub: str) -> None:
        self.sub = sub
        self.seen: dict[str, list[int]] = {room: [] for room in ROOMS}
        self.client: Client | None = None
        self.resumes = 0

    async def connect(self, gw: Gateway) -> None:
        self.client = await gw.user(self.sub)
        for room in ROOMS:
            last = self.seen[room][-1] if self.seen[room] else None
            frame: dict[str, Any] = {"type": "join", "room": room, "ref": f"j-{room}"}
            if last is not None:
                frame["since"] = last
            await self.client.send(frame)
        self.joins = set(ROOMS)

    def take(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "joined":
            if "recovered" in frame:
                assert frame["recovered"] is True, (self.sub, frame)
            self.joins.discard(frame["room"])
        elif frame["type"] == "chat":
            ids = self.seen[frame["room"]]
            assert not ids or frame["id"] > ids[-1], (self.sub, frame["room"], ids[-3:], frame)
            ids.append(frame["id"])

    async def read(self) -> None:
        """Read until the connection ends (any close), taking every frame."""
        assert self.client is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                self.take(await self.client.recv(wait_seconds=60))


async def test_clients_cut_off_at_random_resume_and_miss_nothing(
    start_gateway: StartGateway,
) -> None:
    rng = random.Random(12)
    async with start_gateway(**WIDE_OPEN) as gw:
        publishers = {room: await gw.user(f"pub-{room}") for room in ROOMS}
        for room, publisher in publishers.items():
            await publisher.join(room)
        listeners = [Resuming(f"listener{n}") for n in range(4)]
        for listener in listeners:
            await listener.connect(gw)
        readers = {listener: asyncio.create_task(listener.read()) for listener in listeners}
        per_room, cuts_wanted = 1000, 24
        sent: dict[str, list[int]] = {room: [] for room in ROOMS}
        cuts: list[str] = []

        async def publish(room: str) -> None:
            """At least ``per_room`` chats, and on until enough connections were cut off."""
            publisher = publishers[room]
            n = 0
            while n < per_room or len(cuts) < cuts_wanted:
                await publisher.send(
                    {"type": "chat", "room": room, "message": str(n), "ref": str(n)}
                )
                sent[room].append((await publisher.recv_type("chat"))["id"])
                n += 1
                if n % 10 == 0:
                    await asyncio.sleep(0.005)

        async def cut_off() -> None:
            """Every 80 ms or so, one listener's connection ends, in one of three ways."""
            while True:
                await asyncio.sleep(rng.uniform(0.04, 0.12))
                listener = rng.choice(listeners)
                assert listener.client is not None
                how = rng.choice(("abort", "too slow", "drain"))
                session = next(
                    (s for s in gw.services.sessions.values() if s.user_id == listener.sub), None
                )
                if how == "abort" or session is None:
                    listener.client.ws.transport.abort()
                elif how == "too slow":
                    session.request_close(CloseCode.TOO_SLOW, "test: as if it did not read")
                else:
                    session.request_close(CloseCode.GOING_AWAY, "test: as a drain does")
                # Shielded: cancelling the cutter while it waits here must not cancel the reader,
                # which the catch-up below awaits.
                await asyncio.shield(readers[listener])
                cuts.append(how)
                listener.resumes += 1
                await listener.connect(gw)
                readers[listener] = asyncio.create_task(listener.read())

        cutter = asyncio.create_task(cut_off())
        await asyncio.gather(*(publish(room) for room in ROOMS))
        cutter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cutter
        # Every listener catches up (resuming once more, to be sure it has everything).
        for listener in listeners:
            assert listener.client is not None
            await listener.client.close()
            await readers[listener]
            await listener.connect(gw)
            readers[listener] = asyncio.create_task(listener.read())
        async with asyncio.timeout(timeout(30)):
            while any(
                each.joins or any(each.seen[r][-1:] != sent[r][-1:] for r in ROOMS)
                for each in listeners
            ):
                await asyncio.sleep(0.05)
        assert len(cuts) >= cuts_wanted
        for listener in listeners:
            for room in ROOMS:
                # Complete, in order, once: exactly what was published, from the start.
                assert listener.seen[room] == sent[room], (listener.sub, room)
            assert listener.client is not None
            await listener.client.close()
            await readers[listener]
        for publisher in publishers.values():
            await publisher.close()


async def test_an_instance_killed_mid_stream_its_clients_resume_on_the_other(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, ca, client_ssl, redis_server, GATEWAY_HISTORY_SIZE="5000") as c:
        publisher = await c.user("publisher", 1)
        await publisher.join()
        sent: list[int] = []
        seen: dict[str, list[int]] = {}

        async def publish(count: int) -> None:
            for n in range(count):
                await publisher.send({"type": "chat", "room": "lobby", "message": str(n)})
                sent.append((await publisher.recv_type("chat"))["id"])

        async def read(user: User) -> None:
            """Until the connection ends: every chat, in increasing id order."""
            ids = seen.setdefault(user.sub, [])
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    frame = await user.recv(wait_seconds=60)
                    if frame["type"] == "chat":
                        assert not ids or frame["id"] > ids[-1], (user.sub, ids[-3:], frame)
                        ids.append(frame["id"])

        victims = [await c.user(f"victim{n}", 0) for n in range(3)]
        for victim in victims:
            await victim.join()
        readers = [asyncio.create_task(read(victim)) for victim in victims]
        publishing = asyncio.create_task(publish(150))
        while len(sent) < 50:
            await asyncio.sleep(0.01)
        c.instances[0].process.send_signal(signal.SIGKILL)  # mid-stream
        async with asyncio.timeout(timeout(30)):
            await asyncio.gather(*readers)
        await publishing  # the rest is said while the victims are away
        assert all(len(seen[victim.sub]) < len(sent) for victim in victims)  # they missed some
        for victim in list(victims):
            back = await c.user(victim.sub, 1)  # the same users, on the other instance
            await back.send(
                {"type": "join", "room": "lobby", "since": seen[victim.sub][-1], "ref": "j"}
            )
            joined = await back.recv_until(lambda f: f.get("ref") == "j")
            assert (joined["type"], joined["recovered"]) == ("joined", True), joined
            readers.append(asyncio.create_task(read(back)))
            victims.append(back)
        await publish(50)
        async with asyncio.timeout(timeout(30)):
            while any(ids[-1:] != sent[-1:] for ids in seen.values()):
                await asyncio.sleep(0.05)
        for ids in seen.values():
            assert ids == sent  # complete, in order, once, across the kill
        for user in (publisher, *victims[3:]):
            await user.close()


async def test_a_resend_on_another_instance_reaches_the_room_once(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, ca, client_ssl, redis_server) as c:
        listener = await c.user("listener", 1)
        await listener.join()
        alice = await c.user("alice", 0)
        await alice.join()
        chat = {"type": "chat", "room": "lobby", "message": "only once", "ref": "m-1"}
        await alice.send(chat)
        first = await alice.recv_type("chat")
        await alice.close()  # as if the acknowledgement had been lost with the connection
        back = await c.user("alice", 1)  # the page comes back on the other instance...
        await back.join()
        await back.send(chat)  # ...and sends its pending message again, same ref
        again = await back.recv_type("chat")
        assert (again["id"], again["ts"], again["ref"]) == (first["id"], first["ts"], "m-1")
        await back.send({"type": "chat", "room": "lobby", "message": "next", "ref": "m-2"})
        heard = [(await listener.recv_type("chat"))["message"] for _ in range(2)]
        assert heard == ["only once", "next"]  # the resend reached nobody
        await back.close()
        await listener.close()
