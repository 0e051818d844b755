"""An echo WebSocket app on the gateway's own server stack, for Autobahn|Testsuite.

The same Hypercorn configuration and fixes as the gateway (gateway.server.serve: its config,
gateway.hypercorn_fixes installed, Quart with the gateway's WebSocket class), with an app that
sends every message back as it came (text as text, binary as binary).

Run: python -m tests.autobahn.echo_server PORT
"""

from __future__ import annotations

import asyncio
import secrets
import sys

from quart import Quart, websocket

from gateway.connection import BoundedWebsocketConnection
from gateway.server import serve
from gateway.settings import load_settings


def echo_app() -> Quart:
    app = Quart("echo")
    app.asgi_websocket_class = BoundedWebsocketConnection

    @app.websocket("/")
    async def echo() -> None:
        await websocket.accept()
        while True:
            data = await websocket.receive()
            await websocket.send(b"" if data is None else data)  # None: an empty binary message

    return app


def main() -> None:
    port = sys.argv[1]
    settings = load_settings(
        {
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": port,
            "GATEWAY_TLS": "proxy",  # plain ws:// on loopback, as behind a TLS proxy
            "GATEWAY_TRUSTED_PROXIES": "127.0.0.1",
            "GATEWAY_METRICS_PORT": "0",
            "GATEWAY_JWT_SECRET": secrets.token_urlsafe(48),  # unused: the echo app checks none
            # Autobahn's cases send messages of up to 64 KiB (the 9.x cases, larger, are not run).
            "GATEWAY_MAX_MESSAGE_BYTES": str(1024 * 1024),
        }
    )
    asyncio.run(serve(settings, app=echo_app()))


if __name__ == "__main__":
    main()
