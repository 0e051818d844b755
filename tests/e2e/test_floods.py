"""Floods on the real TLS server, with the bounds docs/deployment.md states: sockets that stall
before or inside the handshake cost a descriptor for a bounded time and never keep a real client
out; 2000 connections that never read while a publisher floods leave the server's memory
bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
import trustme

from gateway.auth import mint_token
from gateway.settings import load_settings
from tests.e2e.conftest import Gateway
from tests.e2e.rawclient import TEXT, frame
from tests.e2e.test_process import connect, gateway_process, receive_type
from tests.helpers import timeout

pytestmark = pytest.mark.e2e

#: Within this, every stalled socket must have been dropped (TLS handshake timeout 10 s, idle
#: HTTP/1.1 connection 5 s: gateway.server.build_config), with a margin for a loaded machine.
DROPPED_WITHIN_SECONDS = 40


async def ended(reader: asyncio.StreamReader) -> None:
    """Until the server ends the connection (EOF or reset)."""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while await reader.read(65536):
            pass


Stall = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def stall_before_tls(gw: Gateway) -> Stall:
    return await asyncio.open_connection("127.0.0.1", gw.port)  # and then nothing


async def stall_after_tls(gw: Gateway, request: bytes) -> Stall:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=gw.client_ssl, server_hostname="localhost"
    )
    writer.write(request)  # a request never finished (or none at all)
    await writer.drain()
    return reader, writer


async def test_stalled_handshakes_are_dropped_and_never_keep_a_real_client_out(
    gateway: Gateway,
) -> None:
    partial = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"  # no end
    stalls = [await stall_before_tls(gateway) for _ in range(100)]
    stalls += [await stall_after_tls(gateway, b"") for _ in range(75)]
    stalls += [await stall_after_tls(gateway, partial) for _ in range(75)]
    started = time.monotonic()
    # 250 stalled sockets: a real client is served all the same, at once.
    client = await gateway.user("real")
    assert (await client.join("lobby"))["type"] == "joined"
    # And each stalled socket is dropped within the bound.
    async with asyncio.timeout(timeout(DROPPED_WITHIN_SECONDS)):
        await asyncio.gather(*(ended(reader) for reader, _ in stalls))
    took = time.monotonic() - started
    print(f"\n250 stalled handshakes dropped within {took:.1f} s")
    assert took >= 4, "dropped by the server's timeouts, not by this test closing them"
    for _, writer in stalls:
        writer.close()
    await client.send({"type": "ping", "ref": "still"})
    assert (await client.recv_type("pong"))["ref"] == "still"
    await client.close()


# ---- never-reading connections under a flood: the server's memory stays bounded ----

NEVER_READERS = 2000
#: What one TLS connection may cost the server when it is made (its Quart and Hypercorn
#: objects, OpenSSL's state, asyncio's read buffer: 32 KiB since fix 12 of
#: gateway.hypercorn_fixes; it was 256 KiB, and a connection 320 KiB): measured about 100 KiB.
CONNECTED_BOUND = 160 * 1024
#: What a flood may add per connection that never reads: its transport's buffer is capped at
#: 64 KiB and its send queue holds references to frames shared by all recipients, not copies
#: (measured: under 20 KiB; the kernel's socket buffers hold the rest, outside the process).
FLOOD_BOUND = 96 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def never_reader(port: int, client_ssl: ssl.SSLContext, token: str) -> Stall:
    """A client that upgrades, joins the lobby, and never reads again (a tiny receive buffer:
    the server's writes back up at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=client_ssl, server_hostname="localhost"
    )
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    writer.write(frame(TEXT, b'{"type":"join","room":"lobby"}'))
    await writer.drain()
    return reader, writer


