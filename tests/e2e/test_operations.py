"""What an operator sees, on real sockets: the metrics listener counting a gateway at work, and
a real ``python -m gateway serve`` process draining on SIGTERM.

The metrics are scraped over plain HTTP from their own port, as Prometheus does, and parsed
with prometheus_client's parser. The process test connects 20 clients, sends SIGTERM, and
checks that /readyz turns 503 at once, every client is told 1001, the closes are spread over
the window, the process exits 0 within the grace, and no token reaches its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from gateway.auth import mint_token
from gateway.settings import load_settings
from tests.e2e.conftest import Gateway, StartGateway
from tests.e2e.rawclient import TEXT, RawClient, frame
from tests.e2e.test_process import connect, gateway_process, receive
from tests.helpers import timeout
from tests.processes import free_port

pytestmark = pytest.mark.e2e

__all__: list[str] = []

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def http_get(port: int, path: str, *, tls: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One GET, ``Connection: close``: the status and the body."""
    async with asyncio.timeout(timeout(5)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
        )
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def scrape(port: int) -> Samples:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape_until(port: int, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``ready`` holds (the server counts a close after the client has seen it)."""
    async with asyncio.timeout(timeout(10)):
        while True:
            samples = await scrape(port)
            if ready(samples):
                return samples
            await asyncio.sleep(0.05)


async def refused_status(gw: Gateway, token: str | None = None, **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as refused:
        ws = await gw.connect(token, **kwargs)
        await ws.close()
    status: int = refused.value.response.status_code
    return status


async def test_the_metrics_listener_counts_the_gateway_at_work(
    start_gateway: StartGateway,
) -> None:
    metrics_port = free_port()
    async with start_gateway(
        GATEWAY_METRICS_PORT=str(metrics_port),
        GATEWAY_ALLOWED_ORIGINS="https://chat.example.com",
        GATEWAY_MAX_CONNECTIONS_PER_USER="1",
        GATEWAY_CONNECT_RATE="15/minute",
        GATEWAY_RATE_BURST="5",
        GATEWAY_RATE_PER_SECOND="0.1",
        GATEWAY_MAX_RATE_VIOLATIONS="2",
    ) as gw:
        before = await scrape(metrics_port)
        assert value(before, "gateway_connections_open") == 0
        assert value(before, "gateway_connection_attempts_total", outcome="accepted") == 0
        assert value(before, "process_resident_memory_bytes") > 0  # the process collector

        # Accepted, a room, a broadcast, a reply, two refused frames.
        alice, bob = await gw.user("alice"), await gw.user("bob")
        await alice.join("lobby")
        await bob.join("lobby")
        await alice.request({"type": "chat", "room": "lobby", "message": "hi", "ref": "c"}, "chat")
        assert (await bob.recv_type("chat"))["message"] == "hi"
        await alice.request({"type": "ping"}, "pong")
        await bob.ws.send("not json")
        assert (await bob.recv_type("error"))["code"] == "invalid_json"
        await bob.send({"type": "ping", "colour": "red"})
        assert (await bob.recv_type("error"))["code"] == "invalid_message"

        # Refused upgrades: no token, a foreign origin, a second connection for alice.
        assert await refused_status(gw) == 401
        evil = {"origin": websockets.Origin("https://evil.example")}
        assert await refused_status(gw, gw.token("mallory"), **evil) == 403
        assert await refused_status(gw, gw.token("alice")) == 429

        # Closes: rate abuse 4029, a binary frame 1003, an over-cap frame 1009 (refused by the
        # WebSocket layer before the app sees it), invalid UTF-8 1007, and a client's own 1000.
        carol = await gw.user("carol")
        for _ in range(5):  # the burst
            await carol.request({"type": "ping"}, "pong")
        for _ in range(2):  # the violations tolerated
            await carol.send({"type": "ping"})
            assert (await carol.recv_type("error"))["code"] == "rate_limited"
        await carol.send({"type": "ping"})
        assert await carol.close_code() == 4029
        dave = await gw.user("dave")
        await dave.ws.send(b"\x00\x01")
        assert await dave.close_code() == 1003
        frank = await gw.user("frank")
        await frank.ws.send("x" * (gw.settings.max_message_bytes + 1))
        assert await frank.close_code() == 1009
        erin = await RawClient.open(gw, "erin")
        erin.send(frame(TEXT, b"\xff\xfe"))
        assert await erin.read_close() == 1007
        erin.close()
        await bob.close()
        assert bob.ws.close_code == 1000

        # Eight attempts counted so far (the foreign origin was refused before the quota);
        # bad tokens until the per-address rate (15 a minute) refuses.
        statuses = [await refused_status(gw, "bad.token.here") for _ in range(9)]
        assert statuses == [401] * 7 + [429] * 2

        expected_disconnects = {"1000": 1, "4029": 1, "1003": 1, "1009": 1, "1007": 1}

        def settled(samples: Samples) -> bool:
            # Bob's leave reaches alice after his close is counted: wait for both.
            return value(samples, "gateway_messages_sent_total", type="presence") == 2 and all(
                value(samples, "gateway_disconnects_total", code=code) == count
                for code, count in expected_disconnects.items()
            )

        after = await scrape_until(metrics_port, settled)

        def attempts(outcome: str) -> float:
            return value(after, "gateway_connection_attempts_total", outcome=outcome)

        assert attempts("accepted") == 6  # alice, bob, carol, dave, frank, erin
        assert (attempts("origin"), attempts("capacity")) == (1, 1)
        assert (attempts("token"), attempts("rate")) == (1 + 7, 2)
        assert value(after, "gateway_connections_open") == 1  # alice
        assert value(after, "gateway_disconnects_total", code="1006") == 0

        rejected = {
            reason: value(after, "gateway_frames_rejected_total", reason=reason)
            for reason in ("size", "json", "schema", "binary", "utf8")
        }
        assert rejected == {"size": 1, "json": 1, "schema": 1, "binary": 1, "utf8": 1}
        # carol: 5 pongs (the burst), 2 rate_limited errors, and the third one closes 4029.
        assert value(after, "gateway_frames_rejected_total", reason="rate") == 3

        def received(kind: str) -> float:
            return value(after, "gateway_messages_received_total", type=kind)

        def sent(kind: str) -> float:
            return value(after, "gateway_messages_sent_total", type=kind)

        assert (received("join"), received("chat")) == (2, 1)
        assert received("ping") == 1 + 8  # alice's, and carol's until the close
        assert (sent("welcome"), sent("joined"), sent("pong")) == (6, 2, 1 + 5)
        assert sent("chat") == 2  # alice's own copy and bob's
        assert sent("error") == 2 + 2  # bob's two, carol's two
        assert sent("presence") == 2  # bob's join and leave, to alice

        # The broadcasts, each written to its recipients at once and observed once: the chat
        # (to alice and bob), bob's presence join and leave (to alice).
        assert value(after, "gateway_broadcast_latency_seconds_count") == 3
        assert 0 < value(after, "gateway_broadcast_latency_seconds_sum") < timeout(5)
        assert value(after, "gateway_outbound_queue_max_frames") >= 0
        assert ("gateway_outbound_queue_frames", frozenset()) in after
        await alice.close()

    # The listener stopped with the server and let go of its port.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=timeout(5)).close()


async def test_readyz_on_the_public_listener(gateway: Gateway) -> None:
    status, body = await http_get(gateway.port, "/readyz", tls=gateway.client_ssl)
    assert (status, json.loads(body)) == (200, {"status": "ready"})


async def test_sigterm_drains_spread_over_the_window_and_exits_within_the_grace(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    spread_seconds, grace_seconds, count = 2.0, 8.0, 20
    metrics_port = free_port()
    async with gateway_process(
        tmp_path,
        ca,
        client_ssl,
        GATEWAY_SHUTDOWN_SPREAD_SECONDS=str(spread_seconds),
        GATEWAY_SHUTDOWN_GRACE_SECONDS=str(grace_seconds),
        GATEWAY_METRICS_PORT=str(metrics_port),
    ) as gateway:
        settings = load_settings(gateway.env)
        tokens = [
            mint_token(settings, sub=f"user{n}", name=f"User {n}", ttl_seconds=600)
            for n in range(count)
        ]
        clients = [
            await connect(gateway, client_ssl, additional_headers={"Authorization": f"Bearer {t}"})
            for t in tokens
        ]
        for ws in clients:
            assert (await receive(ws))["type"] == "welcome"
        status, body = await http_get(gateway.port, "/readyz", tls=client_ssl)
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        samples = await scrape(metrics_port)
        assert value(samples, "gateway_connections_open") == count

        closes: list[tuple[float, int | None]] = []

        async def watch(ws: websockets.ClientConnection) -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
            closes.append((time.monotonic(), ws.close_code))

        watchers = [asyncio.create_task(watch(ws)) for ws in clients]
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)

        # Not ready at once, and new upgrades are refused while the old ones are closed.
        status, body = await http_get(gateway.port, "/readyz", tls=client_ssl)
        assert (status, json.loads(body)) == (503, {"status": "draining"})
        with pytest.raises(InvalidStatus) as refused:
            late = await connect(
                gateway, client_ssl, additional_headers={"Authorization": f"Bearer {tokens[0]}"}
            )
            await late.close()
        assert refused.value.response.status_code == 503

        async with asyncio.timeout(timeout(grace_seconds)):
            await asyncio.gather(*watchers)
            exit_status = await gateway.process.wait()
        exited_after_seconds = time.monotonic() - signalled
        assert exit_status == 0
        assert exited_after_seconds < timeout(grace_seconds)

    assert [code for _, code in closes] == [1001] * count
    times = sorted(at for at, _ in closes)
    assert times[0] - signalled < timeout(1)  # the first batch goes at once
    assert times[-1] - times[0] >= spread_seconds / 2  # spread, not all in the same instant
    assert times[-1] - signalled < spread_seconds + timeout(2)  # and within the window

    stdout, stderr = gateway.output()
    entries = [json.loads(line) for line in stderr.splitlines()]
    assert all(isinstance(entry, dict) for entry in entries), stderr
    closed = [e for e in entries if e["event"] == "connection closed"]
    assert sorted(e["user_id"] for e in closed) == sorted(f"user{n}" for n in range(count))
    assert {e["close_code"] for e in closed} == {1001}
    assert all(e["conn_id"] and e["client"] == "127.0.0.1" for e in closed)
    assert any(e["event"] == "draining" for e in entries)
    assert any(e["event"] == "metrics listening" for e in entries)
    for token in tokens:
        _header, payload, signature = token.split(".")
        for part in (payload, signature):
            assert part not in stdout
            assert part not in stderr
    assert gateway.env["GATEWAY_JWT_SECRET"] not in stdout + stderr


async def test_a_client_dropping_its_connection_is_counted_1006(
    start_gateway: StartGateway,
) -> None:
    metrics_port = free_port()
    async with start_gateway(GATEWAY_METRICS_PORT=str(metrics_port)) as gw:
        raw = await RawClient.open(gw, "zed")
        raw.writer.transport.abort()  # no close frame, no TLS close_notify: gone
        samples = await scrape_until(
            metrics_port,
            lambda s: value(s, "gateway_disconnects_total", code="1006") == 1,
        )
        assert value(samples, "gateway_connections_open") == 0
