"""The fan-out interface: what the hub and sessions need from a broker, and nothing more.

A broker carries :class:`Envelope` s to every instance subscribed to a room, numbers a room's
chat messages as it publishes them (one order per room, across instances), and keeps the room's
presence (who is in it, over every instance). Nothing above this interface assumes a single
process.

A large room costs no more per join than a small one: :meth:`Broker.members_page` lists at
most a given number of users and :meth:`Broker.member_count` counts them in O(1);
:meth:`Broker.room_update` says when a large room's members are due to be told its size, and
:meth:`Broker.publish_room_update` tells them, once over every instance and in the order of the
changes (docs/protocol.md, Large rooms).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from gateway.history import Recovery, SinceError

__all__ = [
    "DROP_REASONS",
    "Broker",
    "BrokerObserver",
    "Deliver",
    "Envelope",
    "Member",
    "MemberLeft",
    "MemberPage",
    "Once",
    "RoomUpdate",
]

#: Why a broker drops a message that arrived on one of its channels (a metric label):
#: ``malformed`` (not a message of ours at all), ``signature`` (no valid HMAC: forged or
#: tampered), ``room`` (signed for another room's channel), ``stale`` (too old, or from too far
#: in the future), ``replayed`` (seen already), ``number`` (a numbered envelope without a valid
#: id, or an id that does not increase).
DROP_REASONS = ("malformed", "signature", "room", "stale", "replayed", "number")


@dataclass(frozen=True, slots=True)
class Member:
    """A user in a presence list: ``{"id", "name"}`` on the wire, both from the token."""

    id: str
    name: str


@dataclass(frozen=True, slots=True)
class MemberPage:
    """At most a given number of a room's users, and how many it has.

    Attributes:
        members: when ``total`` is at most the number asked for, every user of the room; else
            that many of them, whichever the broker finds cheapest. Sorted by id, one per user.
        total: how many users the room has.
    """

    members: tuple[Member, ...]
    total: int

    @property
    def truncated(self) -> bool:
        """Whether ``members`` leaves users out (the room has more than were asked for)."""
        return self.total > len(self.members)


@dataclass(frozen=True, slots=True)
class RoomUpdate:
    """What a large room's members are to be told of it (the ``room`` frame).

    Attributes:
        member_count: how many users the room has.
        members: None while the room is large; when it has just become small again (at most
            the limit), every user in it, sorted by id: their lists are whole again.
    """

    member_count: int
    members: tuple[Member, ...] | None = None


@dataclass(frozen=True, slots=True)
class Once:
    """What makes a publish idempotent (:meth:`Broker.publish_numbered_once`).

    Attributes:
        key: who said it and the client's ``ref`` (unique per room, for ``seconds``).
        seconds: how long the key is remembered (> 0).
        stamp: kept with the key and given back for a duplicate (the message's ``ts``).
    """

    key: str
    seconds: float
    stamp: int


_OPTIONAL_FIELDS = ("skip_user", "echo_conn", "echo_payload")
_NUMBER_FIELDS = ("id_at", "echo_id_at")


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
        id_at: for an envelope to be numbered (:meth:`Broker.publish_numbered`), where in
            ``payload`` the room's id goes (the text has no digits there yet); ``echo_id_at``
            is the same for ``echo_payload``. :meth:`numbered` fills them in.

    Raises:
        ValueError: when only one of ``echo_conn`` and ``echo_payload`` is set, or an id
            position is outside its payload or given without the other.
    """

    room: str
    payload: str
    skip_user: str | None = None
    echo_conn: str | None = None
    echo_payload: str | None = None
    id_at: int | None = None
    echo_id_at: int | None = None

    def __post_init__(self) -> None:
        if (self.echo_conn is None) != (self.echo_payload is None):
            raise ValueError("echo_conn and echo_payload go together")
        if self.id_at is not None and not 0 <= self.id_at <= len(self.payload):
            raise ValueError("id_at is outside the payload")
        if self.echo_id_at is not None:
            if self.id_at is None or self.echo_payload is None:
                raise ValueError("echo_id_at needs id_at and an echo_payload")
            if not 0 <= self.echo_id_at <= len(self.echo_payload):
                raise ValueError("echo_id_at is outside the echo payload")
        elif self.id_at is not None and self.echo_payload is not None:
            raise ValueError("a numbered envelope with an echo needs echo_id_at")

    @property
    def to_number(self) -> bool:
        """Whether the broker still has to give this envelope its id."""
        return self.id_at is not None

    def numbered(self, number: int) -> Envelope:
        """This envelope with ``number`` written where its id goes.

        Raises:
            ValueError: when it has no place for an id.
        """
        if self.id_at is None:
            raise ValueError("this envelope takes no id")
        digits = str(number)
        at, echo_at = self.id_at, self.echo_id_at
        echo = self.echo_payload
        if echo is not None and echo_at is not None:
            echo = echo[:echo_at] + digits + echo[echo_at:]
        return Envelope(
            self.room,
            self.payload[:at] + digits + self.payload[at:],
            skip_user=self.skip_user,
            echo_conn=self.echo_conn,
            echo_payload=echo,
        )

    def to_bytes(self) -> bytes:
        """This envelope as one JSON object (UTF-8), for brokers that cross processes.

        Raises:
            ValueError: when a field is not encodable as UTF-8 (a lone surrogate).
        """
        data: dict[str, str | int] = {"room": self.room, "payload": self.payload}
        for name in (*_OPTIONAL_FIELDS, *_NUMBER_FIELDS):
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
        numbers: dict[str, int | None] = {}
        for name in _NUMBER_FIELDS:
            value = obj.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"envelope field {name} must be an integer")
            numbers[name] = value
        return cls(
            room,
            payload,
            skip_user=optional["skip_user"],
            echo_conn=optional["echo_conn"],
            echo_payload=optional["echo_payload"],
            id_at=numbers["id_at"],
            echo_id_at=numbers["echo_id_at"],
        )


