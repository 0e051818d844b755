"""Several real ``python -m gateway serve`` processes on TLS and one real redis-server behave as
one gateway: fan-out and one order per room both ways, presence per user across instances, the
per-user cap across instances, Redis restarted mid-stream, an instance killed with SIGKILL, and
messages forged straight into Redis.

Each instance is a production process (tests/e2e/test_process.py) with the same JWT secret,
the same broker key, the same Redis for the broker and the limits, a port of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import trustme
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from gateway.auth import mint_token
from gateway.settings import load_settings
from tests.e2e.test_process import Process, gateway_process
from tests.helpers import timeout
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e


@dataclass
class Cluster:
    """The instances, and what a test needs to talk to them."""

    instances: list[Process]
    redis: RedisServer
    client_ssl: ssl.SSLContext
    jwt_secret: str

    def token(self, sub: str, name: str | None = None, rooms: tuple[str, ...] = ()) -> str:
        env = self.instances[0].env
        settings = load_settings({k: v for k, v in env.items() if k.startswith("GATEWAY_")})
        return mint_token(settings, sub=sub, name=name or sub.title(), rooms=rooms)

    async def user(self, sub: str, instance: int, **kwargs: Any) -> User:
        """Connect ``sub`` to instance number ``instance`` and read the welcome."""
        ws = await websockets.connect(
            self.instances[instance].url,
            ssl=self.client_ssl,
            open_timeout=timeout(10),
            additional_headers={"Authorization": f"Bearer {self.token(sub)}"},
            **kwargs,
        )
        user = User(sub, ws)
        assert (await user.recv())["type"] == "welcome"
        return user

    async def pair_in_lobby(self) -> tuple[User, User]:
        """alice on instance 0 and bob on instance 1, both in the lobby."""
        alice, bob = await self.user("alice", 0), await self.user("bob", 1)
        await alice.join()
        await bob.join()
        return alice, bob


class User:
    def __init__(self, sub: str, ws: ClientConnection) -> None:
        self.sub = sub
        self.ws = ws

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, wait_seconds: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout(wait_seconds)):
            raw = await self.ws.recv()
        assert isinstance(raw, str)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def recv_until(
        self, match: Callable[[dict[str, Any]], bool], wait_seconds: float = 10
    ) -> dict[str, Any]:
        """The next frame ``match`` accepts, skipping the others."""
        async with asyncio.timeout(timeout(wait_seconds)):
            while True:
                frame = await self.recv(wait_seconds)
                if match(frame):
                    return frame

    async def recv_type(self, kind: str, wait_seconds: float = 10) -> dict[str, Any]:
        return await self.recv_until(lambda f: f["type"] == kind, wait_seconds)

    async def join(self, room: str = "lobby") -> dict[str, Any]:
        await self.send({"type": "join", "room": room, "ref": f"join-{room}"})
        return await self.recv_until(lambda f: f.get("ref") == f"join-{room}")

    async def close(self) -> None:
        await self.ws.close()


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    ca: trustme.CA,
    client_ssl: ssl.SSLContext,
    redis_server: RedisServer,
    count: int = 2,
    **env: str,
) -> AsyncIterator[Cluster]:
    """``count`` production gateway processes sharing ``redis_server``."""
    shared = {
        "GATEWAY_JWT_SECRET": secrets.token_urlsafe(48),
        "GATEWAY_BROKER_SECRET": secrets.token_urlsafe(48),
        "GATEWAY_BROKER_URL": redis_server.url_for(0),
        "GATEWAY_RATELIMIT_STORAGE_URL": redis_server.url_for(1),
        "GATEWAY_CONNECT_RATE": "1000/minute",
        "GATEWAY_RATE_PER_SECOND": "1000",
        "GATEWAY_RATE_BURST": "1000",
        "GATEWAY_USER_MESSAGE_RATE": "1000/second",
        "GATEWAY_SHUTDOWN_SPREAD_SECONDS": "0",
        **env,
    }
    async with contextlib.AsyncExitStack() as stack:
        instances = []
        for number in range(count):
            folder = tmp_path / f"instance-{number}"
            folder.mkdir()
            instances.append(
                await stack.enter_async_context(gateway_process(folder, ca, client_ssl, **shared))
            )
        yield Cluster(instances, redis_server, client_ssl, shared["GATEWAY_JWT_SECRET"])


async def frames_for(user: User, seconds: float) -> list[dict[str, Any]]:
    """Every frame ``user`` receives within ``seconds`` (to show that something does not
    come)."""
    found: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                found.append(await user.recv())
    return found


async def chats(user: User, count: int) -> list[dict[str, Any]]:
    """The next ``count`` chat frames ``user`` receives."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        found.append(await user.recv_type("chat"))
    return found


