"""The fan-out interface: what the hub and sessions need from a broker, and nothing more.

A broker carries :class:`Envelope` s to every instance subscribed to a room, hands out the
ordered chat ids of each room, and keeps the room's presence (who is in it, over every
instance). Nothing above this interface assumes a single process.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import orjson

__all__ = ["Broker", "Deliver", "Envelope", "Member"]


@dataclass(frozen=True, slots=True)
class Member:
    """A user in a presence list: ``{"id", "name"}`` on the wire, both from the token."""

    id: str
    name: str


_OPTIONAL_FIELDS = ("skip_user", "echo_conn", "echo_payload")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One broadcast to a room, serialized once by the publisher.

    Attributes:
        room: the room.
        payload: the JSON text every recipient gets.
        skip_user: deliver to no connection of this user id (``typing`` goes to the others).
        echo_conn: this connection gets ``echo_payload`` instead of ``payload`` (the sender's
            own copy, carrying its ``ref``). Set together with ``echo_payload`` or not at all.
        echo_payload: see ``echo_conn``.

    Raises:
        ValueError: when only one of ``echo_conn`` and ``echo_payload`` is set.
    """

    room: str
    payload: str
    skip_user: str | None = None
    echo_conn: str | None = None
    echo_payload: str | None = None

    def __post_init__(self) -> None:
        if (self.echo_conn is None) != (self.echo_payload is None):
            raise ValueError("echo_conn and echo_payload go together")

    def to_bytes(self) -> bytes:
        """This envelope as one JSON object (UTF-8), for brokers that cross processes.

        Raises:
            ValueError: when a field is not encodable as UTF-8 (a lone surrogate).
        """
        data: dict[str, str] = {"room": self.room, "payload": self.payload}
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        try:
            return orjson.dumps(data)
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"envelope not encodable: {exc}") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Read an envelope written by :meth:`to_bytes`.

        Unknown fields are ignored, so instances of two versions can share a broker during
        a rolling upgrade.

        Raises:
            ValueError: when ``data`` is not such an envelope.
        """
        obj = orjson.loads(data)  # JSONDecodeError is a ValueError
        if not isinstance(obj, dict):
            raise ValueError("an envelope is a JSON object")
        room, payload = obj.get("room"), obj.get("payload")
        if not isinstance(room, str) or not isinstance(payload, str):
            raise ValueError("an envelope needs string room and payload")
        optional: dict[str, str | None] = {}
        for name in _OPTIONAL_FIELDS:
            value = obj.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"envelope field {name} must be a string")
            optional[name] = value
        return cls(
            room,
            payload,
            skip_user=optional["skip_user"],
            echo_conn=optional["echo_conn"],
            echo_payload=optional["echo_payload"],
        )


#: Called for every envelope of a subscribed room, in publish order per room. It must not
#: block nor raise: it runs on the broker's delivery path, shared by every connection.
Deliver = Callable[[Envelope], None]


class Broker(abc.ABC):
    """Fan-out, chat ids and presence for rooms, in one process or across many.

    Lifecycle: :meth:`start` once, then any other call, then :meth:`close`.
    """

    @abc.abstractmethod
    async def start(self, deliver: Deliver) -> None:
        """Start; from now on envelopes of subscribed rooms go to ``deliver``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release every resource. Safe to call twice."""

    @abc.abstractmethod
    async def subscribe(self, room: str) -> None:
        """This instance wants ``room``'s envelopes (the hub calls it for a first local member)."""

    @abc.abstractmethod
    async def unsubscribe(self, room: str) -> None:
        """This instance no longer wants ``room``'s envelopes (its last local member left)."""

    @abc.abstractmethod
    async def publish(self, envelope: Envelope) -> None:
        """Send ``envelope`` to every instance subscribed to its room, this one included."""

    @abc.abstractmethod
    async def next_id(self, room: str) -> int:
        """The next chat id of ``room``: 1, 2, 3 ... ordered within the room, across instances."""

    @abc.abstractmethod
    async def presence_add(self, room: str, member: Member, conn_id: str) -> bool:
        """Record connection ``conn_id`` of ``member`` in ``room``.

        Returns:
            True when this is the user's first connection in the room (announce a join).
        """

    @abc.abstractmethod
    async def presence_remove(self, room: str, user_id: str, conn_id: str) -> bool:
        """Forget connection ``conn_id`` of ``user_id`` in ``room``.

        Returns:
            True when it was the user's last connection in the room (announce a leave);
            False when it was not, or was never recorded.
        """

    @abc.abstractmethod
    async def members(self, room: str) -> list[Member]:
        """The users present in ``room``, one entry per user, sorted by id."""

    @abc.abstractmethod
    async def healthy(self) -> bool:
        """Whether the broker can serve (for /healthz)."""