#: Called for every envelope of a subscribed room, in publish order per room. It must not
#: block nor raise: it runs on the broker's delivery path, shared by every connection.
Deliver = Callable[[Envelope], None]

#: Called when the broker removed a user from a room's presence on behalf of an instance that
#: is gone (its heartbeat stopped): announce the leave to the room. Called at most once per
#: user and disappearance, over all instances.
MemberLeft = Callable[[str, Member], Awaitable[None]]


class BrokerObserver(Protocol):
    """What a broker reports of its work (the gateway's metrics implement it)."""

    def broker_published(self, seconds: float) -> None:
        """An envelope was published, taking ``seconds``."""

    def broker_received(self) -> None:
        """An envelope arrived from the broker and was delivered."""

    def broker_dropped(self, reason: str) -> None:
        """A message on a channel the broker listens to was dropped, for ``reason``."""

    def broker_reconnected(self) -> None:
        """The broker's connection was lost and made again."""


class Broker(abc.ABC):
    """Fan-out, chat ids and presence for rooms, in one process or across many.

    Lifecycle: :meth:`start` once, then any other call, then :meth:`close`. A broker that
    needs a server (Redis) raises :class:`~gateway.errors.BrokerUnavailable` from a call it
    cannot do now; nothing was published or recorded then.
    """

    @abc.abstractmethod
    async def start(self, deliver: Deliver, member_left: MemberLeft | None = None) -> None:
        """Start; from now on envelopes of subscribed rooms go to ``deliver``, and users whose
        instance died leave through ``member_left``."""

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
    async def publish_numbered(self, envelope: Envelope) -> int:
        """Give ``envelope`` its room's next id and publish it, as one step: every instance
        delivers a room's numbered envelopes in increasing id order, the order of the ids.

        Ids increase by one per message within a room while the broker keeps its state; the
        first is 1 for a new room in memory, and may be larger (never smaller than an id it
        gave before) with a shared broker.

        Returns:
            The id.
        """

    @abc.abstractmethod
    async def publish_numbered_once(self, envelope: Envelope, once: Once) -> tuple[int, int | None]:
        """:meth:`publish_numbered`, unless an envelope with the same ``once.key`` was published
        in the same room within ``once.seconds``: then nothing is published. Check and publish
        are one step, so two instances racing with the same key publish once.

        Returns:
            The id, and None; or, for a duplicate, the first one's id and its ``once.stamp``.
        """

    @abc.abstractmethod
    async def history(self, room: str, since: int | None, limit: int) -> Recovery | SinceError:
        """What ``room``'s history keeps (``GATEWAY_HISTORY_SIZE`` messages at most, none
        older than ``GATEWAY_HISTORY_TTL_SECONDS``), in the order of the ids, each as the
        broadcast's JSON text with its id.

        Args:
            since: the messages after this id (:func:`gateway.history.recover`: complete or
                not, or FUTURE); None: the newest ``limit`` (``recovered`` true).
            limit: at most this many messages, >= 1.

        Raises:
            BrokerUnavailable: when the history cannot be read now.
        """

    @abc.abstractmethod
    async def presence_add(self, room: str, member: Member, conn_id: str) -> bool:
        """Record connection ``conn_id`` of ``member`` in ``room``; the member list shows the
        latest ``member`` recorded for a user (a refreshed token may rename them).

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
    async def members_page(self, room: str, limit: int) -> MemberPage:
        """At most ``limit`` (at least 1) of the users present in ``room``, and how many there
        are; in time and memory bounded by ``limit``, not by the room. When the room has at
        most ``limit`` users, the page is :meth:`members`."""

    @abc.abstractmethod
    async def member_count(self, room: str) -> int:
        """How many users are present in ``room``, in O(1)."""

    @abc.abstractmethod
    async def room_update(self, room: str, limit: int) -> RoomUpdate | None:
        """The update due to ``room``'s members now, if any (nothing is recorded: see
        :meth:`publish_room_update`). In time bounded by ``limit``.

        A room of more than ``limit`` users is large: an update is due when its count differs
        from the last update told (or none was). A room of at most ``limit`` users is due one
        update, with its whole member list, when the last update told of a large room; then
        none until it is large again.

        Returns:
            The update, or None when there is nothing to tell.
        """

    @abc.abstractmethod
    async def publish_room_update(self, room: str, update: RoomUpdate, envelope: Envelope) -> bool:
        """Publish ``envelope`` (``update`` as a frame) and record ``update`` as told, as one
        step, if it is still due: the room has ``update.member_count`` users and no instance
        told that since :meth:`room_update` answered. So each update is told once over every
        instance, and updates arrive in the order of the counts they tell.

        Returns:
            True when published; False when the room changed or was told meanwhile (ask
            :meth:`room_update` again later).
        """

    @abc.abstractmethod
    async def healthy(self) -> bool:
        """Whether the broker can serve (for /healthz)."""
