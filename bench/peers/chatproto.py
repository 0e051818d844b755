"""The part of the gateway's wire protocol that bench/loadgen.mjs needs, for the peer servers.

The peers (``naive_quart.py``, ``websockets_broadcast.py``) differ only in how they send a
broadcast; everything else lives here, once:

* ``welcome`` on connect, ``join`` -> ``joined``, ``chat`` -> ``chat`` to every member of the
  room with an ``id`` that increases by one per room, and the sender's own copy carrying its
  ``ref`` (docs/protocol.md). Frames are serialised once per broadcast (orjson, like the
  gateway): one text for the other members, one for the sender.
* No tokens, origins, schemas, rate limits, presence or member lists: the peers are the floor a
  plain relay costs, not a second gateway. A ``join`` answers ``joined`` without ``members``.
* The command line (``--host``, ``--port``) and the wait for SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

__all__ = [
    "BACKLOG",
    "MAX_MESSAGE_BYTES",
    "PING_INTERVAL_SECONDS",
    "Chat",
    "Join",
    "ProtocolError",
    "Rooms",
    "User",
    "chat_frames",
    "decode",
    "error_frame",
    "joined_frame",
    "parse_command_line",
    "wait_for_stop_signal",
    "welcome_frame",
]

#: The same listen backlog, frame cap and ping interval as the gateway's defaults.
BACKLOG = 2048
MAX_MESSAGE_BYTES = 16 * 1024
PING_INTERVAL_SECONDS = 20.0

Connection = TypeVar("Connection", bound=Hashable)
_user_numbers = itertools.count(1)


class ProtocolError(ValueError):
    """A client frame this subset does not understand; ``code`` is the gateway's error code."""

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.ref = ref


@dataclass(frozen=True)
class User:
    """A connected user; the peers take no token, so each connection is a user of its own."""

    id: str
    name: str

    @classmethod
    def next(cls) -> User:
        """A fresh user id (``peer-1``, ``peer-2``, ...)."""
        user_id = f"peer-{next(_user_numbers)}"
        return cls(user_id, user_id)


@dataclass(frozen=True)
class Join:
    """``{"type": "join", "room": ..., "ref"?: ...}``."""

    room: str
    ref: str | None


@dataclass(frozen=True)
class Chat:
    """``{"type": "chat", "room": ..., "message": ..., "ref"?: ...}``."""

    room: str
    message: str
    ref: str | None


def decode(data: str | bytes) -> Join | Chat:
    """The message in one client text frame.

    Raises:
        ProtocolError: not a JSON object of a type this subset handles.
    """
    try:
        message: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("invalid_json", "not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("invalid_message", "not an object")
    ref = message.get("ref")
    ref = ref if isinstance(ref, str) else None
    room = message.get("room")
    if not isinstance(room, str):
        raise ProtocolError("invalid_message", "room must be a string", ref)
    kind = message.get("type")
    if kind == "join":
        return Join(room, ref)
    text = message.get("message")
    if kind == "chat" and isinstance(text, str) and text:
        return Chat(room, text, ref)
    raise ProtocolError("invalid_message", "only join and chat are handled here", ref)


def _dumps(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def welcome_frame(user: User, rooms: list[str]) -> str:
    """The first frame of every connection."""
    return _dumps(
        {
            "type": "welcome",
            "connection_id": user.id,
            "user": {"id": user.id, "name": user.name},
            "rooms": rooms,
            "limits": {"max_message_bytes": MAX_MESSAGE_BYTES},
            "expires_at": None,
        }
    )


def joined_frame(room: str, ref: str | None) -> str:
    """The reply to ``join`` (without the member list: see the module docstring)."""
    frame: dict[str, Any] = {"type": "joined", "room": room}
    if ref is not None:
        frame["ref"] = ref
    return _dumps(frame)


def error_frame(error: ProtocolError) -> str:
    """An ``error`` frame for a refused message."""
    frame: dict[str, Any] = {"type": "error", "code": error.code, "message": str(error)}
    if error.ref is not None:
        frame["ref"] = error.ref
    return _dumps(frame)


def chat_frames(message_id: int, sender: User, chat: Chat) -> tuple[str, str]:
    """The broadcast of ``chat``: the text for the other members, and the sender's own copy
    (with ``ref``, the acknowledgement), each serialised once."""
    frame: dict[str, Any] = {
        "type": "chat",
        "id": message_id,
        "room": chat.room,
        "from": {"id": sender.id, "name": sender.name},
        "message": chat.message,
        "ts": int(time.time() * 1000),
    }
    others = _dumps(frame)
    if chat.ref is None:
        return others, others
    frame["ref"] = chat.ref
    return others, _dumps(frame)


@dataclass
class Rooms(Generic[Connection]):
    """Who is in which room, in joining order, and each room's next chat id."""

    members: dict[str, dict[Connection, None]] = field(default_factory=dict)
    next_ids: dict[str, int] = field(default_factory=dict)

    def join(self, room: str, connection: Connection) -> None:
        """Add ``connection`` to ``room`` (again: no change)."""
        self.members.setdefault(room, {})[connection] = None

    def leave_all(self, connection: Connection) -> None:
        """Take ``connection`` out of every room (on disconnect)."""
        for room, members in list(self.members.items()):
            members.pop(connection, None)
            if not members:
                del self.members[room]

    def publish(self, room: str, connection: Connection) -> tuple[int, list[Connection]]:
        """The id of a chat ``connection`` sends to ``room``, and the other members to send
        it to (in joining order; the sender's own copy goes last).

        Raises:
            ProtocolError: ``not_joined``, when ``connection`` is not in ``room``.
        """
        members = self.members.get(room, {})
        if connection not in members:
            raise ProtocolError("not_joined", f"join {room} first")
        message_id = self.next_ids.get(room, 0) + 1
        self.next_ids[room] = message_id
        return message_id, [member for member in members if member is not connection]


def parse_command_line(description: str) -> argparse.Namespace:
    """``--host`` and ``--port`` (what bench/run.py passes)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    return parser.parse_args()


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, received.set)
    await received.wait()
