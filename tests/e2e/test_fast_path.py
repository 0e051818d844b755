"""The fast path of a broadcast on a real TLS server: each frame is built once and written
straight to every recipient's transport (gateway.hypercorn_fixes.TransportControl), in the
publisher's turn of the event loop, with every rule of the queued path kept: order, no data
after a close frame, slow consumers closed 4008 (tests/e2e/test_hostile_clients.py)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from gateway.errors import CloseCode
from gateway.hypercorn_fixes import TransportControl
from tests.e2e.conftest import Gateway, StartGateway
from tests.e2e.rawclient import CLOSE, PING, PONG, TEXT, RawClient, frame
from tests.helpers import timeout

pytestmark = pytest.mark.e2e


def latency_count(gw: Gateway) -> float:
    value = gw.services.metrics.registry.get_sample_value("gateway_broadcast_latency_seconds_count")
    return value or 0.0


async def test_every_connection_on_the_real_server_takes_the_fast_path(gateway: Gateway) -> None:
    # If Hypercorn's internals move (an upgrade), this fails first: the outbox has no sink.
    clients = [await gateway.user(f"user{n}") for n in range(20)]
    for client in clients:
        await client.join("lobby")
    sessions = list(gateway.services.sessions.values())
    assert len(sessions) == 20
    assert all(isinstance(s.outbox.sink, TransportControl) for s in sessions)
    before = latency_count(gateway)
    await clients[0].send({"type": "chat", "room": "lobby", "message": "to all", "ref": "r"})
    for client in clients:
        assert (await client.recv_type("chat"))["message"] == "to all"
    # Written to all 20 at once, in the publisher's turn: one latency observation for them
    # all (a queued delivery is observed by its connection's writer, one by one).
    assert latency_count(gateway) == before + 1
    assert all(s.outbox.depth == 0 for s in sessions)
    for client in clients:
        await client.close()


async def test_messages_keep_their_order_through_the_fast_path(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway(GATEWAY_RATE_PER_SECOND="10000", GATEWAY_RATE_BURST="10000") as gw:
        alice, bob = await gw.user("alice"), await gw.user("bob")
        await alice.join("lobby")
        await bob.join("lobby")
        for n in range(200):
            await alice.send({"type": "chat", "room": "lobby", "message": str(n)})
        got = [int((await bob.recv_type("chat"))["message"]) for _ in range(200)]
        assert got == list(range(200))
        await alice.close()
        await bob.close()


@pytest.mark.parametrize("closer", ["server", "client"])
async def test_no_data_frame_follows_the_close_frame(
    start_gateway: StartGateway, closer: str
) -> None:
    async with start_gateway(GATEWAY_RATE_PER_SECOND="10000", GATEWAY_RATE_BURST="10000") as gw:
        listener = await RawClient.open(gw, "listener")
        listener.send(frame(TEXT, b'{"type":"join","room":"lobby"}'))
        sender = await gw.user("sender")
        await sender.join("lobby")
        [session] = [s for s in gw.services.sessions.values() if s.user_id == "listener"]

        async def flood() -> None:
            for n in range(2000):
                await sender.send({"type": "chat", "room": "lobby", "message": str(n)})
                if n == 300 and closer == "server":
                    session.request_close(CloseCode.GOING_AWAY)  # as a drain does, mid-stream
                elif n == 300:  # the client closes; the room goes on, to the others
                    listener.send(frame(CLOSE, struct.pack("!H", 1000)))
                await asyncio.sleep(0)

        flooding = asyncio.create_task(flood())
        kinds: list[int] = []
        async with asyncio.timeout(timeout(20)):
            while True:
                try:
                    opcode, payload = await listener.read_any_frame()
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                kinds.append(opcode)
                if opcode == CLOSE:
                    assert struct.unpack("!H", payload[:2])[0] == (
                        1001 if closer == "server" else 1000
                    )
        await flooding
        assert CLOSE in kinds
        assert TEXT not in kinds[kinds.index(CLOSE) :], "a data frame after the close frame"
        assert kinds.count(TEXT) > 1  # it did receive the room's traffic before
        listener.close()
        await sender.close()


async def test_a_reply_and_a_broadcast_share_one_order(gateway: Gateway) -> None:
    # A direct reply (pong) and broadcasts take the same outbox: what the session sent first
    # arrives first, whichever way it went out.
    client = await gateway.user("alice")
    await client.join("lobby")
    await client.send({"type": "chat", "room": "lobby", "message": "one", "ref": "c1"})
    await client.send({"type": "ping", "ref": "p"})
    await client.send({"type": "chat", "room": "lobby", "message": "two", "ref": "c2"})
    refs = [(await client.recv())["ref"] for _ in range(3)]
    assert refs == ["c1", "p", "c2"]
    await client.close()


def connection_tasks(before: set[asyncio.Task[Any]]) -> list[str]:
    """What the tasks started since ``before`` run, but the server's own ``raise_shutdown``
    (started with its first connection)."""
    return sorted(
        name
        for task in asyncio.all_tasks() - before
        if (name := getattr(task.get_coro(), "__qualname__", "?")) != "raise_shutdown"
    )


async def test_the_server_pings_on_a_timer_and_an_idle_connection_holds_two_tasks(
    start_gateway: StartGateway,
) -> None:
    """Pings come from a timer per connection, not a task sleeping between them, and an idle
    connection's own tasks are its reader and writer (docs/performance.md, idle memory)."""
    async with start_gateway(GATEWAY_PING_INTERVAL_SECONDS="0.2") as gw:
        before = asyncio.all_tasks()
        raw = await RawClient.open(gw, "idle")
        pings = 0
        async with asyncio.timeout(timeout(10)):
            while pings < 4:  # the first at once, then one every 0.2 s
                opcode, payload = await raw.read_any_frame()
                if opcode == PING:
                    pings += 1
                    raw.send(frame(PONG, payload))
        # Hypercorn's connection task and app task, Quart's two, our reader and writer: no
        # ping task, no expiry watcher, no close-request task.
        names = connection_tasks(before)
        assert names == [
            "ASGIWebsocketConnection.handle_websocket",
            "BoundedWebsocketConnection.handle_messages",
            "_handle",
            "_read",
            "_write",
            "worker_serve.<locals>._server_callback",
        ], names
        [session] = gw.services.sessions.values()
        assert session.outbox.depth == 0
        raw.send(frame(CLOSE, struct.pack("!H", 1000)))
        assert await raw.read_close() == 1000
        assert await raw.eof_within(5)
        async with asyncio.timeout(timeout(5)):
            while gw.services.sessions or connection_tasks(before):
                await asyncio.sleep(0.01)
        raw.close()
