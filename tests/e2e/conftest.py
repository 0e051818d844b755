"""A real gateway on a real TLS socket: Hypercorn in this event loop, on 127.0.0.1 port 0.

Certificates come from trustme (made per test session, never committed); clients are the
``websockets`` library with an SSL context trusting that CA, or raw TLS sockets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import websockets
from websockets.asyncio.client import ClientConnection

from gateway.app import SERVICES_KEY, create_app
from gateway.auth import mint_token
from gateway.protocol import BATCH_SUBPROTOCOL, validate_server_frame
from gateway.server import serve
from gateway.settings import Settings
from gateway.web import Services
from tests.helpers import make_settings, timeout


@dataclass
class Gateway:
    """A running gateway and what a test needs to talk to it."""

    settings: Settings
    services: Services
    port: int
    client_ssl: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"wss://localhost:{self.port}/ws"

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    def token(
        self, sub: str, name: str | None = None, rooms: Iterable[str] = (), ttl: float = 3600
    ) -> str:
        return mint_token(self.settings, sub=sub, name=name, rooms=rooms, ttl_seconds=ttl)

    async def connect(self, token: str | None = None, **kwargs: Any) -> ClientConnection:
        headers = kwargs.pop("additional_headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await websockets.connect(
            kwargs.pop("url", self.url),
            ssl=self.client_ssl,
            additional_headers=headers,
            open_timeout=timeout(5),
            **kwargs,
        )

    async def user(self, sub: str, rooms: Iterable[str] = (), **kwargs: Any) -> Client:
        """Connect as ``sub`` and read the welcome frame."""
        ws = await self.connect(self.token(sub, name=sub.title(), rooms=rooms), **kwargs)
        client = Client(ws)
        welcome = await client.recv()
        assert welcome["type"] == "welcome"
        client.welcome = welcome
        return client


class Client:
    """A websockets client that checks every server frame against its schema.

    With batched delivery negotiated (docs/protocol.md), a text frame may hold a JSON array
    of messages: :meth:`recv` returns them one at a time, and :attr:`arrays` counts them.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self.pending: collections.deque[dict[str, Any]] = collections.deque()
        self.frames = 0
        self.arrays = 0

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, wait_seconds: float = 5) -> dict[str, Any]:
        if self.pending:
            return self.pending.popleft()
        async with asyncio.timeout(timeout(wait_seconds)):
            raw = await self.ws.recv()
        assert isinstance(raw, str)
        self.frames += 1
        parsed = json.loads(raw)
        if isinstance(parsed, list):
            assert self.ws.subprotocol == BATCH_SUBPROTOCOL, "an array without batching"
            assert len(parsed) >= 2, "an array holds two messages or more"
            self.arrays += 1
            self.pending.extend(parsed[1:])
            parsed = parsed[0]
            for message in self.pending:
                validate_server_frame(message)
        frame: dict[str, Any] = parsed
        validate_server_frame(frame)
        return frame

    async def recv_type(self, kind: str, wait_seconds: float = 5) -> dict[str, Any]:
        """The next frame of type ``kind``, skipping others (presence, typing...)."""
        async with asyncio.timeout(timeout(wait_seconds)):
            while True:
                frame = await self.recv(wait_seconds)
                if frame["type"] == kind:
                    return frame

    async def request(self, frame: dict[str, Any], kind: str) -> dict[str, Any]:
        await self.send(frame)
        return await self.recv_type(kind)

    async def join(self, room: str) -> dict[str, Any]:
        return await self.request({"type": "join", "room": room}, "joined")

    async def close_code(self, wait_seconds: float = 5) -> int | None:
        """Read until the server closes; the close code it sent."""
        async with asyncio.timeout(timeout(wait_seconds)):
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await self.ws.recv()
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


@pytest.fixture(scope="session")
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


StartGateway = Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def start_gateway(tls_files: tuple[Path, Path], client_ssl: ssl.SSLContext) -> StartGateway:
    """``async with start_gateway(GATEWAY_X="...") as gw``: a real server for the block.

    Tests make many connections from one address, and floods from one user: the attempts per
    address and the messages per user are opened wide unless a test sets them.
    """

    @contextlib.asynccontextmanager
    async def start(**env: str) -> AsyncIterator[Gateway]:
        cert_file, key_file = tls_files
        settings = make_settings(
            {
                "GATEWAY_TLS_CERT_FILE": str(cert_file),
                "GATEWAY_TLS_KEY_FILE": str(key_file),
                "GATEWAY_CONNECT_RATE": "1000/minute",
                "GATEWAY_USER_MESSAGE_RATE": "1000000/second",
                **env,
            }
        )
        app = create_app(settings)
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        stop = asyncio.Event()
        server = asyncio.create_task(
            serve(settings, app=app, fd=sock.detach(), shutdown_trigger=stop.wait)
        )
        try:
            await _wait_listening(port, server)
            yield Gateway(settings, app.extensions[SERVICES_KEY], port, client_ssl)
        finally:
            stop.set()
            async with asyncio.timeout(timeout(15)):
                await server

    return start


async def _wait_listening(port: int, server: asyncio.Task[None]) -> None:
    """The socket listens already (bound above); fail fast if the server died starting."""
    for _ in range(5):
        await asyncio.sleep(0)
    if server.done():
        server.result()
        raise AssertionError(f"the server on port {port} stopped while starting")


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> AsyncIterator[Gateway]:
    async with start_gateway() as gw:
        yield gw
