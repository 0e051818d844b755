"""The local fan-out: which connections of this process are in which room.

The broker carries each broadcast between processes as one :class:`~gateway.broker.Envelope`
holding text serialized once by the publisher; the hub hands that same text to every local
member's outbox. Nothing here waits on a client: a full outbox closes its own connection
(:mod:`gateway.outbox`), it never slows the others.

The hub also counts local members per room, so that this process subscribes to a room's
broadcasts while, and only while, one of its connections is in it. The first holder of a room
waits for the subscription; later ones wait for that same subscription (a per-room lock), so
nobody is attached to a room whose subscription is still on its way or has failed.

When a shared broker removes the users of an instance that died, the hub announces their
``presence`` ``leave`` (:func:`presence_envelope`, the one builder of presence frames).

Each envelope becomes one :class:`~gateway.outbox.Outgoing`, shared by every recipient: its
type (for the sent-messages metric) is read once, and it carries when the frame that caused it
was read (:data:`RECEIVED_MONOTONIC`), so each writer can observe the broadcast's latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Protocol

from gateway.broker import Broker, Envelope, Member
from gateway.metrics import frame_kind
from gateway.outbox import Outgoing
from gateway.protocol import encode

__all__ = ["RECEIVED_MONOTONIC", "Hub", "Recipient", "presence_envelope"]

#: ``time.monotonic()`` when the frame this task is handling was read from its socket. The
#: connection's reader sets it before handing the frame to the session; the in-process broker
#: delivers within the publisher's call, in the same context, so the hub sees it. A broadcast
#: that arrives from another instance (a broker's listener task) has none: it is stamped on
#: arrival.
RECEIVED_MONOTONIC: ContextVar[float | None] = ContextVar(
    "gateway_received_monotonic", default=None
)


class _RoomLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def presence_envelope(room: str, event: str, member: Member) -> Envelope:
    """The ``presence`` broadcast of ``member`` entering (``join``) or leaving (``leave``)
    ``room``: to everyone in it but the user's own connections."""
    user = {"id": member.id, "name": member.name}
    frame = {"type": "presence", "event": event, "room": room, "user": user}
    return Envelope(room, encode(frame), skip_user=member.id)


class Recipient(Protocol):
    """What the hub needs of a connection."""

    @property
    def conn_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    def deliver(self, item: Outgoing) -> None: ...


class Hub:
    """Local room membership and delivery of envelopes to local members.

    Args:
        broker: the broker this process subscribes through.
        monotonic: the clock that stamps envelopes from other instances.
    """

    def __init__(self, broker: Broker, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._broker = broker
        self._monotonic = monotonic
        self._rooms: dict[str, dict[str, Recipient]] = {}
        self._subscriptions: dict[str, int] = {}
        #: Per room being subscribed or unsubscribed: one at a time.
        self._locks: dict[str, _RoomLock] = {}

    async def start(self) -> None:
        await self._broker.start(self.deliver, self._member_left)

    async def _member_left(self, room: str, member: Member) -> None:
        await self._broker.publish(presence_envelope(room, "leave", member))

    @property
    def rooms(self) -> int:
        """Rooms with at least one local member (for metrics and leak tests)."""
        return len(self._rooms)

    def members(self, room: str) -> int:
        return len(self._rooms.get(room, ()))

    async def acquire(self, room: str) -> None:
        """Hold a subscription to ``room``: returns once the broker is subscribed to it (the
        first holder subscribes; the others wait for that). A failed or cancelled subscribe
        raises and holds nothing: the room is as if never asked for.
        """
        async with self._room_lock(room):
            count = self._subscriptions.get(room, 0)
            if count == 0:
                await self._broker.subscribe(room)
            self._subscriptions[room] = count + 1

    async def release(self, room: str) -> None:
        """Give back a subscription taken by :meth:`acquire` (the last one unsubscribes).

        The hold is given back at once, even if the unsubscribe then fails or is cancelled.
        """
        count = self._subscriptions.get(room, 0)
        if count <= 0:
            return  # one release too many: harmless
        if count > 1:
            self._subscriptions[room] = count - 1
            return
        del self._subscriptions[room]
        async with self._room_lock(room):
            if room not in self._subscriptions:  # nobody acquired it again meanwhile
                await self._broker.unsubscribe(room)

    @contextlib.asynccontextmanager
    async def _room_lock(self, room: str) -> AsyncIterator[None]:
        """The room's lock, kept while anyone uses or waits for it (then forgotten)."""
        entry = self._locks.get(room)
        if entry is None:
            entry = self._locks[room] = _RoomLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[room]

    def attach(self, room: str, member: Recipient) -> None:
        """From now on ``member`` receives the room's envelopes."""
        self._rooms.setdefault(room, {})[member.conn_id] = member

    def detach(self, room: str, member: Recipient) -> None:
        members = self._rooms.get(room)
        if members is None:
            return
        members.pop(member.conn_id, None)
        if not members:
            del self._rooms[room]

    def deliver(self, envelope: Envelope) -> None:
        """Hand one envelope to every local member of its room (called by the broker)."""
        members = self._rooms.get(envelope.room)
        if not members:
            return
        received = RECEIVED_MONOTONIC.get()
        if received is None:
            received = self._monotonic()
        kind = frame_kind(envelope.payload)
        item = Outgoing(envelope.payload, kind, received)
        echo = None
        if envelope.echo_payload is not None:
            echo = Outgoing(envelope.echo_payload, kind, received)
        for member in list(members.values()):
            if member.user_id == envelope.skip_user:
                continue
            if echo is not None and member.conn_id == envelope.echo_conn:
                member.deliver(echo)
            else:
                member.deliver(item)