async def test_fan_out_and_one_order_both_ways_under_concurrent_publishers(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, ca, client_ssl, redis_server) as c:
        # Two publishers and two listeners, one of each on each instance.
        alice, carol = await c.user("alice", 0), await c.user("carol", 0)
        bob, dave = await c.user("bob", 1), await c.user("dave", 1)
        for user in (alice, bob, carol, dave):
            await user.join()
        per_publisher = 100

        async def publish(user: User) -> None:
            for n in range(per_publisher):
                await user.send({"type": "chat", "room": "lobby", "message": f"{user.sub} {n}"})

        listeners = [asyncio.create_task(chats(u, 2 * per_publisher)) for u in (carol, dave)]
        publishers = [asyncio.create_task(chats(u, 2 * per_publisher)) for u in (alice, bob)]
        await asyncio.gather(publish(alice), publish(bob))
        seen = await asyncio.gather(*listeners, *publishers)
        sequences = [[(f["id"], f["message"]) for f in frames] for frames in seen]
        # Every client, on either instance, saw the same 200 messages in the same order...
        assert all(sequence == sequences[0] for sequence in sequences)
        # ...ordered by their ids, which increase by one...
        ids = [number for number, _ in sequences[0]]
        assert ids == list(range(ids[0], ids[0] + 2 * per_publisher))
        # ...and each publisher's own messages in the order it sent them.
        for name in ("alice", "bob"):
            mine = [text for _, text in sequences[0] if text.startswith(name)]
            assert mine == [f"{name} {n}" for n in range(per_publisher)]
        # Typing crosses instances too, to the others only.
        await alice.send({"type": "typing", "room": "lobby", "typing": True})
        typing = await bob.recv_type("typing")
        assert (typing["user"]["id"], typing["typing"]) == ("alice", True)


async def test_presence_is_per_user_across_instances(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, ca, client_ssl, redis_server) as c:
        bob = await c.user("bob", 1)
        await bob.join()
        alice_here = await c.user("alice", 0)
        joined = await alice_here.join()
        assert [m["id"] for m in joined["members"]] == ["alice", "bob"]  # bob is on instance 1
        presence = await bob.recv_type("presence")
        assert (presence["event"], presence["user"]["id"]) == ("join", "alice")
        # Her second tab, on the other instance: she is already there.
        alice_there = await c.user("alice", 1)
        assert [m["id"] for m in (await alice_there.join())["members"]] == ["alice", "bob"]
        await alice_here.close()  # one tab left: no leave
        assert [f for f in await frames_for(bob, 1.0) if f["type"] == "presence"] == []
        await alice_there.close()  # her last: one leave
        presence = await bob.recv_type("presence")
        assert (presence["event"], presence["user"]["id"]) == ("leave", "alice")


