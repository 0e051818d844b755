"""Limits on a real TLS server: a burst of handshakes against the in-memory store on a busy
event loop, and the per-user limits (open connections, messages) over two gateways sharing a
real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.exceptions import InvalidStatus

from tests.e2e.conftest import Client, Gateway, StartGateway
from tests.helpers import timeout
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

#: Concurrent upgrades in the burst.
BURST = 200
#: What every turn of the server's event loop spends on other work during the burst.
BUSY_SECONDS_PER_TURN = 0.03
#: Where the burst's client module runs from (the repository, so ``tests`` imports).
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def busy_loop(seconds_per_turn: float) -> Iterator[None]:
    """Make every turn of the running event loop spend ``seconds_per_turn`` on other work, as
    the loop of a gateway serving many clients does: the turns are as many, but each is long."""
    loop = asyncio.get_running_loop()
    handle: asyncio.Handle | None = None

    def hog() -> None:
        nonlocal handle
        time.sleep(seconds_per_turn)  # the CPU that other connections would take
        handle = loop.call_soon(hog)

    handle = loop.call_soon(hog)
    try:
        yield
    finally:
        handle.cancel()


async def burst(gw: Gateway, ca_file: Path, tokens: list[str]) -> dict[str, Any]:
    """Every token's upgrade at once, from another process (tests/e2e/burst.py); its report."""
    config = {
        "url": gw.url,
        "ca_file": str(ca_file),
        "tokens": tokens,
        "open_timeout": timeout(60),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.burst",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout(90)):
            stdout, stderr = await process.communicate(json.dumps(config).encode())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    report: dict[str, Any] = json.loads(stdout)
    return report


async def test_a_burst_of_handshakes_is_never_refused_as_unavailable(
    start_gateway: StartGateway, ca: trustme.CA, tmp_path: Path
) -> None:
    # Every limit opened wide, the store in memory, the loop busy: nothing may refuse these
    # upgrades, least of all a 503 "store unavailable" because the loop was busy elsewhere.
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with start_gateway(
        GATEWAY_CONNECT_RATE=f"{BURST * 10}/minute",
        GATEWAY_MAX_CONNECTIONS=str(BURST * 2),
        GATEWAY_MAX_CONNECTIONS_PER_USER=str(BURST * 2),
    ) as gw:
        tokens = [gw.token(f"user-{n % 20}") for n in range(BURST)]
        with busy_loop(BUSY_SECONDS_PER_TURN):
            report = await burst(gw, ca_file, tokens)
    assert report == {"accepted": BURST, "refused": {}, "errors": {}, "failed": []}


async def test_the_per_user_cap_holds_over_two_gateways(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    shared = {
        "GATEWAY_RATELIMIT_STORAGE_URL": redis_server.url,
        "GATEWAY_MAX_CONNECTIONS_PER_USER": "2",
    }
    async with contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(start_gateway(**shared))
        two = await stack.enter_async_context(start_gateway(**shared))
        first = await one.user("alice")
        second = await two.user("alice")
        for gw in (one, two):  # her third, on either instance
            with pytest.raises(InvalidStatus) as refused:
                await gw.connect(gw.token("alice"))
            assert refused.value.response.status_code == 429
            assert json.loads(refused.value.response.body or b"{}")["error"] == (
                "too_many_connections"
            )
        other = await one.user("bob")  # another user is not affected
        await first.close()
        await first.ws.wait_closed()
        third: Client | None = None
        async with asyncio.timeout(timeout(5)):  # her slot comes back once the close is handled
            while third is None:
                with contextlib.suppress(InvalidStatus):
                    third = await one.user("alice")
                await asyncio.sleep(0.05)
        for client in (second, other, third):
            await client.close()


async def test_a_users_messages_are_counted_over_two_gateways(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    shared = {
        "GATEWAY_RATELIMIT_STORAGE_URL": redis_server.url,
        "GATEWAY_USER_MESSAGE_RATE": "3/minute",
    }
    async with contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(start_gateway(**shared))
        two = await stack.enter_async_context(start_gateway(**shared))
        here, there = await one.user("alice"), await two.user("alice")
        replies = [await client.request({"type": "ping"}, "pong") for client in (here, there)]
        replies.append(await here.request({"type": "ping"}, "pong"))
        assert [reply["type"] for reply in replies] == ["pong"] * 3
        for client in (there, here):  # her fourth and fifth, on either gateway
            error = await client.request({"type": "ping", "ref": "over"}, "error")
            assert (error["code"], error["ref"]) == ("rate_limited", "over")
            assert error["retry_after_ms"] > 0
        metrics = [gw.services.metrics.registry for gw in (one, two)]
        assert [
            m.get_sample_value("gateway_frames_rejected_total", {"reason": "user_rate"})
            for m in metrics
        ] == [1, 1]
        for client in (here, there):
            await client.close()