async def test_never_reading_connections_under_a_flood_leave_memory_bounded(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    env = {
        "GATEWAY_CONNECT_RATE": "1000000/minute",
        "GATEWAY_MAX_CONNECTIONS": "5000",
        "GATEWAY_RATE_PER_SECOND": "1000",
        "GATEWAY_RATE_BURST": "1000",
        "GATEWAY_USER_MESSAGE_RATE": "1000000/second",
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    async with gateway_process(tmp_path, ca, client_ssl, **env) as gateway:
        settings = load_settings({k: v for k, v in gateway.env.items() if k.startswith("GATEWAY_")})
        pid = gateway.process.pid
        before = rss_bytes(pid)
        readers: list[Stall] = []
        for start in range(0, NEVER_READERS, 100):
            readers += await asyncio.gather(
                *(
                    never_reader(gateway.port, client_ssl, mint_token(settings, sub=f"z{n}"))
                    for n in range(start, start + 100)
                )
            )
        await asyncio.sleep(0.5)
        connected = rss_bytes(pid)
        token = mint_token(settings, sub="publisher")
        publisher = await connect(
            gateway, client_ssl, additional_headers={"Authorization": f"Bearer {token}"}
        )
        await publisher.send(json.dumps({"type": "join", "room": "lobby", "ref": "j"}))
        await receive_type(publisher, "joined")

        async def read_own_copies() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await publisher.recv()

        reading = asyncio.create_task(read_own_copies())
        peak = connected
        body = "f" * 2000
        for n in range(300):  # 300 x 2000 x 2 KB: 1.2 GB offered to clients that never read
            await publisher.send(json.dumps({"type": "chat", "room": "lobby", "message": body}))
            if n % 20 == 0:
                await asyncio.sleep(0.05)
                peak = max(peak, rss_bytes(pid))
        for _ in range(10):  # while the server writes what it can
            await asyncio.sleep(0.3)
            peak = max(peak, rss_bytes(pid))
        per_connection = (connected - before) / NEVER_READERS
        per_flood = (peak - connected) / NEVER_READERS
        print(
            f"\nserver RSS {before / 2**20:.0f} MiB; {connected / 2**20:.0f} MiB with "
            f"{NEVER_READERS} TLS connections ({per_connection / 1024:.0f} KiB each); "
            f"{peak / 2**20:.0f} MiB at the flood's peak (+{per_flood / 1024:.0f} KiB each)"
        )
        assert per_connection <= CONNECTED_BOUND
        assert per_flood <= FLOOD_BOUND
        assert gateway.process.returncode is None
        reading.cancel()
        await publisher.close()
        # Cut the never-readers off with a reset while the server lives: its sockets and the
        # megabytes the kernel holds for them go at once, not as orphans that linger and press
        # on the kernel's TCP memory for the tests that follow.
        for _, writer in readers:
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        await asyncio.sleep(1)


async def test_half_open_connections_past_the_descriptor_limit_never_lock_real_clients_out(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    """More half-open connections than the process has descriptors: while they hold them, new
    connections wait in the listen backlog (asyncio pauses accepting for a second at each
    EMFILE); as the stalled ones are dropped (the TLS handshake timeout), a real client gets
    in. The process neither dies nor spins."""
    limit = 1024
    env = {"GATEWAY_CONNECT_RATE": "1000000/minute", "GATEWAY_LOG_LEVEL": "WARNING"}
    async with gateway_process(tmp_path, ca, client_ssl, open_files=str(limit), **env) as gateway:
        stalls = [
            await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(2 * limit)
        ]
        settings = load_settings({k: v for k, v in gateway.env.items() if k.startswith("GATEWAY_")})
        token = mint_token(settings, sub="real")
        started = time.monotonic()
        # Two rounds of stalled sockets (those past the limit wait in the backlog, then stall
        # in their turn): twice the drop bound.
        async with asyncio.timeout(timeout(2 * DROPPED_WITHIN_SECONDS)):
            while True:  # a real client: served once descriptors are free again
                try:
                    ws = await connect(
                        gateway, client_ssl, additional_headers={"Authorization": f"Bearer {token}"}
                    )
                    break
                except (OSError, TimeoutError, ssl.SSLError):
                    await asyncio.sleep(0.5)
        await ws.send(json.dumps({"type": "join", "room": "lobby", "ref": "j"}))
        assert (await receive_type(ws, "joined"))["ref"] == "j"
        print(
            f"\n{2 * limit} half-open connections, {limit} descriptors: a real client in after "
            f"{time.monotonic() - started:.1f} s"
        )
        await ws.close()
        assert gateway.process.returncode is None
        for _, writer in stalls:
            writer.close()