async def test_the_per_user_cap_holds_across_instances(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    async with cluster(
        tmp_path, ca, client_ssl, redis_server, GATEWAY_MAX_CONNECTIONS_PER_USER="2"
    ) as c:
        first, second = await c.user("alice", 0), await c.user("alice", 1)
        for instance in (0, 1):
            with pytest.raises(InvalidStatus) as refused:
                await c.user("alice", instance)
            assert refused.value.response.status_code == 429
        await first.close()
        await first.ws.wait_closed()
        async with asyncio.timeout(timeout(10)):  # the slot comes back
            while True:
                try:
                    third = await c.user("alice", 1)
                    break
                except InvalidStatus:
                    await asyncio.sleep(0.2)
        await second.close()
        await third.close()


async def test_redis_restarted_mid_stream(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, ca, client_ssl, redis_server) as c:
        alice, bob = await c.pair_in_lobby()
        await redis_server.stop()
        # The connections stay; a chat that cannot reach the room gets a retryable error.
        await alice.send({"type": "chat", "room": "lobby", "message": "lost?", "ref": "r1"})
        error = await alice.recv_until(lambda f: f.get("ref") == "r1")
        assert (error["type"], error["code"]) == ("error", "unavailable")
        assert error["retry_after_ms"] > 0
        assert await readyz(c.instances[0]) == 503
        # Redis comes back empty (no persistence): within 10 s both instances are ready again
        # (resubscribed), and fan-out and presence have returned.
        await redis_server.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout(10)
        while [await readyz(instance) for instance in c.instances] != [200, 200]:
            assert loop.time() < deadline, "not ready again within 10 s"
            await asyncio.sleep(0.2)
        await alice.send({"type": "chat", "room": "lobby", "message": "back", "ref": "r2"})
        assert (await alice.recv_until(lambda f: f.get("ref") == "r2"))["type"] == "chat"
        assert (await bob.recv_type("chat"))["message"] == "back"
        # Every presence entry is restored too, by the same deadline: a newcomer sees everyone.
        for attempt in range(1000):
            newcomer = await c.user(f"carol{attempt}", 1)
            members = [m["id"] for m in (await newcomer.join())["members"]]
            await newcomer.close()
            if members[:2] == ["alice", "bob"]:
                break
            assert loop.time() < deadline, f"presence not restored within 10 s: {members}"
            await asyncio.sleep(0.25)


async def test_an_instance_killed_with_sigkill_loses_its_users_within_the_ttl(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    ttl = 4
    async with cluster(
        tmp_path, ca, client_ssl, redis_server, GATEWAY_PRESENCE_TTL_SECONDS=str(ttl)
    ) as c:
        bob = await c.user("bob", 1)
        await bob.join()
        doomed = [await c.user(name, 0) for name in ("alice", "carol")]
        for user in doomed:
            await user.join()
        for _ in doomed:
            assert (await bob.recv_type("presence"))["event"] == "join"
        c.instances[0].process.send_signal(signal.SIGKILL)
        loop = asyncio.get_running_loop()
        started = loop.time()
        left: set[str] = set()
        while len(left) < 2:
            presence = await bob.recv_type("presence", wait_seconds=30)
            assert presence["event"] == "leave"
            left.add(presence["user"]["id"])
        assert left == {"alice", "carol"}
        assert loop.time() - started < timeout(ttl + ttl / 4 + 2)
        # No zombie members, and each left once: nothing more in another heartbeat or two.
        dave = await c.user("dave", 1)
        assert [m["id"] for m in (await dave.join())["members"]] == ["bob", "dave"]
        later = await frames_for(bob, ttl / 2)
        assert [f["user"]["id"] for f in later if f["type"] == "presence"] == ["dave"]


async def test_messages_forged_straight_into_redis_reach_nobody(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, ca, client_ssl, redis_server) as c:
        alice, bob = await c.pair_in_lobby()
        await alice.send({"type": "chat", "room": "lobby", "message": "real"})
        assert (await bob.recv_type("chat"))["message"] == "real"
        forged_chat = json.dumps(
            {
                "type": "chat",
                "id": 10**15,
                "room": "lobby",
                "from": {"id": "admin", "name": "Admin"},
                "message": "send me your password",
                "ts": 0,
            }
        )
        client = redis.asyncio.from_url(redis_server.url_for(0))
        try:
            channels = list(await client.pubsub_channels())
            assert channels, "the instances listen on the room's channel"
            for channel in channels:
                for raw in (
                    forged_chat.encode(),
                    b"1|" + forged_chat.encode(),
                    json.dumps({"room": "lobby", "payload": forged_chat}).encode(),
                    b"\x00\xff garbage",
                ):
                    await client.publish(channel, raw)
        finally:
            await client.aclose()
        await alice.send({"type": "chat", "room": "lobby", "message": "after"})
        assert (await bob.recv_type("chat"))["message"] == "after"  # nothing forged before it


async def test_a_redis_with_a_password(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    password = secrets.token_urlsafe(24)
    server = RedisServer(tmp_path, password=password)
    await server.start()
    try:
        async with cluster(tmp_path, ca, client_ssl, server) as c:
            alice, bob = await c.pair_in_lobby()
            await alice.send({"type": "chat", "room": "lobby", "message": "hi"})
            assert (await bob.recv_type("chat"))["message"] == "hi"
            await alice.close()
            await bob.close()
        for instance in c.instances:
            stdout, stderr = instance.output()
            assert password not in stdout + stderr
    finally:
        await server.stop()


async def readyz(instance: Process) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", instance.port, ssl=context, server_hostname="localhost"
    )
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(timeout(10)):
        status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def test_several_workers_in_one_process_tree_are_one_gateway(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, ca, client_ssl, redis_server, count=1, GATEWAY_WORKERS="2") as c:
        # The kernel hands each connection to whichever worker accepts it first: connect until
        # both serve someone, which shows as two subscribers of the lobby's channel in Redis.
        # /readyz answers once one worker serves; the other may still be starting (seconds, on
        # a busy machine), so this is bounded in time, not in a number of tries.
        client = redis.asyncio.from_url(redis_server.url_for(0))
        users: list[User] = []
        try:
            async with asyncio.timeout(timeout(30)):
                while True:
                    assert len(users) < 200, "every connection went to one worker"
                    users.append(user := await c.user(f"user{len(users)}", 0))
                    await user.join()
                    channels = [ch for ch in await client.pubsub_channels() if b"lobby" in ch]
                    if dict(await client.pubsub_numsub(*channels)).get(channels[0]) == 2:
                        break
                    await asyncio.sleep(0.05)
            await users[0].send({"type": "chat", "room": "lobby", "message": "to everyone"})
            for user in users:
                assert (await user.recv_type("chat"))["message"] == "to everyone"
            # SIGTERM drains every worker: each client is told 1001, and the supervisor exits 0.
            c.instances[0].process.send_signal(signal.SIGTERM)
            for user in users:
                with pytest.raises(websockets.ConnectionClosed):
                    await user.recv(wait_seconds=10)
                assert user.ws.close_code == 1001
        finally:
            await client.aclose()
            # Failing, leave no open socket for the garbage collector to warn about in a later
            # test; passing, these are already closed.
            await asyncio.gather(*(user.ws.close() for user in users), return_exceptions=True)
        async with asyncio.timeout(timeout(20)):
            assert await c.instances[0].process.wait() == 0
