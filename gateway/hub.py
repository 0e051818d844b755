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

Presence in a large room (more users than ``GATEWAY_PRESENCE_MAX_MEMBERS``) is not announced
user by user, which would cost n^2/2 frames for n users entering: :class:`RoomUpdates`
coalesces its changes into one ``room`` frame per room and second (:func:`room_envelope`).

Each envelope becomes one :class:`~gateway.outbox.Outgoing`, shared by every recipient: its
type (for the sent-messages metric) is read once, and it carries when the frame that caused it
was read (:data:`RECEIVED_MONOTONIC`), so each writer can observe the broadcast's latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Protocol

from gateway.broker import Broker, Envelope, Member, RoomUpdate
from gateway.errors import BrokerUnavailable
from gateway.metrics import Metrics, frame_kind
from gateway.outbox import Outgoing, Put
from gateway.protocol import encode

__all__ = [
    "DEFAULT_PRESENCE_MAX_MEMBERS",
    "RECEIVED_MONOTONIC",
    "ROOM_UPDATE_SECONDS",
    "Hub",
    "Recipient",
    "RoomUpdates",
    "presence_envelope",
    "room_envelope",
]

log = logging.getLogger("gateway.hub")

#: Above this many users a room is large (GATEWAY_PRESENCE_MAX_MEMBERS when configured).
DEFAULT_PRESENCE_MAX_MEMBERS = 100
#: A large room's changes are told at most once per this many seconds by each instance.
ROOM_UPDATE_SECONDS = 1.0

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


def room_envelope(room: str, update: RoomUpdate) -> Envelope:
    """The ``room`` broadcast of ``update``: to everyone in ``room``."""
    frame: dict[str, object] = {"type": "room", "room": room, "member_count": update.member_count}
    if update.members is not None:
        frame["members"] = [{"id": m.id, "name": m.name} for m in update.members]
    return Envelope(room, encode(frame))


class RoomUpdates:
    """Presence in large rooms, coalesced into ``room`` updates (docs/protocol.md).

    A room of more than ``limit`` users is large: a user entering or leaving it is not
    announced to everyone; the session marks the room :meth:`changed` instead. At most once
    per ``interval_seconds``, this instance asks the broker, for each room it marked, whether
    an update is due (:meth:`Broker.room_update`) and publishes it
    (:meth:`Broker.publish_room_update`: once over every instance, in order): each member, on
    every instance, gets one ``room`` frame with the count, however many users came and went
    meanwhile. A room that changed again before the update went out is asked about again at the
    next flush. Leaves mark a room whatever its size: the update that tells a room it is small
    again (with its whole member list) comes from them.

    Args:
        broker: where updates are decided and published.
        limit: above this many users a room is large (at least 1).
        interval_seconds: the coalescing period.

    Raises:
        ValueError: when ``limit`` is below 1.
    """

    def __init__(
        self,
        broker: Broker,
        limit: int = DEFAULT_PRESENCE_MAX_MEMBERS,
        interval_seconds: float = ROOM_UPDATE_SECONDS,
    ) -> None:
        if limit < 1:
            raise ValueError("a room is large above at least 1 member")
        self._broker = broker
        self.limit = limit
        self._interval_seconds = interval_seconds
        self._changed: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False

    def is_large(self, count: int) -> bool:
        """Whether a room of ``count`` users is large: no presence frames, updates instead."""
        return count > self.limit

    def changed(self, room: str) -> None:
        """Users entered or left ``room``: an update may be due, within ``interval_seconds``."""
        if self._closed:
            return
        self._changed.add(room)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._interval_seconds, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._flushing is not None and not self._flushing.done():  # a slow broker: later
            self._timer = asyncio.get_running_loop().call_later(self._interval_seconds, self._due)
            return
        self._flushing = asyncio.create_task(self.flush(), name="gateway-room-updates")

    async def flush(self) -> None:
        """Publish the updates due in the rooms marked since the last flush, now."""
        rooms = sorted(self._changed)
        self._changed.clear()
        for done, room in enumerate(rooms):
            try:
                update = await self._broker.room_update(room, self.limit)
                if update is not None:
                    envelope = room_envelope(room, update)
                    if not await self._broker.publish_room_update(room, update, envelope):
                        self.changed(room)  # it changed meanwhile (or was told): ask again
            except BrokerUnavailable:
                log.warning("room updates delayed", extra={"rooms": len(rooms) - done})
                for later in rooms[done:]:  # asked again at the next flush
                    self.changed(later)
                return
            except RuntimeError:  # the broker is closed: the gateway is stopping
                log.debug("room updates dropped: the broker is closed")
                return

    async def close(self) -> None:
        """Stop: nothing more is published (what is pending is dropped). Safe twice."""
        self._closed = True
        self._changed.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._flushing = self._flushing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Recipient(Protocol):
    """What the hub needs of a connection."""

    @property
    def conn_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    def deliver(self, item: Outgoing) -> Put: ...


class Hub:
    """Local room membership and delivery of envelopes to local members.

    Args:
        broker: the broker this process subscribes through.
        metrics: where the frames a broadcast wrote at once are counted (once per broadcast).
        monotonic: the clock that stamps envelopes from other instances.
        presence_max_members: above this many users a room is large (:class:`RoomUpdates`).
        room_update_seconds: a large room's changes are told at most this often.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        presence_max_members: int = DEFAULT_PRESENCE_MAX_MEMBERS,
        room_update_seconds: float = ROOM_UPDATE_SECONDS,
    ) -> None:
        self._broker = broker
        self.room_updates = RoomUpdates(broker, presence_max_members, room_update_seconds)
        self._metrics = metrics
        self._monotonic = monotonic
        self._rooms: dict[str, dict[str, Recipient]] = {}
        self._subscriptions: dict[str, int] = {}
        #: Per room being subscribed or unsubscribed: one at a time.
        self._locks: dict[str, _RoomLock] = {}

    async def start(self) -> None:
        await self._broker.start(self.deliver, self._member_left)

    async def close(self) -> None:
        """Stop publishing room updates (before the broker closes). Safe twice."""
        await self.room_updates.close()

    async def _member_left(self, room: str, member: Member) -> None:
        """A user whose instance died left ``room``: a ``presence`` ``leave`` in a small
        room, a room update in a large one."""
        self.room_updates.changed(room)
        if not self.room_updates.is_large(await self._broker.member_count(room)):
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

    def seat(self, room: str, conn_id: str) -> Recipient | None:
        """Who receives ``room``'s envelopes for connection ``conn_id``, if anyone."""
        return self._rooms.get(room, {}).get(conn_id)

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
        skip, echo_conn = envelope.skip_user, envelope.echo_conn
        echo = None
        if envelope.echo_payload is not None:
            echo = Outgoing(envelope.echo_payload, kind, received)
        written = 0
        # The hot loop of every broadcast: a delivery is a frame written to a transport (or
        # queued), nothing serialized, measured or allocated per recipient.
        for member in list(members.values()):
            if skip is not None and member.user_id == skip:
                continue
            if echo is not None and member.conn_id == echo_conn:
                put = member.deliver(echo)
            else:
                put = member.deliver(item)
            if put is Put.WRITTEN:
                written += 1
        if written and self._metrics is not None:
            self._metrics.written_many(kind, written, received, self._monotonic())
