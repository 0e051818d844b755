"""Peer server for make bench: the python ``websockets`` library and its ``broadcast()``.

``broadcast()`` writes one frame to every member's transport without awaiting anything; a
client that does not read is left to its write buffer and the ping timeout. The protocol
subset is bench/peers/chatproto.py's.

Run: ``python bench/peers/websockets_broadcast.py --port 8765`` (bench/run.py does).
"""

from __future__ import annotations

import asyncio

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
from websockets.asyncio.server import ServerConnection, broadcast, serve

__all__ = ["main"]

rooms: Rooms[ServerConnection] = Rooms()


async def relay(connection: ServerConnection) -> None:
    """One connection, from ``welcome`` to its close."""
    user = User.next()
    await connection.send(welcome_frame(user, ["lobby"]))
    try:
        async for data in connection:
            try:
                message = decode(data)
                if isinstance(message, Chat):
                    message_id, others = rooms.publish(message.room, connection)
                    text, own = chat_frames(message_id, user, message)
                    broadcast(others, text)
                    broadcast([connection], own)
                else:
                    rooms.join(message.room, connection)
                    await connection.send(joined_frame(message.room, message.ref))
            except ProtocolError as error:
                await connection.send(error_frame(error))
    finally:
        rooms.leave_all(connection)


async def run(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    async with serve(
        relay,
        host,
        port,
        compression=None,
        max_size=MAX_MESSAGE_BYTES,
        ping_interval=PING_INTERVAL_SECONDS,
        backlog=BACKLOG,
    ):
        await wait_for_stop_signal()


def main() -> None:
    """The command line."""
    args = parse_command_line(__doc__.split("\n")[0])
    asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
