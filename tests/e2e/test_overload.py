"""Overload on the real TLS server: publishers are pushed back, subscribers stay.

The server shares the test's event loop, so a callback that blocks the loop for 100 ms every
few milliseconds makes it what a fan-out too big for one core makes it: late on every timer.
While it is, a chat is refused with a retryable ``overloaded`` error and is not broadcast;
nobody is closed; the metrics say so; once the loop catches up, the same message goes through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.e2e.conftest import Gateway, StartGateway
from tests.helpers import timeout

pytestmark = pytest.mark.e2e


@contextmanager
def busy_loop(block_seconds: float = 0.1, every_seconds: float = 0.02) -> Iterator[None]:
    """Block the running loop for ``block_seconds`` every ``every_seconds``, until exit."""
    loop = asyncio.get_running_loop()
    handle: asyncio.TimerHandle | None = None

    def hog() -> None:
        nonlocal handle
        time.sleep(block_seconds)
        handle = loop.call_later(every_seconds, hog)

    handle = loop.call_later(every_seconds, hog)
    try:
        yield
    finally:
        handle.cancel()


def sample(gw: Gateway, name: str, labels: dict[str, str] | None = None) -> float:
    return gw.services.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_an_overloaded_server_pushes_back_on_publishers_and_keeps_subscribers(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway() as gw:
        alice, bob, carol = await gw.user("alice"), await gw.user("bob"), await gw.user("carol")
        for client in (alice, bob, carol):
            await client.join("lobby")
        load = gw.services.load
        with busy_loop():
            async with asyncio.timeout(timeout(10)):
                while not load.overloaded:
                    await asyncio.sleep(0.01)
            assert sample(gw, "gateway_overloaded") == 1
            assert sample(gw, "gateway_event_loop_lag_seconds") > 0.05
            await alice.send({"type": "chat", "room": "lobby", "message": "busy?", "ref": "m1"})
            error = await alice.recv_type("error", wait_seconds=timeout(10))
            assert error["code"] == "overloaded"
            assert error["ref"] == "m1"
            assert 250 <= error["retry_after_ms"] <= 5000
            await bob.send({"type": "typing", "room": "lobby", "typing": True})  # dropped
            # A join is still served while chats are pushed back.
            assert (await carol.join("lobby"))["type"] == "joined"
        async with asyncio.timeout(timeout(10)):
            while load.overloaded:
                await asyncio.sleep(0.01)
        assert sample(gw, "gateway_overloaded") == 0
        assert sample(gw, "gateway_messages_shed_total", {"type": "chat"}) == 1
        assert sample(gw, "gateway_messages_shed_total", {"type": "typing"}) == 1
        # Nothing of the refused chat or the dropped typing reached anyone; nobody was closed.
        await alice.send({"type": "chat", "room": "lobby", "message": "busy?", "ref": "m1"})
        assert (await alice.recv_type("chat"))["ref"] == "m1"
        for client in (bob, carol):
            kinds = []
            while (frame := await client.recv())["type"] != "chat":
                kinds.append(frame["type"])
            assert "typing" not in kinds
            assert frame["message"] == "busy?"
            assert frame["id"] == 1  # the refused chat took no id: this is the room's first
        assert len(gw.services.sessions) == 3
        assert sample(gw, "gateway_disconnects_total", {"code": "4008"}) == 0
        for client in (alice, bob, carol):
            await client.close()
