"""Peer server for make bench: Quart + Hypercorn with the naive broadcast loop.

``for member in members: await member.send(text)``, in the publisher's own handler: every
delivery goes through Quart's ``websocket.send`` (its ``sleep(0)``, ``accept()``, the ASGI
send), Hypercorn's stream and wsproto, and waits for the socket's drain. No queue, no bound:
one slow client holds up the whole room. The protocol subset is bench/peers/chatproto.py's.

Run: ``python bench/peers/naive_quart.py --port 8765`` (bench/run.py does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from chatproto import (
    BACKLOG,
    MAX_MESSAGE_BYTES,
    PING_INTERVAL_SECONDS,
    Chat,
    ProtocolError,
    Rooms,
    User,
    chat_frames,
    decode,
    error_frame,
    joined_frame,
    parse_command_line,
    wait_for_stop_signal,
    welcome_frame,
)
from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart, websocket

__all__ = ["create_app", "main"]


@dataclass(eq=False)
class Client:
    """One connection: its user and Quart's ``send`` of its websocket (usable from another
    connection's handler, as the broadcast loop does)."""

    user: User
    send: Callable[[str], Awaitable[None]]


def create_app() -> Quart:
    """The peer: ``GET /ws`` speaking chatproto's subset."""
    app = Quart(__name__)
    rooms: Rooms[Client] = Rooms()

    @app.websocket("/ws")
    async def relay() -> None:
        await websocket.accept()
        client = Client(User.next(), websocket.send)
        await client.send(welcome_frame(client.user, ["lobby"]))
        try:
            while True:
                data = await websocket.receive()
                try:
                    message = decode(data)
                    if isinstance(message, Chat):
                        message_id, others = rooms.publish(message.room, client)
                        text, own = chat_frames(message_id, client.user, message)
                        for member in others:  # the naive loop
                            await member.send(text)
                        await client.send(own)
                    else:
                        rooms.join(message.room, client)
                        await client.send(joined_frame(message.room, message.ref))
                except ProtocolError as error:
                    await client.send(error_frame(error))
        finally:
            rooms.leave_all(client)

    return app


def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    args = parse_command_line(__doc__.split("\n")[0])
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.backlog = BACKLOG
    config.alpn_protocols = ["http/1.1"]
    config.websocket_max_message_size = MAX_MESSAGE_BYTES
    config.websocket_ping_interval = PING_INTERVAL_SECONDS
    config.accesslog = None
    config.graceful_timeout = 1.0  # as gateway/server.py: stop without waiting 3 s for idle sockets
    app = create_app()
    asyncio.run(serve(app, config, shutdown_trigger=wait_for_stop_signal))


if __name__ == "__main__":
    main()
